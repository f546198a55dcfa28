"""Mixture-of-Experts models: experts split into per-expert Linear layers (gptqkit.moe), each
quantized with the Hessian of the tokens routed to it, saved per expert and loaded back.

The references here are independent of the pipeline: the fused module transformers ships
(for the split's outputs), and per-expert Hessians computed in float64 from the routing
transformers' own router decides (captured with a hook on the unsplit model)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import EXPERTS, FFN, HIDDEN, MOE_ARCHITECTURES, VOCAB, make_tiny_model  # noqa: E402

GROUP = 32


pytestmark = pytest.mark.usefixtures("fast_cpu")  # conftest: one thread, frozen GC


def _tokens(n, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, seqlen), generator=g)


HELD_OUT = _tokens(2, 24, seed=777)


def _expert_rows(fused, e):
    """Expert e's (gate_up or up, down) weights and biases as [out, in] rows, read from the fused
    module's flags the way transformers' batched implementation reads them."""
    t = (lambda w: w.t()) if getattr(fused, "is_transposed", False) else (lambda w: w)
    inp = "gate_up_proj" if getattr(fused, "has_gate", True) else "up_proj"
    biases = getattr(fused, "has_bias", False)
    return (t(getattr(fused, inp)[e]), t(fused.down_proj[e]),
            getattr(fused, f"{inp}_bias")[e] if biases else None, fused.down_proj_bias[e] if biases else None)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_split_experts_compute_what_the_fused_module_computes(gptqkit, arch):
    """Every expert's layers are the fused tensors' rows (transposed for GPT-OSS, with its biases);
    the model computes the same logits. GPT-OSS's gate_proj / up_proj are the two halves of its
    interleaved gate_up outputs, its own gating function runs on them concatenated."""
    from gptqkit.moe import LinearExperts, defuse_experts

    model = make_tiny_model(arch)
    fused = copy.deepcopy(model.model.layers[0].mlp.experts)
    with torch.no_grad():
        ref = model(HELD_OUT).logits
    assert defuse_experts(model) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LinearExperts) and len(experts) == EXPERTS
    assert (experts.gate_fn is not None) == (arch == "gpt_oss")
    for e, expert in enumerate(experts):
        w_in, w_down, b_in, b_down = _expert_rows(fused, e)
        ffn = w_down.shape[1]
        assert torch.equal(expert.gate_proj.weight, w_in[:ffn]) and torch.equal(expert.up_proj.weight, w_in[ffn:])
        assert torch.equal(expert.down_proj.weight, w_down)
        if b_in is None:
            assert expert.gate_proj.bias is None and expert.down_proj.bias is None
        else:
            assert b_in.abs().min() > 0 and torch.equal(torch.cat([expert.gate_proj.bias, expert.up_proj.bias]), b_in)
            assert torch.equal(expert.down_proj.bias, b_down)
    assert not any(p.dim() == 3 for p in model.parameters())
    with torch.no_grad():
        got = model(HELD_OUT).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def _experts_module(cls_path: str, **config):
    """One fused-experts module of a model family gptqkit has no tiny full model of, randomly
    initialised: (module, 3 routed inputs)."""
    import importlib

    module_name, _, cls_name = cls_path.rpartition(".")
    config_cls = getattr(transformers, config.pop("config"))
    cls = getattr(importlib.import_module(f"transformers.models.{module_name}"), cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = cls(config_cls(**config)).eval()
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.1)
        hidden = torch.randn(10, module.down_proj.shape[1])
        index = torch.stack([torch.randperm(EXPERTS)[:2] for _ in range(10)])
        weights = torch.softmax(torch.randn(10, 2), dim=-1)
    return module, (hidden, index, weights)


def test_experts_without_a_gate_are_split(gptqkit):
    """NemotronH's experts (``has_gate=False``: up_proj and down_proj, relu² of up) become
    ExpertMLPs without gate_proj that compute what the fused module computes."""
    from gptqkit.moe import defuse, unsupported_reason

    fused, args = _experts_module("nemotron_h.modeling_nemotron_h.NemotronHExperts", config="NemotronHConfig",
                                  hidden_size=HIDDEN, moe_intermediate_size=FFN, n_routed_experts=EXPERTS)
    assert unsupported_reason(fused) is None
    split = defuse(fused)
    assert all(e.gate_proj is None and torch.equal(e.up_proj.weight, fused.up_proj[i])
               for i, e in enumerate(split))
    with torch.no_grad():
        torch.testing.assert_close(split(*args), fused(*args), rtol=0, atol=1e-6)


def test_experts_take_their_fused_modules_argument_names(gptqkit):
    """The split module is called like the fused one: positionally, or by keyword with either the
    names transformers' expert implementations use (top_k_index / top_k_weights) or the module's
    own (GPT-OSS's eager forward names them router_indices / routing_weights)."""
    from gptqkit.moe import defuse

    fused = make_tiny_model("gpt_oss").model.layers[0].mlp.experts
    hidden, index, weights = torch.randn(6, HIDDEN), torch.randint(0, EXPERTS, (6, 2)), torch.rand(6, 2)
    split = defuse(fused)
    with torch.no_grad():
        ref = fused(hidden, index, weights)
        torch.testing.assert_close(split(hidden, router_indices=index, routing_weights=weights), ref,
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(split(hidden, top_k_index=index, top_k_weights=weights), ref, rtol=0, atol=1e-6)
        with pytest.raises(TypeError, match="expected 3 arguments"):
            split(hidden, index)


def test_layouts_that_are_not_standard_stay_fused(gptqkit):
    """MuseSpark's experts apply a norm after each expert (``has_post_expert_norm``), which the
    split does not carry: they are not split (quantize() then warns that such experts stay in full
    precision: test_model.py)."""
    from gptqkit.moe import defuse, defuse_experts, fused_experts, unsupported_reason

    fused, _ = _experts_module("muse_spark.modeling_muse_spark.MuseSparkExperts", config="MuseSparkTextConfig",
                               hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                               moe_hidden_size=HIDDEN, moe_intermediate_size=FFN, num_local_experts=EXPERTS)
    assert "norm after each expert" in unsupported_reason(fused)
    holder = torch.nn.Module()
    holder.experts = fused
    assert list(fused_experts(holder)) == ["experts"]
    assert defuse_experts(holder) == [] and holder.experts is fused
    with pytest.raises(ValueError, match="cannot be split into per-expert layers: a norm after each expert"):
        defuse(fused)


def _routed_inputs(model, sequences):
    """Per expert of block 0: the inputs transformers' own router sends it, over ``sequences``
    (each run alone, unpadded), in float64."""
    captured = {e: [] for e in range(EXPERTS)}

    def hook(_module, args):
        hidden, top_k_index = args[0], args[1]
        for e in range(EXPERTS):
            tokens = (top_k_index == e).any(dim=-1)
            captured[e].append(hidden[tokens].double())

    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for seq in sequences:
                model(seq[None])
    finally:
        handle.remove()
    return {e: torch.cat(xs) for e, xs in captured.items()}


def _hessian64(x):
    return 2.0 / x.shape[0] * x.T @ x


def _gated64(arch, config, x, gate, up):
    """What reaches an expert's down_proj, in float64, written out from each family's modelling
    code: Mixtral's silu(gate) * up; GPT-OSS's clamped (up + 1) * gate * sigmoid(alpha * gate) over
    its interleaved gate/up columns (gate_proj holds the first half of them, up_proj the second)."""
    g = x @ gate.dequantize_weight().double().T
    u = x @ up.dequantize_weight().double().T
    if arch == "mixtral":
        return torch.nn.functional.silu(g) * u
    gate_up = torch.cat([g + gate.bias.double(), u + up.bias.double()], dim=-1)
    g, u = gate_up[:, 0::2].clamp(max=config.swiglu_limit), gate_up[:, 1::2].clamp(-config.swiglu_limit,
                                                                                    config.swiglu_limit)
    return (u + 1) * g * torch.sigmoid(config.swiglu_alpha * g)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_each_expert_gets_the_hessian_of_the_tokens_routed_to_it(gptqkit, monkeypatch, arch):
    """Block 0's experts, attention left unquantized so their inputs are the fp model's: every
    gate/up Hessian equals 2/n X_e^T X_e of the real (unpadded) tokens routed to expert e, and
    every down_proj Hessian that of the gated activations of X_e with the expert's already
    quantized gate/up (true-sequential inside each expert; GPT-OSS with its biases and custom
    gate). Calibration mixes lengths, so the batches are padded: padding must reach no expert."""
    import gptqkit.model
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    model = make_tiny_model(arch)
    sequences = [row[: 24 + 8 * (i % 3)] for i, row in enumerate(_tokens(12, 40, seed=3))]
    routed = _routed_inputs(model, sequences)

    seen = {}
    original = gptqkit.model.GPTQForCausalLM._quantize_layer

    def recording(self, parent, name, full, hessian, *args, **kwargs):
        if full.startswith("model.layers.0.mlp.experts."):
            seen[full] = (None if hessian is None else hessian.double().clone(), kwargs.get("tokens"))
        return original(self, parent, name, full, hessian, *args, **kwargs)

    monkeypatch.setattr(gptqkit.model.GPTQForCausalLM, "_quantize_layer", recording)
    q = GPTQForCausalLM(model, QuantizeConfig(group_size=GROUP, dynamic={r"-:.*self_attn": {}}))
    report = q.quantize([{"input_ids": s} for s in sequences], batch_size=4, progress=False)
    assert len(seen) == 3 * EXPERTS
    experts = q.model.model.layers[0].mlp.experts
    for e in range(EXPERTS):
        x = routed[e]
        assert x.shape[0] >= FFN  # enough tokens for GPTQ: no fallback in this test
        for proj in ("gate_proj", "up_proj"):
            hessian, tokens = seen[f"model.layers.0.mlp.experts.{e}.{proj}"]
            assert tokens == x.shape[0]
            torch.testing.assert_close(hessian, _hessian64(x), rtol=1e-4, atol=1e-5)
        expert = experts[e]
        h = _gated64(arch, model.config, x, expert.gate_proj, expert.up_proj)
        hessian, tokens = seen[f"model.layers.0.mlp.experts.{e}.down_proj"]
        assert tokens == x.shape[0]
        torch.testing.assert_close(hessian, _hessian64(h), rtol=1e-4, atol=1e-5 * _hessian64(h).abs().max().item())
    assert not any(r.rtn_fallback for r in report.layers if r.name.startswith("model.layers.0."))
    # the two expert stages are one group each, not two per expert
    stages = [[f"mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_proj", "up_proj")],
              [f"mlp.experts.{e}.down_proj" for e in range(EXPERTS)]]
    assert q.layout.groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                               ["self_attn.o_proj"], *stages]


