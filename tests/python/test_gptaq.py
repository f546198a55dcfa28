"""Asymmetric calibration (``QuantizeConfig(gptaq=True)``, :mod:`gptqkit.gptaq`).

The algebra is checked in float64 against the objective it claims to solve
(GPTQ on the shifted target ``W + W D H⁻¹`` has the asymmetric objective's
minimiser and differs from it by a constant), and the pipeline against an
independent reconstruction: the unquantized and the partly quantized tiny
model are run by hand, their layer inputs hooked, and GPTQ run on the shifted
target computed in float64 here must give the codes ``quantize`` wrote.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import EXPECTED, VOCAB, make_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_cpu")

GROUP = 32


def _tokens(n=4, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, seqlen), generator=g)


def _inputs(k=24, n=400, seed=0):
    """Correlated inputs of the unquantized model ``x`` and perturbed ones ``xq`` ([n, k] float64)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((n, k)) @ mix + 0.3
    xq = x + 0.2 * rng.standard_normal((n, k)) @ mix
    return x, xq


# --------------------------------------------------------------------------- algebra

def test_accumulator_matches_float64():
    from gptqkit.gptaq import InputShiftAccumulator

    x, xq = _inputs()
    acc = InputShiftAccumulator(x.shape[1])
    for rows in np.array_split(np.arange(x.shape[0]), 3):
        acc.add_batch(torch.from_numpy(x[rows]).float(), torch.from_numpy(xq[rows]).float())
    expected = 2.0 / x.shape[0] * (x - xq).T @ xq
    got = acc.cross().double().numpy()
    assert acc.n_samples == x.shape[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_accumulator_rejects_mismatched_rows():
    from gptqkit.gptaq import InputShiftAccumulator

    acc = InputShiftAccumulator(8)
    with pytest.raises(ValueError, match="x, xq"):
        acc.add_batch(torch.zeros(5, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="x, xq"):
        acc.add_batch(torch.zeros(5, 7), torch.zeros(5, 7))
    assert torch.equal(acc.cross(), torch.zeros(8, 8))


def test_shifted_target_solves_the_asymmetric_objective():
    """W0 = W + W D (H + λI)⁻¹ minimises 2/n ||W X - Q Xq||² + λ ||W - Q||², and that objective
    equals GPTQ's tr((W0 - Q) (H + λI) (W0 - Q)ᵀ) up to a constant (all checked in float64)."""
    from gptqkit.gptaq import shift_operator, shifted_target

    x, xq = _inputs()
    n, k = x.shape
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, k))
    h = 2.0 / n * xq.T @ xq
    d = 2.0 / n * (x - xq).T @ xq
    damp = 0.01
    lam = damp * np.mean(np.diag(h))
    hd = h + lam * np.eye(k)

    m = shift_operator(torch.from_numpy(d).float(), torch.from_numpy(h).float(), damp_percent=damp)
    w0 = shifted_target(torch.from_numpy(w).float(), m, alpha=1.0).double().numpy()
    # the minimiser written independently: the normal equations of the damped least squares
    expected = np.linalg.solve(hd, (2.0 / n * w @ x.T @ xq + lam * w).T).T
    np.testing.assert_allclose(w0, expected, rtol=0, atol=1e-4 * np.abs(expected).max())

    def asymmetric(q):
        return 2.0 / n * np.sum((x @ w.T - xq @ q.T) ** 2) + lam * np.sum((w - q) ** 2)

    def gptq(q):
        e = expected - q
        return np.trace(e @ hd @ e.T)

    qs = [w + 0.1 * rng.standard_normal(w.shape) for _ in range(3)]
    for a, b in [(qs[0], qs[1]), (qs[1], qs[2])]:
        assert asymmetric(a) - asymmetric(b) == pytest.approx(gptq(a) - gptq(b), rel=1e-9)
    # alpha scales the shift
    half = shifted_target(torch.from_numpy(w).float(), m, alpha=0.5).double().numpy()
    np.testing.assert_allclose(half, w + 0.5 * (expected - w), rtol=0, atol=1e-4 * np.abs(expected).max())


