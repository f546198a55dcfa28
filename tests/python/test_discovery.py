"""Model structure discovery on tiny randomly initialised models of every supported family."""

from __future__ import annotations

import pytest
torch = pytest.importorskip("torch")
from torch import nn

pytest.importorskip("transformers")

from gptqkit.discovery import (LayerTracer, ModelLayout, UnsupportedModelError, find_blocks, find_layout,
                               find_linear_layers, get_weight, is_linear_like, layer_shape, set_weight,
                               trace_groups, validate_groups)
from tiny_models import ARCHITECTURES, EXPECTED, make_tiny_model

# Written out per family from the transformers modelling code (see tiny_models.EXPECTED for groups).
EXPECTED_PRE_POST = {
    "llama": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "mistral": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "qwen2": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "qwen3": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "gemma": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "gemma2": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "gemma3_text": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "phi3": (["model.embed_tokens", "model.rotary_emb"], ["model.norm", "lm_head"]),
    "phi": (["model.embed_tokens", "model.embed_dropout", "model.rotary_emb"], ["model.final_layernorm", "lm_head"]),
    "opt": (["model.decoder.embed_tokens", "model.decoder.embed_positions"],
            ["model.decoder.final_layer_norm", "lm_head"]),
    "gpt2": (["transformer.wte", "transformer.wpe", "transformer.drop"], ["transformer.ln_f", "lm_head"]),
    "gpt_neox": (["gpt_neox.embed_in", "gpt_neox.emb_dropout", "gpt_neox.rotary_emb"],
                 ["gpt_neox.final_layer_norm", "lm_head"]),
}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_tiny_model(arch)
        return cache[arch]
    return get


