"""Bad input to :class:`gptqkit.GPTQForCausalLM`: each case must fail with a clear error.

Unsupported models, malformed or empty calibration data, sequences beyond
the model's context, misuse of the wrapper (quantizing twice, saving before
quantizing), and damaged checkpoints (a quantize_config contradicting the
tensors, a truncated safetensors file, a missing or mis-shaped tensor).
Failing calls must leave the wrapper usable. Models are the tiny random ones
of ``tiny_models.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from tiny_models import MAX_POS, VOCAB, make_tiny_model, make_tiny_tokenizer  # noqa: E402

GROUP = 32


pytestmark = pytest.mark.usefixtures("fast_cpu")  # conftest: one thread, frozen GC


def _tokens(n=4, seqlen=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, seqlen), generator=g)


def _wrapper(arch="llama", tokenizer=None, **cfg):
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    cfg.setdefault("group_size", GROUP)
    return GPTQForCausalLM(make_tiny_model(arch), QuantizeConfig(**cfg), tokenizer=tokenizer)


def _assert_untouched(q, use_cache=True):
    """A failed quantize leaves no QuantLinear behind and the model config as it was."""
    from gptqkit.nn import QuantLinear

    assert not q.quantized and q.report is None
    assert not any(isinstance(m, QuantLinear) for m in q.model.modules())
    assert q.model.config.use_cache is use_cache


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- unsupported models

class _NoBlocks(nn.Module):
    """A language model without any list of repeated blocks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.head(torch.relu(self.proj(self.embed(input_ids))))


def test_unsupported_model_names_the_override(gptqkit):
    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.discovery import UnsupportedModelError

    q = GPTQForCausalLM(_NoBlocks(), QuantizeConfig(bits=4, group_size=GROUP))
    with pytest.raises(UnsupportedModelError) as info:
        q.quantize(_tokens(), progress=False)
    msg = str(info.value)
    assert "repeated decoder blocks" in msg and "_NoBlocks" in msg
    assert "ModelLayout(blocks_path=" in msg and "layout=" in msg  # how to override discovery
    assert isinstance(info.value, ValueError)
    assert not q.quantized and isinstance(q.model.proj, nn.Linear)


def test_wrong_layout_override(gptqkit):
    from gptqkit import GPTQForCausalLM, ModelLayout, QuantizeConfig
    from gptqkit.discovery import UnsupportedModelError

    q = GPTQForCausalLM(make_tiny_model("llama"), QuantizeConfig(group_size=GROUP),
                        layout=ModelLayout(blocks_path="model.blocks"))
    with pytest.raises(UnsupportedModelError, match="blocks_path.*'model.blocks'"):
        q.quantize(_tokens(), progress=False)
    _assert_untouched(q)

    q = GPTQForCausalLM(make_tiny_model("llama"), QuantizeConfig(group_size=GROUP),
                        layout=ModelLayout(blocks_path="model.layers", groups=[["self_attn.qkv"]]))
    with pytest.raises(ValueError, match=r"'self_attn.qkv' is not a Linear-like layer.*self_attn.q_proj"):
        q.quantize(_tokens(), progress=False)
    _assert_untouched(q)


def test_quantize_config_must_be_a_quantize_config(gptqkit):
    from gptqkit import GPTQForCausalLM

    with pytest.raises(TypeError, match="expected a QuantizeConfig, got dict"):
        GPTQForCausalLM(make_tiny_model("llama"), {"bits": 4})


@pytest.mark.parametrize("name", ["mlp.nope", "mlp.act_fn"])
def test_modules_in_block_to_quantize_unknown_layer(gptqkit, name):
    q = _wrapper(modules_in_block_to_quantize=[["self_attn.q_proj"], [name]])
    with pytest.raises(ValueError, match=rf"modules_in_block_to_quantize.*{name}.*mlp\.down_proj"):
        q.quantize(_tokens(), progress=False)
    _assert_untouched(q)


# --------------------------------------------------------------------------- calibration data