def test_shift_operator_treats_dead_inputs_as_the_solver_does():
    from gptqkit.gptaq import shift_operator

    x, xq = _inputs(k=12)
    x[:, 3] = xq[:, 3] = 0.0  # an input that never activates
    n = x.shape[0]
    h = 2.0 / n * xq.T @ xq
    d = 2.0 / n * (x - xq).T @ xq
    m = shift_operator(torch.from_numpy(d).float(), torch.from_numpy(h).float(), damp_percent=0.05).double().numpy()
    h1 = h.copy()
    h1[3, 3] = 1.0
    expected = d @ np.linalg.inv(h1 + 0.05 * np.mean(np.diag(h1)) * np.eye(12))
    np.testing.assert_allclose(m, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_shift_operator_rejects_bad_shapes():
    from gptqkit.gptaq import shift_operator

    with pytest.raises(ValueError, match="cross, hessian"):
        shift_operator(torch.zeros(4, 4), torch.eye(5))


# --------------------------------------------------------------------------- the quantize pipeline

def _quantize(model, ids, **cfg):
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    cfg.setdefault("group_size", GROUP)
    q = GPTQForCausalLM(model, QuantizeConfig(**cfg))
    q.quantize(ids, batch_size=2, progress=False)
    return q


def _layer_inputs(model, layer_name, ids):
    """Rows [tokens, K] (float64) that ``layer_name`` receives in plain forwards of ``model``."""
    rows = []
    handle = model.get_submodule(layer_name).register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], 2):
                chunk = ids[s:s + 2]
                model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(rows)


def _with_quantized_weights(fp_model, q_model, names):
    """A copy of the unquantized model whose layers ``names`` hold ``q_model``'s dequantized weights."""
    model = copy.deepcopy(fp_model)
    with torch.no_grad():
        for name in names:
            model.get_submodule(name).weight.copy_(q_model.get_submodule(name).dequantize_weight(torch.float32))
    return model


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_codes_match_gptq_on_a_shifted_target_built_by_hand(gptqkit, alpha):
    """Block 0's o_proj and block 1's q_proj: their inputs in the unquantized model (x) and in the
    model quantized up to them (xq) are hooked from plain forwards; GPTQ on W + alpha W D (H+λI)⁻¹,
    computed here in float64, must give the codes quantize() wrote."""
    import gptqkit
    from gptqkit import QuantizeConfig
    from gptqkit.nn import QuantLinear

    fp = make_tiny_model("llama")
    ids = _tokens()
    q = _quantize(copy.deepcopy(fp), ids, gptaq=True, gptaq_alpha=alpha).model
    path, groups = EXPECTED["llama"]
    block0 = [f"{path}.0.{n}" for g in groups for n in g]
    cases = {
        f"{path}.0.self_attn.o_proj": [f"{path}.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
        f"{path}.1.self_attn.q_proj": block0,
    }
    cfg = QuantizeConfig(group_size=GROUP)
    for layer_name, quantized_before in cases.items():
        x = _layer_inputs(fp, layer_name, ids)
        xq = _layer_inputs(_with_quantized_weights(fp, q, quantized_before), layer_name, ids)
        n = x.shape[0]
        h = 2.0 / n * xq.T @ xq
        d = 2.0 / n * (x - xq).T @ xq
        hd = h + cfg.damp_percent * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
        w = fp.get_submodule(layer_name).weight.detach().double()
        target = w + alpha * torch.linalg.solve(hd, (w @ d).T).T
        assert (target - w).norm() > 1e-3 * w.norm()  # the shift is real here
        res = gptqkit.quantize_weight(target.float(), h.float(), **cfg.resolve(layer_name).as_kwargs(),
                                      clip_steps=cfg.clip_steps, clip_min_ratio=cfg.clip_min_ratio, fp16_scales=True)
        expected = QuantLinear.from_linear(fp.get_submodule(layer_name), res)
        got = q.get_submodule(layer_name)
        codes_equal = (gptqkit.unpack(got.qweight, got.qzeros, bits=4, in_features=w.shape[1])[0]
                       == gptqkit.unpack(expected.qweight, expected.qzeros, bits=4, in_features=w.shape[1])[0])
        assert codes_equal.float().mean() >= 0.99, layer_name
        torch.testing.assert_close(got.scales.float(), expected.scales.float(), rtol=1e-2, atol=0)


def test_first_layers_are_unchanged_and_later_ones_shift(gptqkit):
    """Block 0's q/k/v see identical inputs in both models (D = 0): exactly plain GPTQ's codes.
    Every later layer gets a shifted target, reported in LayerReport.target_shift."""
    fp = make_tiny_model("llama")
    ids = _tokens()
    plain = _quantize(copy.deepcopy(fp), ids)
    asym = _quantize(copy.deepcopy(fp), ids, gptaq=True)
    path, _ = EXPECTED["llama"]
    first = {f"{path}.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")}
    for name in first:
        assert torch.equal(asym.model.get_submodule(name).qweight, plain.model.get_submodule(name).qweight)
    shifts = {r.name: r.target_shift for r in asym.report.layers}
    assert all(shifts[n] == 0.0 for n in first)
    later = {n: s for n, s in shifts.items() if n not in first}
    assert later and all(s > 1e-3 for s in later.values()), later
    assert all(r.target_shift is None for r in plain.report.layers)
    assert not torch.equal(asym.model.get_submodule(f"{path}.1.mlp.down_proj").qweight,
                           plain.model.get_submodule(f"{path}.1.mlp.down_proj").qweight)