def test_experts_no_token_reaches_are_rounded_to_nearest(gptqkit):
    """Two calibration tokens, one expert each: at least half the experts of a block get no
    token at all. Their layers are rounded to nearest (GPTQ with an identity Hessian: exactly
    quantize_weight(W, I)), not zeroed as GPTQ's dead-column rule would do with an all-zero
    Hessian; the report says so. Experts that got a token or two still get GPTQ."""
    from gptqkit import GPTQForCausalLM, QuantizeConfig, quantize_weight

    model = make_tiny_model("mixtral", num_experts_per_tok=1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = QuantizeConfig(group_size=GROUP)
    q = GPTQForCausalLM(model, cfg)
    report = q.quantize(_tokens(1, 2), progress=False)
    experts = [r for r in report.layers if ".experts." in r.name]
    assert len(experts) == 2 * 3 * EXPERTS
    unreached = [r for r in experts if r.tokens == 0]
    assert len(unreached) >= 2 * 3 * EXPERTS // 2
    assert all(r.rtn_fallback == (r.tokens == 0) for r in report.layers)
    assert "got no calibration token and were rounded to nearest" in report.summary()
    for r in unreached[:3]:
        block, _, rest = r.name.partition(".mlp.experts.")
        e, proj = rest.split(".")
        ffn = FFN
        fused = weights[f"{block}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"][int(e)]
        w = {"gate_proj": fused[:ffn], "up_proj": fused[ffn:], "down_proj": fused}[proj].float()
        rtn = quantize_weight(w, torch.eye(w.shape[1]), bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                              clip_steps=cfg.clip_steps, clip_min_ratio=cfg.clip_min_ratio, fp16_scales=True)
        got = q.model.get_submodule(r.name).dequantize_weight().float()
        torch.testing.assert_close(got, torch.as_tensor(rtn.dequantize()).float(), rtol=0, atol=1e-6)
        assert got.abs().sum() > 0


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_quantized_moe_checkpoint_round_trip(gptqkit, arch, tmp_path):
    """Every expert layer is quantized and saved per expert (``mlp.experts.<e>.gate_proj.qweight``,
    the names Qwen-MoE publishes and GPTQModel writes); loading splits the model it builds the same
    way and reproduces the logits exactly. Qwen2-MoE's one-output shared_expert_gate stays in full
    precision."""
    from safetensors import safe_open

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.nn import QuantLinear

    model = make_tiny_model(arch)
    with torch.no_grad():
        fp = model(HELD_OUT).logits
    q = GPTQForCausalLM(model, QuantizeConfig(group_size=GROUP))
    report = q.quantize(_tokens(16, 32), batch_size=4, progress=False)
    with torch.no_grad():
        ours = q.model(HELD_OUT).logits
    assert (ours - fp).abs().max() < 0.25 * fp.abs().max()  # quantized, still the same model
    quantized = {n for n, m in q.model.named_modules() if isinstance(m, QuantLinear)}
    for b in range(2):
        for e in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{b}.mlp.experts.{e}.{proj}" in quantized
    narrow = [n for n in report.skipped if n.endswith("shared_expert_gate")]
    assert len(narrow) == (2 if arch == "qwen2_moe" else 0)
    q.save_quantized(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.down_proj.qweight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    if arch == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate.weight" in keys
        # declared, so that transformers/optimum (which convert every Linear of a block not left out of
        # modules_in_block_to_quantize) and GPTQModel (dynamic rules) keep it in full precision too
        block0 = [n for n, m in q.model.model.layers[0].named_modules() if isinstance(m, QuantLinear)]
        assert len(block0) == 4 + 3 * EXPERTS + 3 and "mlp.shared_expert_gate" not in block0
        assert qc["modules_in_block_to_quantize"] == [block0]
        assert qc["dynamic"] == {r"-:model\.layers\.\d+\.mlp\.shared_expert_gate$": {}}
        declared = QuantizeConfig.from_quantization_config(qc)
        assert all(declared.resolve(n) is None for n in narrow)
        assert all(declared.resolve(n) is not None for n in quantized)
    else:  # nothing left in full precision: the config is the plain one
        assert "modules_in_block_to_quantize" not in qc and "dynamic" not in qc
    loaded = GPTQForCausalLM.from_quantized(tmp_path)
    assert {n for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)} == quantized
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(HELD_OUT).logits, ours, rtol=0, atol=0)