MALFORMED = [
    pytest.param([[0.5, 1.5, 2.5]], r"examples\[0\]: token ids must be integers", id="floats"),
    pytest.param(torch.rand(2, 8), r"token ids must be integers, got dtype torch.float32", id="float-tensor"),
    pytest.param([{"ids": [5, 6, 7]}], r"examples\[0\]: a dict example needs 'input_ids'", id="dict-without-ids"),
    pytest.param([{"input_ids": [5, 6, 7]}, {"text": "x"}], r"examples\[1\]: a dict example needs 'input_ids'",
                 id="second-dict-without-ids"),
    pytest.param([{"input_ids": [5, 6, 7], "attention_mask": [1, 1]}], r"examples\[0\]: attention_mask",
                 id="mask-length"),
    pytest.param([{"input_ids": [5, 6, 7], "attention_mask": [1, 2, 1]}], r"expected 0/1", id="mask-values"),
    pytest.param([{"input_ids": "5 6 7"}], r"examples\[0\]\['input_ids'\]", id="ids-as-string"),
    pytest.param([[5, 6, 7], "text"], r"examples\[1\]: mixed example types", id="mixed-types"),
    pytest.param([{"input_ids": [5, 6]}, [7, 8]], r"examples\[1\]: expected a dict", id="dict-then-list"),
    pytest.param([[5, -1, 7]], r"negative token id -1", id="negative-id"),
    pytest.param(torch.full((1, 8), VOCAB + 10), rf"token id {VOCAB + 10} is out of range for a vocabulary of "
                 rf"{VOCAB}", id="id-beyond-vocab"),
    pytest.param(torch.zeros((2, 3, 4), dtype=torch.long), r"expected token ids of shape \[n, seqlen\]",
                 id="3d-tensor"),
    pytest.param(42, r"unsupported type int", id="int"),
    pytest.param({5, 6, 7}, r"unsupported type set", id="set"),
    pytest.param(["some text"], r"pass the model's tokenizer", id="text-without-tokenizer"),
]


@pytest.mark.parametrize("examples,match", MALFORMED)
def test_malformed_calibration(gptqkit, examples, match):
    q = _wrapper()
    with pytest.raises(ValueError, match=match):
        q.quantize(examples, progress=False)
    _assert_untouched(q)


def test_missing_calibration_file(gptqkit, tmp_path):
    q = _wrapper(tokenizer=make_tiny_tokenizer())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        q.quantize(str(tmp_path / "calibration.jsonl"), progress=False)
    with pytest.raises(ValueError, match="is a folder"):
        q.quantize(str(tmp_path), progress=False)
    _assert_untouched(q)


EMPTY = [
    pytest.param([], "examples is an empty list", id="empty-list"),
    pytest.param(torch.zeros((0, 8), dtype=torch.long), r"the token array is empty", id="empty-tensor"),
    pytest.param([{"input_ids": [5, 6, 7], "attention_mask": [0, 0, 0]}], "no example has any .unmasked. token",
                 id="all-masked"),
    pytest.param(["", "   ", "\n"], "every example string is blank", id="blank-strings"),
]


@pytest.mark.parametrize("examples,match", EMPTY)
def test_empty_calibration(gptqkit, examples, match):
    q = _wrapper(tokenizer=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=f"calibration data is empty|{match}") as info:
        q.quantize(examples, progress=False)
    assert "empty" in str(info.value)
    _assert_untouched(q)


def test_empty_calibration_file(gptqkit, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "empty.jsonl").write_text("")
    q = _wrapper(tokenizer=make_tiny_tokenizer())
    for name in ("empty.txt", "empty.jsonl"):
        with pytest.raises(ValueError, match=r"calibration file .*(is empty|holds no text)"):
            q.quantize(str(tmp_path / name), progress=False)
    _assert_untouched(q)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])  # max_position_embeddings / n_positions