def test_brings_the_output_closer_to_the_unquantized_model(gptqkit):
    """On the calibration windows themselves (what the objective fits), the quantized model's
    logits move closer to the unquantized model's: 3 bits, where errors add up the most."""
    fp = make_tiny_model("llama")
    ids = _tokens(8)
    with torch.no_grad():
        ref = fp(input_ids=ids).logits
    errors = {}
    for gptaq in (False, True):
        q = _quantize(copy.deepcopy(fp), ids, bits=3, gptaq=gptaq)
        with torch.no_grad():
            errors[gptaq] = ((q.model(input_ids=ids).logits - ref).norm() / ref.norm()).item()
    assert errors[True] < errors[False], errors


def test_lm_head_and_round_trip(gptqkit, tmp_path):
    from gptqkit import GPTQForCausalLM

    q = _quantize(make_tiny_model("llama"), _tokens(), gptaq=True, gptaq_alpha=0.25, lm_head=True)
    head = [r for r in q.report.layers if r.name == "lm_head"]
    assert head and head[0].target_shift > 0
    q.save_quantized(tmp_path / "out")
    q2 = GPTQForCausalLM.from_quantized(tmp_path / "out")
    assert q2.quantize_config.gptaq and q2.quantize_config.gptaq_alpha == 0.25
    ids = _tokens(2, 16, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(q2.model(input_ids=ids).logits, q.model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_routed_experts_keep_plain_gptq(gptqkit):
    """The two models route tokens differently, so routed experts get no shift; attention does."""
    q = _quantize(make_tiny_model("mixtral"), _tokens(), gptaq=True)
    shifts = {r.name: r.target_shift for r in q.report.layers}
    experts = [n for n in shifts if ".experts." in n]
    assert experts and all(shifts[n] is None for n in experts)
    others = [n for n in shifts if ".experts." not in n and not n.startswith("model.layers.0.self_attn")]
    assert others and all(shifts[n] > 0 for n in others), shifts


def test_resume_gives_the_same_checkpoint(gptqkit, tmp_path, monkeypatch):
    """An interrupted gptaq run resumed from its folder equals an uninterrupted one: restored
    blocks also advance the unquantized model's activations."""
    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.model import GPTQForCausalLM as Impl

    fp = make_tiny_model("llama")
    ids = _tokens()
    cfg = dict(group_size=GROUP, gptaq=True)
    whole = _quantize(copy.deepcopy(fp), ids, **cfg)

    calls = {"n": 0}
    original = Impl._quantize_layer

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in block 1, after block 0 was stored
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Impl, "_quantize_layer", failing)
    with pytest.raises(KeyboardInterrupt):
        GPTQForCausalLM(copy.deepcopy(fp), QuantizeConfig(**cfg)).quantize(
            ids, batch_size=2, progress=False, resume_dir=tmp_path / "partial")
    monkeypatch.setattr(Impl, "_quantize_layer", original)
    resumed = GPTQForCausalLM(copy.deepcopy(fp), QuantizeConfig(**cfg))
    resumed.quantize(ids, batch_size=2, progress=False, resume_dir=tmp_path / "partial")
    for name, layer in whole.model.named_modules():
        if hasattr(layer, "qweight"):
            other = resumed.model.get_submodule(name)
            assert torch.equal(layer.qweight, other.qweight) and torch.equal(layer.scales, other.scales), name


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("kwargs,match", [
    (dict(gptaq="yes"), "gptaq"),
    (dict(gptaq_alpha=0.0), "gptaq_alpha"),
    (dict(gptaq_alpha=1.5), "gptaq_alpha"),
    (dict(gptaq_alpha=True), "gptaq_alpha"),
])
def test_bad_settings_are_refused(kwargs, match):
    from gptqkit import QuantizeConfig

    with pytest.raises(ValueError, match=match):
        QuantizeConfig(**kwargs)


def test_saved_settings_use_gptqmodels_spelling():
    from gptqkit import QuantizeConfig

    d = QuantizeConfig(gptaq=True, gptaq_alpha=0.25).to_quantization_config()
    assert d["meta"]["gptaq"] == {"alpha": 0.25}
    assert "gptaq" not in QuantizeConfig().to_quantization_config()["meta"]
    back = QuantizeConfig.from_quantization_config(d)
    assert back.gptaq and back.gptaq_alpha == 0.25
    # as GPTQModel writes it (with its device), and its "off"
    theirs = QuantizeConfig.from_quantization_config(
        {"quant_method": "gptq", "bits": 4, "meta": {"gptaq": {"alpha": 0.25, "device": "auto"}}})
    assert theirs.gptaq and theirs.gptaq_alpha == 0.25
    off = QuantizeConfig.from_quantization_config({"quant_method": "gptq", "bits": 4, "meta": {"gptaq": None}})
    assert not off.gptaq


def test_replaced_weights_are_gone_when_their_pages_are_released(gptqkit, monkeypatch):
    """The block's kept original layers must be dropped before the quantized layers are swapped
    in: a kept layer holds its weight alive, and its file pages would never be given back
    (measured before the fix: RSS grew by one block's weights per block)."""
    import weakref

    from gptqkit import model as gm

    noted_refs = []
    checked = []
    real_note, real_release = gm.exclusive_file_ranges, gm.release_file_pages

    def note(tensors):
        noted_refs.append([weakref.ref(t) for t in tensors])
        return real_note(tensors)

    def release(noted):
        refs = noted_refs.pop()
        checked.append(all(r() is None for r in refs))
        return real_release(noted)

    monkeypatch.setattr(gm, "exclusive_file_ranges", note)
    monkeypatch.setattr(gm, "release_file_pages", release)
    _quantize(make_tiny_model("llama"), _tokens(), gptaq=True)
    assert checked and all(checked), checked


def test_unquantized_attention_runs_whole_once_per_block_and_batch(gptqkit):
    """The unquantized model's attention must run to its end once per block and batch (in
    o_proj's group, where it is recorded) and be replayed in the MLP groups; q_proj's calls count
    what really ran. Per block and batch: the quantized model runs attention in the q/k/v and
    o_proj groups (afterwards it is seeded from o_proj), the unquantized model starts it in the
    q/k/v group (stopped at q_proj) and runs it whole in o_proj's: 4 calls; 5 before attention was
    recorded there."""
    fp = make_tiny_model("llama")
    ids = _tokens()
    path, _ = EXPECTED["llama"]
    calls = {}
    blocks = fp.get_submodule(path)
    for i, block in enumerate(blocks):
        calls[i] = 0
        block.self_attn.q_proj.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    q = _quantize(fp, ids, gptaq=True)
    batches = ids.shape[0] // 2
    # plus one call per block from the probe of its structure (find_tails), and one more in
    # block 0 from the discovery of its layer groups
    assert calls == {i: 4 * batches + 1 + (i == 0) for i in range(len(blocks))}, calls
    assert all(r.target_shift is not None for r in q.report.layers)


def test_a_block_part_called_without_its_hooks_gives_the_same_checkpoint(gptqkit):
    """A block that runs attention without going through Module.__call__ (no hooks fire on the
    part itself; remote-code models do this) must not let the unquantized pass run on into the
    MLP, whose replayed output would hide gate_proj's input: the same codes as the normal run."""
    fp = make_tiny_model("llama")
    ids = _tokens()
    path, _ = EXPECTED["llama"]
    normal = _quantize(copy.deepcopy(fp), ids, gptaq=True)
    direct = copy.deepcopy(fp)
    for block in direct.get_submodule(path):
        attn = block.self_attn
        attn.__class__ = type("DirectCall" + type(attn).__name__, (type(attn),),
                              {"__call__": lambda self, *a, **k: self.forward(*a, **k)})
    direct = _quantize(direct, ids, gptaq=True)
    for name, layer in normal.model.named_modules():
        if hasattr(layer, "qweight"):
            assert torch.equal(direct.model.get_submodule(name).qweight, layer.qweight), name