def _ids(n=12, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, (batch, n), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_and_groups(arch, models):
    model = models(arch)
    blocks_path, groups = EXPECTED[arch]
    layout = find_layout(model)
    assert layout.blocks_path == blocks_path
    assert layout.num_blocks == 2
    assert layout.blocks(model) is model.get_submodule(blocks_path)
    assert sorted(layout.linear_names) == sorted(n for g in groups for n in g)
    pre, post = EXPECTED_PRE_POST[arch]
    assert layout.pre_modules == pre
    assert layout.post_modules == post
    assert layout.lm_head_name == "lm_head"
    assert layout.tied_lm_head == bool(model.config.tie_word_embeddings)
    assert layout.groups is None
    assert trace_groups(model, _ids(), layout) == groups
    # the same with a padded batch of two
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    assert trace_groups(model, _ids(batch=2), layout, attention_mask=mask) == groups


def test_gpt2_uses_conv1d(models):
    from transformers.pytorch_utils import Conv1D
    model = models("gpt2")
    block = find_layout(model).blocks(model)[0]
    layers = find_linear_layers(block)
    assert all(isinstance(m, Conv1D) for m in layers.values())
    c_fc = layers["mlp.c_fc"]
    n, k = layer_shape(c_fc)
    assert (n, k) == (c_fc.nf, c_fc.weight.shape[0])
    W = get_weight(c_fc)
    assert W.shape == (n, k) and W.is_contiguous()
    x = torch.randn(3, k)
    torch.testing.assert_close(c_fc(x), x @ W.T + c_fc.bias)
    W2 = torch.randn(n, k)
    set_weight(c_fc, W2)
    torch.testing.assert_close(c_fc(x), x @ W2.T + c_fc.bias)
    torch.testing.assert_close(get_weight(c_fc), W2)


def test_weight_helpers_linear():
    lin = nn.Linear(6, 4)
    W = get_weight(lin, dtype=torch.float64)
    assert W.dtype == torch.float64 and W.shape == (4, 6)
    W += 1.0  # never aliases the parameter
    assert not torch.equal(lin.weight.double(), W)
    set_weight(lin, W)
    torch.testing.assert_close(lin.weight, W.float())
    with pytest.raises(ValueError, match=r"\[4, 6\]"):
        set_weight(lin, torch.zeros(6, 4))
    with pytest.raises(TypeError):
        layer_shape(nn.LayerNorm(4))
    assert is_linear_like(lin) and not is_linear_like(nn.Embedding(3, 3))


def test_layer_tracer_on_block_directly(models):
    """The orchestrator's use: trace block 0 while it runs on captured inputs."""
    model = models("llama")
    layout = find_layout(model)
    captured = {}

    def grab(_m, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise RuntimeError("stop")

    h = layout.blocks(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    with pytest.raises(RuntimeError, match="stop"), torch.no_grad():
        model(_ids())
    h.remove()
    block = layout.blocks(model)[0]
    with LayerTracer(block) as tracer, torch.no_grad():
        block(*captured["args"], **captured["kwargs"])
        block(*captured["args"], **captured["kwargs"])   # second batch: ignored
    assert tracer.groups() == EXPECTED["llama"][1]
    assert tracer.not_executed == []
    assert tracer._handles == [] and tracer._keep == []
    # no hooks left behind
    assert all(not m._forward_pre_hooks for m in block.modules())


def test_tracer_subset_and_unknown(models):
    block = find_layout(models("llama")).blocks(models("llama"))[0]
    t = LayerTracer(block, ["mlp.down_proj"])
    assert list(t.layers) == ["mlp.down_proj"]
    with pytest.raises(ValueError, match="nope"):
        LayerTracer(block, ["nope"])


def test_inplace_modified_input_is_a_new_group():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = x * 1.0
            ya = self.a(h)
            h.add_(1.0)            # same storage, new content: c must not join a's group
            return ya + self.b(ya) + self.c(h)

    blk = Block()
    with LayerTracer(blk) as t, torch.no_grad():
        blk(torch.randn(2, 4))
    assert t.groups() == [["a"], ["b"], ["c"]]


def test_moe_experts_are_not_the_blocks():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.experts = nn.ModuleList(Expert() for _ in range(8))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList(Layer() for _ in range(3))
            self.head = nn.Linear(8, 10)

    path, blocks = find_blocks(Model())
    assert path == "layers" and len(blocks) == 3


def test_unsupported_model_has_override_hint():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError, match="ModelLayout") as exc:
        find_layout(model)
    assert isinstance(exc.value, ValueError)
    # a list of bare Linear layers is not a list of blocks
    with pytest.raises(UnsupportedModelError, match="blocks_path"):
        find_blocks(nn.ModuleDict({"lins": nn.ModuleList(nn.Linear(2, 2) for _ in range(4))}))


def test_override(models):
    model = models("llama")
    groups = [["self_attn.q_proj"], ["self_attn.k_proj", "self_attn.v_proj"], ["mlp.down_proj"]]
    layout = find_layout(model, ModelLayout(blocks_path="model.layers", groups=groups))
    assert layout.groups == groups and layout.blocks_path == "model.layers"
    assert layout.pre_modules == ["model.embed_tokens", "model.rotary_emb"]
    layout = find_layout(model, ModelLayout(blocks_path="model.layers", pre_modules=["model.embed_tokens"],
                                            post_modules=["model.norm"]))
    assert layout.pre_modules == ["model.embed_tokens"] and layout.post_modules == ["model.norm"]
    with pytest.raises(UnsupportedModelError, match="blocks_path"):
        find_layout(model, ModelLayout(blocks_path="model.blocks"))
    with pytest.raises(UnsupportedModelError, match="blocks_path"):
        find_layout(model, ModelLayout(blocks_path="model.norm"))
    with pytest.raises(ValueError, match="self_attn.w_proj"):
        find_layout(model, ModelLayout(blocks_path="model.layers", groups=[["self_attn.w_proj"]]))
    with pytest.raises(ValueError, match="more than once"):
        find_layout(model, ModelLayout(blocks_path="model.layers", groups=[["mlp.up_proj"], ["mlp.up_proj"]]))
    with pytest.raises(UnsupportedModelError, match="pre_modules"):
        find_layout(model, ModelLayout(blocks_path="model.layers", pre_modules=["model.nothing"]))


def test_override_with_deeper_path():
    """A model whose blocks discovery would not pick (two lists), fixed by the override."""
    class Blk(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc = nn.Linear(d, d)

        def forward(self, x):
            return self.fc(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapters = nn.ModuleList(Blk(4) for _ in range(5))
            self.layers = nn.ModuleList(Blk(4) for _ in range(3))

    m = Model()
    assert find_blocks(m)[0] == "adapters"    # longest list wins
    layout = find_layout(m, ModelLayout(blocks_path="layers", groups=[["fc"]]), trace_pre=False)
    assert layout.blocks_path == "layers" and layout.groups == [["fc"]] and layout.num_blocks == 3


def test_validate_groups(models):
    block = find_layout(models("gpt2")).blocks(models("gpt2"))[0]
    assert validate_groups(block, (("attn.c_attn",),)) == [["attn.c_attn"]]
    with pytest.raises(ValueError, match="groups"):
        validate_groups(block, "attn.c_attn")
    with pytest.raises(ValueError, match=r"groups\[0\]"):
        validate_groups(block, [[]])


def test_static_classification_without_forward(models):
    layout = find_layout(models("llama"), trace_pre=False)
    assert layout.pre_modules == ["model.embed_tokens", "model.rotary_emb"]
    assert layout.post_modules == ["model.norm", "lm_head"]


def test_meta_device_model_falls_back():
    from transformers import AutoModelForCausalLM
    from tiny_models import make_tiny_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_tiny_config("opt"))
    layout = find_layout(model)
    assert layout.blocks_path == "model.decoder.layers"
    assert layout.pre_modules == ["model.decoder.embed_tokens", "model.decoder.embed_positions"]
    assert layout.post_modules == ["model.decoder.final_layer_norm", "lm_head"]
    assert layout.to_dict()["blocks_path"] == "model.decoder.layers"