def test_sequence_beyond_model_context(gptqkit, arch):
    q = _wrapper(arch)
    use_cache = q.model.config.use_cache
    too_long = _tokens(1, MAX_POS + 1)
    with pytest.raises(ValueError, match=rf"{MAX_POS + 1} tokens, beyond the model's maximum context of {MAX_POS}"):
        q.quantize(too_long, progress=False)
    with pytest.raises(ValueError, match=rf"seqlen={MAX_POS + 1} is beyond the model's maximum context of {MAX_POS}"):
        q.quantize(_tokens(), seqlen=MAX_POS + 1, progress=False)
    _assert_untouched(q, use_cache)

    q = _wrapper(arch, model_seqlen=4 * MAX_POS)
    with pytest.raises(ValueError, match=rf"seqlen={4 * MAX_POS} is beyond the model's maximum context"):
        q.quantize(_tokens(), progress=False)
    _assert_untouched(q, use_cache)


def test_text_windows_beyond_model_context(gptqkit, tmp_path):
    (tmp_path / "calib.txt").write_text("some calibration text\n" * 5)  # 113 characters once joined
    q = _wrapper(tokenizer=make_tiny_tokenizer())
    with pytest.raises(ValueError, match=rf"seqlen={2 * MAX_POS} is beyond the model's maximum context of {MAX_POS}"):
        q.quantize(str(tmp_path / "calib.txt"), seqlen=2 * MAX_POS, nsamples=2, progress=False)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        q.quantize(str(tmp_path / "calib.txt"), seqlen=MAX_POS, nsamples=2, progress=False)
    _assert_untouched(q)


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size: expected a positive integer"),
    (dict(nsamples=0), "nsamples: expected a positive integer"),
    (dict(seqlen=-4), "seqlen: expected a positive integer"),
])
def test_bad_quantize_arguments(gptqkit, kw, match):
    q = _wrapper()
    with pytest.raises(ValueError, match=match):
        q.quantize(_tokens(), progress=False, **kw)
    _assert_untouched(q)


# --------------------------------------------------------------------------- misuse of the wrapper

def test_save_before_quantize(gptqkit, tmp_path):
    q = _wrapper()
    with pytest.raises(RuntimeError, match=r"not quantized yet; call quantize\(examples\) first"):
        q.save_quantized(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_failed_quantize_can_be_retried_but_quantize_twice_cannot(gptqkit, tmp_path):
    from gptqkit import GPTQForCausalLM
    from gptqkit.nn import QuantLinear

    q = _wrapper()
    with pytest.raises(ValueError):
        q.quantize([{"ids": [1]}], progress=False)
    q.quantize(_tokens(), batch_size=2, progress=False)  # the failed call left nothing behind
    assert q.quantized
    packed = {n: m.qweight.clone() for n, m in q.model.named_modules() if isinstance(m, QuantLinear)}
    report = q.report
    with pytest.raises(RuntimeError, match="already quantized"):
        q.quantize(_tokens(seed=1), batch_size=2, progress=False)
    assert q.report is report
    assert all(torch.equal(q.model.get_submodule(n).qweight, w) for n, w in packed.items())

    q.save_quantized(tmp_path / "ckpt")
    q2 = GPTQForCausalLM.from_quantized(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="already quantized"):
        q2.quantize(_tokens(), progress=False)


def test_save_refuses_a_folder_that_is_not_a_checkpoint(gptqkit, tmp_path):
    q = _wrapper()
    q.quantize(_tokens(), batch_size=2, progress=False)
    fp = tmp_path / "fp-model"
    make_tiny_model("llama").save_pretrained(fp)
    before = sorted(p.name for p in fp.iterdir())
    from gptqkit.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint; refusing to replace it"):
        q.save_quantized(fp)
    assert sorted(p.name for p in fp.iterdir()) == before


# --------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def checkpoint(gptqkit, tmp_path_factory):
    """A quantized tiny Llama saved once; tests damage copies of it. Returns (folder, logits)."""
    q = _wrapper("llama")
    q.quantize(_tokens(4, 32), batch_size=2, progress=False)
    folder = tmp_path_factory.mktemp("ckpt") / "llama-gptq"
    q.save_quantized(folder)
    ids = _tokens(1, 12, seed=3)
    return folder, ids, _logits(q.model, ids)


@pytest.fixture
def damaged(checkpoint, tmp_path):
    """A fresh copy of the checkpoint to damage."""
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint[0], folder)
    return folder