def test_interrupted_moe_run_resumes_to_the_same_checkpoint(gptqkit, tmp_path):
    """A Mixtral run stopped after block 0 resumes from the stored block (per-expert layers
    included) and ends with the uninterrupted run's packed tensors."""
    import gptqkit.model
    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.nn import QuantLinear

    calibration = _tokens(8, 32, seed=5)
    full = GPTQForCausalLM(make_tiny_model("mixtral"), QuantizeConfig(group_size=GROUP))
    full.quantize(calibration, batch_size=4, progress=False)

    class Crash(Exception):
        pass

    original = gptqkit.model.GPTQForCausalLM._quantize_layer

    def crash_in_block_1(self, parent, name, full_name, *args, **kwargs):
        if full_name.startswith("model.layers.1.mlp.experts.2"):
            raise Crash
        return original(self, parent, name, full_name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqkit.model.GPTQForCausalLM, "_quantize_layer", crash_in_block_1)
        with pytest.raises(Crash):
            GPTQForCausalLM(make_tiny_model("mixtral"), QuantizeConfig(group_size=GROUP)).quantize(
                calibration, batch_size=4, progress=False, resume_dir=tmp_path / "resume")
    resumed = GPTQForCausalLM(make_tiny_model("mixtral"), QuantizeConfig(group_size=GROUP))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = resumed.quantize(calibration, batch_size=4, progress=False, resume_dir=tmp_path / "resume")
    assert len(report.layers) == len(full.report.layers)
    ours = {n: m for n, m in resumed.model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in full.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(ours) == set(theirs) and len(ours) == 2 * (4 + 3 * EXPERTS)
    for n, layer in ours.items():
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(layer, t), getattr(theirs[n], t)), (n, t)


