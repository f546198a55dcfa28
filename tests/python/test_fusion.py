"""Fused sibling projections (gptqkit.nn.fusion): one GEMM for q/k/v and for gate/up.

The reference is always the same model unfused: on the CPU each output
column of the fused GEMM is computed exactly as the separate layer computes
it, so logits must be identical, and unfusing must give back bit-identical
tensors.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from packed_layers import random_packed_layer  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

IDS = torch.tensor([[5, 17, 99, 4, 56, 21, 8, 127], [3, 3, 6, 7, 100, 1, 2, 9]])


def _quantize_randomly(gptqkit, model, bits=4, group_size=32, act_order=False, fmt="v1"):
    """Every nn.Linear of the decoder blocks -> a QuantLinear with random codes; siblings get
    one shared act-order g_idx (they read the same input, so GPTQ gives them one permutation)."""
    from gptqkit.nn import QuantLinear

    seed = 0
    for parent_name, parent in list(model.named_modules()):
        g_idx = None
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or "lm_head" in name:
                continue
            seed += 1
            packed = random_packed_layer(gptqkit, child.out_features, child.in_features, bits, group_size,
                                         act_order=act_order, fmt=fmt, seed=seed, scale_dtype=torch.float32)
            if act_order:
                g_idx = packed.g_idx if g_idx is None or len(g_idx) != child.in_features else g_idx
                packed.g_idx = g_idx.clone()
            bias = None if child.bias is None else torch.randn(child.out_features) * 0.1
            setattr(parent, name, QuantLinear.from_packed(packed, bias=bias, group_size=group_size))
    return model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _count_calls(model, cls):
    calls = []
    for m in model.modules():
        if type(m) is cls:
            m.register_forward_hook(lambda mod, args, out: calls.append(mod))
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "opt", "phi", "gpt2"])
def test_fused_model_gives_identical_logits_and_state(gptqkit, arch):
    """Groups are found by the probe, the fused model's logits equal the unfused ones exactly, its
    state_dict keeps the checkpoint keys and values, and unfusing restores the original layers."""
    from gptqkit.nn import FusedProjection, QuantLinear, fuse_projections, fused_groups, unfuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model(arch))
    ref, state = _logits(model), _state(model)
    groups = fuse_projections(model)
    expected = {
        "llama": {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")},
        "qwen2": {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")},  # q/k/v with biases
        "qwen3": {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")},  # q/k norms after the views
        "gemma": {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")},
        "opt": {("k_proj", "v_proj", "q_proj")},  # registration order
        "phi": {("q_proj", "k_proj", "v_proj")},  # fc1 reads the same tensor but lives in another module
        "gpt2": set(),  # c_attn is fused already; nothing reads a shared input
    }[arch]
    assert {g.members for g in groups} == expected
    assert len(groups) == 2 * len(expected) and fused_groups(model) == groups
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)
    _assert_same_state(_state(model), state)
    assert sum(isinstance(m, FusedProjection) for m in model.modules()) == 2 * sum(len(m) for m in expected)

    assert unfuse_projections(model) == groups
    assert not fused_groups(model) and not any(isinstance(m, FusedProjection) for m in model.modules())
    assert all(type(m) is QuantLinear for m in model.modules() if isinstance(m, QuantLinear))
    _assert_same_state(_state(model), state)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


def test_each_group_runs_one_gemm_per_forward(gptqkit):
    from gptqkit.nn import FusedQuantLinear, QuantLinear, fuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama"))
    separate = _count_calls(model, QuantLinear)
    _logits(model)
    assert len(separate) == 2 * 7
    fuse_projections(model)
    fused, remaining = _count_calls(model, FusedQuantLinear), _count_calls(model, QuantLinear)
    _logits(model)
    assert len(fused) == 2 * 2 and len(remaining) == 2 * 2  # per block: qkv, gate_up; o, down
    shared = [m.__dict__["_shared"] for m in model.modules() if hasattr(m, "_shared")]
    assert shared and all(s.entry is None for s in shared)  # nothing kept after the step


def test_generate_with_cache_is_unchanged(gptqkit):
    from gptqkit.nn import fuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama"), act_order=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=1)
    with torch.inference_mode():
        want = model.generate(IDS, **kw)
    assert len(fuse_projections(model)) == 4
    with torch.inference_mode():
        assert torch.equal(model.generate(IDS, **kw), want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_odd_widths_bits_and_mixed_biases_round_trip(gptqkit, bits, fmt):
    """Members 13, 7 and 21 wide (3-bit zero points straddle words at every boundary), only the
    middle one with a bias: outputs, state_dict and the unfused tensors are exact."""
    from gptqkit.nn import QuantLinear, fuse_projections, unfuse_projections

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            for i, (name, n) in enumerate((("a", 13), ("b", 7), ("c", 21))):
                packed = random_packed_layer(gptqkit, n, 40, bits, 16, act_order=True, fmt=fmt, seed=0,
                                             scale_dtype=torch.float32)
                packed.g_idx = random_packed_layer(gptqkit, 1, 40, bits, 16, act_order=True, seed=9).g_idx
                bias = torch.randn(n) if name == "b" else None
                setattr(self, name, QuantLinear.from_packed(packed, bias=bias, group_size=16))

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x) * 2, self.c(x)], dim=-1)

    model = Three()
    x = torch.randn(3, 40)
    ref, state = model(x), _state(model)
    assert fuse_projections(model, example_inputs=x) == [("", ("a", "b", "c"))]
    assert model.fused_a_b_c.out_features == 41 and model.b.out_features == 7
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    _assert_same_state(_state(model), state)
    assert "b.bias" in state and "a.bias" not in model.state_dict()
    unfuse_projections(model)
    _assert_same_state(_state(model), state)
    assert model.a.bias is None and model.b.bias is not None


def test_only_siblings_reading_one_tensor_are_grouped(gptqkit):
    """Cross-attention: q reads the decoder state, k and v the encoder's; layers that cannot share a
    GEMM (other bits, other g_idx) stay apart; explicit groups of such layers are refused."""
    from gptqkit.nn import QuantLinear, find_fusable_groups, fuse_projections

    def layer(n, bits=4, seed=0, act_order=False):
        return QuantLinear.from_packed(random_packed_layer(gptqkit, n, 32, bits, 16, act_order=act_order,
                                                           seed=seed, scale_dtype=torch.float32), group_size=16)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = layer(8), layer(8, seed=1), layer(8, seed=2)
            self.w3 = layer(8, bits=3)  # reads the decoder state too, but 3-bit
            self.p1, self.p2 = layer(8, act_order=True, seed=3), layer(8, act_order=True, seed=4)

        def forward(self, h, enc):
            return self.q(h) + self.w3(h) + self.k(enc) * self.v(enc) + self.p1(enc) - self.p2(enc)

    model = Cross()
    h, enc = torch.randn(2, 32), torch.randn(2, 32)
    ref = model(h, enc)
    assert find_fusable_groups(model, (h, enc)) == [("", ("k", "v"))]
    with pytest.raises(ValueError, match="different g_idx"):
        fuse_projections(model, groups=[("", ("p1", "p2"))], example_inputs=(h, enc))
    with pytest.raises(ValueError, match="different bits"):
        fuse_projections(model, groups=[("", ("q", "w3"))], example_inputs=(h, enc))
    with pytest.raises(ValueError, match="not a QuantLinear"):
        fuse_projections(model, groups=[("", ("q", "nope"))], example_inputs=(h, enc))
    assert all(type(getattr(model, n)) is QuantLinear for n in ("q", "k", "v", "w3", "p1", "p2"))
    assert fuse_projections(model, example_inputs=(h, enc)) == [("", ("k", "v"))]
    torch.testing.assert_close(model(h, enc), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different g_idx"):  # a failed call leaves earlier fusions alone
        fuse_projections(model, groups=[("", ("p1", "p2"))], example_inputs=(h, enc))
    assert hasattr(model, "fused_k_v")


def test_members_called_with_other_inputs_compute_their_own(gptqkit):
    """The fused output is reused only for the identical, unmodified input tensor."""
    from gptqkit.nn import fuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama"))
    attn = model.model.layers[0].self_attn
    unfused = copy.deepcopy(attn)
    fuse_projections(model)
    x, other = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    q = attn.q_proj(x)
    torch.testing.assert_close(attn.k_proj(other), unfused.k_proj(other), rtol=0, atol=0)  # another tensor
    torch.testing.assert_close(attn.k_proj(x), unfused.k_proj(x), rtol=0, atol=0)
    torch.testing.assert_close(q, unfused.q_proj(x), rtol=0, atol=0)
    x2 = x.clone()
    attn.q_proj(x2)
    x2.add_(1.0)  # changed in place after q_proj saw it: k_proj must not reuse q_proj's output
    torch.testing.assert_close(attn.k_proj(x2), unfused.k_proj(x2), rtol=0, atol=0)
    torch.testing.assert_close(attn.v_proj(x), unfused.v_proj(x), rtol=0, atol=0)
    with torch.inference_mode():  # inference tensors have no version counter
        xi = x.clone()
        torch.testing.assert_close(attn.q_proj(xi), unfused.q_proj(xi), rtol=0, atol=0)
        torch.testing.assert_close(attn.v_proj(xi), unfused.v_proj(xi), rtol=0, atol=0)


def test_gradients_reach_the_input(gptqkit):
    from gptqkit.nn import fuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama"))
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 4, 64, requires_grad=True)
    mlp(x).square().sum().backward()
    want = x.grad.clone()
    fuse_projections(model)
    x.grad = None
    mlp(x).square().sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


def test_load_state_dict_into_a_fused_model(gptqkit):
    from gptqkit.nn import fuse_projections

    source = _quantize_randomly(gptqkit, make_tiny_model("llama"))
    target = _quantize_randomly(gptqkit, make_tiny_model("llama", seed=1), bits=4)
    for m in target.modules():  # other codes, same shapes
        if hasattr(m, "qweight"):
            m.qweight.copy_(m.qweight ^ 0x5A5A5A5A)
    fuse_projections(target)
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(_logits(target), _logits(source), rtol=0, atol=0)
    bad = source.state_dict()
    bad["model.layers.0.self_attn.k_proj.scales"] = bad["model.layers.0.self_attn.k_proj.scales"][:, :5]
    with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.self_attn.k_proj.scales"):
        target.load_state_dict(bad)
    del bad["model.layers.0.self_attn.k_proj.scales"]
    with pytest.raises(RuntimeError, match="Missing key.*k_proj.scales"):
        target.load_state_dict(bad)


def test_deepcopy_gives_an_independent_fused_model(gptqkit):
    from gptqkit.nn import fuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama"))
    ref = _logits(model)
    fuse_projections(model)
    twin = copy.deepcopy(model)
    attn, twin_attn = model.model.layers[0].self_attn, twin.model.layers[0].self_attn
    assert twin_attn.k_proj._fused is twin_attn.fused_q_proj_k_proj_v_proj
    assert twin_attn.k_proj._fused is not attn.k_proj._fused
    torch.testing.assert_close(_logits(twin), ref, rtol=0, atol=0)
    twin_attn.fused_q_proj_k_proj_v_proj.scales.mul_(2)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


def test_a_model_that_needs_contiguous_outputs_is_left_unfused(gptqkit):
    """The check after fusing runs the probe again; a forward that fails on the column views undoes
    the fusion with a warning."""
    from gptqkit.nn import QuantLinear, fuse_projections

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = QuantLinear.from_packed(random_packed_layer(gptqkit, 8, 32, 4, 16, seed=1), group_size=16)
            self.b = QuantLinear.from_packed(random_packed_layer(gptqkit, 8, 32, 4, 16, seed=2), group_size=16)

        def forward(self, x):
            return self.a(x).view(-1) + self.b(x).view(-1)  # .view needs contiguous outputs

    model = Flat()
    x = torch.randn(3, 32)
    ref = model(x)
    with pytest.warns(RuntimeWarning, match="left the model unfused: the fused model's forward failed"):
        assert fuse_projections(model, example_inputs=x) == []
    assert type(model.a) is QuantLinear and not hasattr(model, "fused_a_b")
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_fused_projection_traces_into_one_graph(gptqkit):
    """Under torch.compile the reuse of the fused output is plain attribute traffic: one graph, one
    GEMM, nothing kept afterwards (a dense stand-in for the fused layer keeps the graph free of the
    CPU kernel's call, which is not a torch op; on a GPU the layer is the custom op)."""
    from gptqkit.nn.fusion import FusedProjection, _Member, _SharedOutput

    class Stand(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 12)
            self.in_features, self.bits, self.group_size = 8, 4, -1
            self.members = (_Member("a", 0, 4, False), _Member("b", 4, 8, False), _Member("c", 8, 12, False))

        def forward(self, x):
            return self.lin(x)

    fused, shared = Stand(), _SharedOutput()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (FusedProjection(fused, shared, m) for m in fused.members)
            self.fused = fused

        def forward(self, h):
            return self.a(h) * self.b(h) + self.c(h)

    block = Block()
    x = torch.randn(3, 8)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_count == 1 and not explained.break_reasons
    assert str(explained.graphs[0].code).count("linear(") == 1
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), block(x))
    assert shared.entry is None