def _load(path):
    from gptqkit import GPTQForCausalLM

    return GPTQForCausalLM.from_quantized(path)


def _edit_json(path: Path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _edit_quantization(folder: Path, **changes):
    """Changes the settings in both config.json's quantization_config and quantize_config.json."""
    _edit_json(folder / "config.json", lambda d: d["quantization_config"].update(changes))
    _edit_json(folder / "quantize_config.json", lambda d: d.update(changes))


def _rewrite_tensors(folder: Path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_undamaged_copy_loads(gptqkit, checkpoint, damaged):
    _, ids, logits = checkpoint
    torch.testing.assert_close(_logits(_load(damaged).model, ids), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes,match", [
    pytest.param(dict(bits=8), r"model[.]layers[.]0[.]mlp[.]down_proj[.]qweight: has 16 rows, which fits bits=4 for "
                               r"in_features=128, but the quantization config says bits=8 \(the config contradicts "
                               r"the tensors\)", id="bits"),
    pytest.param(dict(bits=3), r"[.]qweight: has \d+ rows, which fits bits=4 .*says bits=3 \(the config contradicts",
                 id="bits3"),
    pytest.param(dict(group_size=64), r"[.]scales: has 4 groups, but group_size=64 with in_features=128 gives 2 "
                                      r"\(the config contradicts the tensors\)", id="group_size"),
    pytest.param(dict(group_size=-1), r"[.]scales: has \d groups, but group_size=-1 with in_features=\d+ gives 1 "
                                      r"\(the config contradicts", id="group_size-1"),
    pytest.param(dict(dynamic={r"-:.*\.0\.self_attn\.q_proj": {}}),
                 r"dynamic rules skip model.layers.0.self_attn.q_proj, but the checkpoint stores it quantized",
                 id="dynamic-skip"),
    pytest.param(dict(dynamic={r".*\.1\.mlp\.down_proj": {"bits": 8}}),
                 r"layers.1.mlp.down_proj.qweight: .*fits bits=4.*says bits=8", id="dynamic-bits"),
])
def test_quantize_config_contradicting_the_tensors(gptqkit, damaged, changes, match):
    from gptqkit.checkpoint import CheckpointError

    _edit_quantization(damaged, **changes)
    with pytest.raises(CheckpointError, match=match):
        _load(damaged)


def test_config_files_disagreeing(gptqkit, damaged):
    from gptqkit.checkpoint import CheckpointError

    _edit_json(damaged / "quantize_config.json", lambda d: d.update(bits=8))
    with pytest.raises(CheckpointError, match="config.json says bits=4 but quantize_config.json says bits=8"):
        _load(damaged)


def test_invalid_quantize_config_values(gptqkit, damaged):
    from gptqkit.checkpoint import CheckpointError

    _edit_quantization(damaged, bits=5)
    with pytest.raises(CheckpointError, match=r"invalid quantization config: bits: expected one of \(2, 3, 4, 8\)"):
        _load(damaged)


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_truncated_safetensors(gptqkit, damaged, keep):
    from gptqkit.checkpoint import CheckpointError

    path = damaged / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*corrupt or unreadable safetensors file"):
        _load(damaged)


def test_garbage_safetensors(gptqkit, damaged):
    from gptqkit.checkpoint import CheckpointError

    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" * 4)
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors file"):
        _load(damaged)


@pytest.mark.parametrize("victim", [
    "model.layers.0.mlp.down_proj.scales",
    "model.layers.1.self_attn.k_proj.qweight",
    "model.layers.0.self_attn.o_proj.qzeros",
    "model.norm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.embed_tokens.weight",
])
def test_missing_tensor(gptqkit, damaged, victim):
    from gptqkit.checkpoint import CheckpointError

    _rewrite_tensors(damaged, lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=rf"{victim.replace('.', '[.]')}: missing tensor"):
        _load(damaged)


@pytest.mark.parametrize("victim,shape,match", [
    ("model.layers.0.self_attn.q_proj.qweight", (4, 64), r"has 4 rows, which fits bits=2"),
    ("model.layers.0.self_attn.q_proj.qweight", (5, 64), r"expected shape \[8, 64\]"),
    ("model.layers.0.mlp.up_proj.scales", (2, 64), r"expected shape \[2, 128\]"),
    ("model.layers.0.mlp.up_proj.qzeros", (2, 8), r"expected shape \[2, 16\]"),
    ("model.layers.1.self_attn.v_proj.g_idx", (32,), r"expected shape \[64\]"),
    ("model.norm.weight", (32,), r"expected shape \[64\], got \[32\]"),
])
def test_misshaped_tensor(gptqkit, damaged, victim, shape, match):
    from gptqkit.checkpoint import CheckpointError

    def edit(t):
        old = t[victim]
        t[victim] = torch.zeros(shape, dtype=old.dtype)

    _rewrite_tensors(damaged, edit)
    with pytest.raises(CheckpointError, match=rf"{victim.replace('.', '[.]')}: .*{match}"):
        _load(damaged)


def test_g_idx_out_of_range(gptqkit, damaged):
    from gptqkit.checkpoint import CheckpointError

    victim = "model.layers.0.mlp.down_proj.g_idx"

    def edit(t):
        t[victim][5] = 99

    _rewrite_tensors(damaged, edit)
    with pytest.raises(CheckpointError, match=r"down_proj.g_idx: g_idx\[5\] = 99 is out of range \[0, 4\)"):
        _load(damaged)


def test_not_a_checkpoint(gptqkit, tmp_path):
    from gptqkit.checkpoint import CheckpointError

    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        _load(tmp_path / "nowhere")
    make_tiny_model("llama").save_pretrained(tmp_path / "fp")
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        _load(tmp_path / "fp")


@pytest.mark.parametrize("where,dtype,match", [
    ("weight", torch.float32, r"model\.layers\.1\.mlp\.up_proj: weight: contains NaN or Inf.*checkpoint is damaged"),
    ("embedding", torch.float32, r"model\.layers\.0\.self_attn\.q_proj: its input on calibration batch 0: "
                                 r"x: contains NaN or Inf.*calibration inputs overflowed or hold NaN \(check the earlier"),
    ("embedding", torch.bfloat16, r"model\.layers\.0\.self_attn\.q_proj: its input .*NaN.*load it in float32"),
])
def test_layer_errors_name_the_layer_and_the_likely_cause(gptqkit, where, dtype, match):
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    model = make_tiny_model("llama", dtype=dtype)
    tokens = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if where == "weight":
            model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
        else:
            model.model.embed_tokens.weight[int(tokens[0, 3])] = float("nan")
    q = GPTQForCausalLM(model, QuantizeConfig(group_size=32))
    with pytest.raises(ValueError, match=match):
        q.quantize(tokens, progress=False)


def test_indefinite_hessian_error_names_the_layer(gptqkit, monkeypatch):
    from gptqkit import GPTQForCausalLM, NotPositiveDefiniteError, QuantizeConfig
    import gptqkit.model as model_module

    def indefinite(W, H, **kwargs):
        raise NotPositiveDefiniteError("hessian: not positive definite even with damping 100% of the mean diagonal")

    monkeypatch.setattr(model_module, "quantize_weight", indefinite)
    q = GPTQForCausalLM(make_tiny_model("llama"), QuantizeConfig(group_size=32))
    with pytest.raises(NotPositiveDefiniteError, match=r"model\.layers\.0\.self_attn\.q_proj: hessian: .*rank-deficient"):
        q.quantize(torch.randint(4, VOCAB, (2, 16)), progress=False)