def test_mixtral_checkpoints_with_transformers_4_names_load(gptqkit, tmp_path):
    """Most Mixtral GPTQ checkpoints (and vLLM's Mixtral reader) name the experts as transformers
    4 did: ``block_sparse_moe.experts.<e>.w1/w3/w2`` and ``block_sparse_moe.gate``. Such a
    checkpoint (made here by renaming a gptqkit one's tensors) loads to the same logits."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    from gptqkit import GPTQForCausalLM, QuantizeConfig

    q = GPTQForCausalLM(make_tiny_model("mixtral"), QuantizeConfig(group_size=GROUP))
    q.quantize(_tokens(8, 32), batch_size=4, progress=False)
    q.save_quantized(tmp_path / "new")
    renames = [(r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
               (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
               (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
               (r"\.mlp\.gate\.", r".block_sparse_moe.gate.")]
    tensors = {}
    for key, value in load_file(str(tmp_path / "new" / "model.safetensors")).items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        tensors[key] = value
    assert "model.layers.0.block_sparse_moe.experts.3.w2.qweight" in tensors
    assert "model.layers.1.block_sparse_moe.gate.weight" in tensors
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, str(old / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "quantize_config.json"):
        (old / name).write_text((tmp_path / "new" / name).read_text())
    json.loads((old / "config.json").read_text())["quantization_config"]  # still a GPTQ checkpoint
    loaded = GPTQForCausalLM.from_quantized(old)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(HELD_OUT).logits, q.model(HELD_OUT).logits, rtol=0, atol=0)


def test_trace_groups_puts_every_expert_in_its_stage(gptqkit):
    """discovery.trace_groups on a split model: every expert's gate/up in one group, every down
    projection in the next, including experts the example input was not routed to (no warning)."""
    from gptqkit.discovery import trace_groups
    from gptqkit.moe import defuse_experts

    model = make_tiny_model("mixtral", num_experts_per_tok=1)
    defuse_experts(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = trace_groups(model, _tokens(1, 1))  # one token: one expert reached
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      [f"mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_proj", "up_proj")],
                      [f"mlp.experts.{e}.down_proj" for e in range(EXPERTS)]]


def test_hessian_memory_cap_collects_experts_in_passes_with_the_same_result(gptqkit):
    """Under a ``hessian_memory`` cap the experts' Hessians are collected a slice of experts per
    pass over the calibration data, and the checkpoint is the same, bit for bit."""
    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.nn import QuantLinear

    def run(cap):
        model = make_tiny_model("mixtral")
        routed = []
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(lambda *_: routed.append(1))
        q = GPTQForCausalLM(model, QuantizeConfig(group_size=GROUP))
        report = q.quantize(_tokens(8, 32), batch_size=4, progress=False, hessian_memory=cap)
        packed = {f"{n}.{t}": getattr(m, t).clone() for n, m in q.model.named_modules() if isinstance(m, QuantLinear)
                  for t in ("qweight", "qzeros", "scales", "g_idx")}
        return report, packed, len(routed)

    one_gate_up, one_down = 4 * HIDDEN ** 2, 4 * FFN ** 2  # float32 Hessians: an expert's gate/up share one
    free = run(None)[1:]
    report, packed, router_calls = run(int(2.5 * one_gate_up))  # 2 experts' gate/up per pass; down 1 per pass
    assert one_down > 2.5 * one_gate_up
    assert report.extra_passes == 2 * ((EXPERTS // 2 - 1) + (EXPERTS - 1))  # per block: gate/up, down
    assert "extra pass(es)" in report.summary()
    assert router_calls > free[1]  # the MoE part really ran more often
    assert packed.keys() == free[0].keys()
    for name, tensor in packed.items():
        assert torch.equal(tensor, free[0][name]), name
    with pytest.raises(ValueError, match="hessian_memory"):
        GPTQForCausalLM(make_tiny_model("mixtral"), QuantizeConfig(group_size=GROUP)).quantize(
            _tokens(2, 16), progress=False, hessian_memory="lots")


@pytest.mark.parametrize("arch,dense_block", [("qwen2_moe", 0), ("qwen3_moe", 1)])
def test_models_mixing_dense_and_moe_blocks(gptqkit, arch, dense_block, tmp_path):
    """Blocks of two kinds (DeepSeek's first dense blocks, Qwen-MoE's ``mlp_only_layers``): each kind
    gets its own traced groups, every layer is quantized and the checkpoint reloads exactly."""
    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.nn import QuantLinear

    model = make_tiny_model(arch, mlp_only_layers=[dense_block])
    q = GPTQForCausalLM(model, QuantizeConfig(group_size=GROUP))
    report = q.quantize(_tokens(8, 32), batch_size=4, progress=False)
    moe_block = 1 - dense_block
    dense = {f"model.layers.{dense_block}.{n}" for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    experts = {f"model.layers.{moe_block}.mlp.experts.{e}.{p}" for e in range(EXPERTS)
               for p in ("gate_proj", "up_proj", "down_proj")}
    quantized = {n for n, m in q.model.named_modules() if isinstance(m, QuantLinear)}
    assert dense | experts <= quantized and {r.name for r in report.layers} == quantized
    assert all(r.tokens > 0 for r in report.layers if r.name in dense)
    q.save_quantized(tmp_path)
    loaded = GPTQForCausalLM.from_quantized(tmp_path)
    assert {n for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)} == quantized
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(HELD_OUT).logits, q.model(HELD_OUT).logits, rtol=0, atol=0)