def test_save_refuses_fused_models_and_save_quantized_unfuses(gptqkit, tmp_path):
    from tiny_models import make_tiny_tokenizer

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.checkpoint import CheckpointError, save_checkpoint
    from gptqkit.nn import fuse_projections, fused_groups

    q = GPTQForCausalLM(make_tiny_model("llama"), QuantizeConfig(bits=4, group_size=32),
                        tokenizer=make_tiny_tokenizer())
    q.quantize(torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0)), progress=False)
    ref = _logits(q.model)
    groups = fuse_projections(q.model)
    qc = q.quantize_config.to_quantization_config()
    with pytest.raises(CheckpointError, match="unfuse_projections"):
        save_checkpoint(q.model, tmp_path / "direct", qc, qc)
    assert not (tmp_path / "direct").exists()
    q.save_quantized(tmp_path / "ckpt")
    assert fused_groups(q.model) == groups  # fused again after saving
    plain = GPTQForCausalLM.from_quantized(tmp_path / "ckpt")
    fused = GPTQForCausalLM.from_quantized(tmp_path / "ckpt", fuse=True)
    assert not fused_groups(plain.model) and fused_groups(fused.model) == groups
    for model in (plain.model, fused.model):
        torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


def test_probe_failure_is_reported(gptqkit):
    from gptqkit.nn import fuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama"))
    with pytest.raises(IndexError):  # token ids beyond the vocabulary: the model's own error surfaces
        fuse_projections(model, example_inputs={"input_ids": torch.tensor([[500]])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fuse_projections(model)) == 4


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_moe_experts_fuse_their_gate_and_up(gptqkit, arch):
    """gptqkit splits the experts into per-expert layers; each expert's gate/up read the tokens
    routed to it (GPT-OSS: its interleaved, clamped gate included)."""
    from tiny_models import make_tiny_tokenizer

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.nn import fuse_projections

    q = GPTQForCausalLM(make_tiny_model(arch), QuantizeConfig(bits=4, group_size=32), tokenizer=make_tiny_tokenizer())
    q.quantize(torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0)), progress=False)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _logits(q.model, ids)
    groups = fuse_projections(q.model, example_inputs={"input_ids": ids})
    experts = [g for g in groups if ".experts." in g.parent]
    assert experts and all(g.members == ("gate_proj", "up_proj") for g in experts)
    torch.testing.assert_close(_logits(q.model, ids), ref, rtol=0, atol=0)


def test_a_model_in_training_mode_fuses_and_stays_in_training_mode(gptqkit):
    """The probe runs in eval mode (dropout would make the check compare noise); the model's
    training flags are left as they were."""
    from gptqkit.nn import fuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama", attention_dropout=0.5))
    model.train()
    model.model.layers[1].eval()  # a mixed state, restored as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fuse_projections(model)) == 4
    assert model.training and model.model.layers[0].self_attn.training
    assert not model.model.layers[1].training and not model.model.layers[1].mlp.training
    assert model.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj.training
