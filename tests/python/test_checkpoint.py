"""Save / load / inspect GPTQ checkpoints (gptqkit.checkpoint).

Tiny randomly initialised transformers models (no download) are quantized
layer by layer with gptqkit.quantize_weight from Hessians of random
activations, their Linear/Conv1D layers replaced by QuantLinear; the
checkpoint written from them must load back into a model whose logits equal
the in-memory ones, and every kind of damage must be reported naming the
file or tensor at fault.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


# --------------------------------------------------------------------------- helpers

def _quantize_model(gptqkit, model, *, bits=4, group_size=32, desc_act=False, sym=True, fmt="v1", seed=0,
                    lm_head=False):
    """Replaces every Linear/Conv1D (but lm_head unless asked) by a GPTQ-quantized QuantLinear."""
    from transformers.pytorch_utils import Conv1D

    from gptqkit.nn import QuantLinear

    g = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if (name.endswith("lm_head") and not lm_head) or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        w = module.weight.detach().float()
        if isinstance(module, Conv1D):
            w = w.T.contiguous()
        k = w.shape[1]
        acc = gptqkit.HessianAccumulator(k)
        acc.add_batch(torch.randn(256, k, generator=g))
        res = gptqkit.quantize_weight(w, acc.hessian(), bits=bits, group_size=group_size, sym=sym,
                                      desc_act=desc_act)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QuantLinear.from_linear(module, res, format=fmt))
    return model.eval()


def _qconfig(**kw):
    from gptqkit.config import QuantizeConfig

    return QuantizeConfig(**kw).to_quantization_config()


def _tiny_llama(gptqkit, seed=0, **quant):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY_LLAMA))
    return _quantize_model(gptqkit, model, **quant)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[3, 17, 99, 4, 56, 21, 8, 127, 0, 64], [5, 5, 6, 7, 100, 1, 2, 3, 4, 9]])


@pytest.fixture(scope="module")
def llama(gptqkit):
    return _tiny_llama(gptqkit)


@pytest.fixture
def saved(llama, tmp_path):
    from gptqkit.checkpoint import save_checkpoint

    cfg = _qconfig(bits=4, group_size=32)
    return Path(save_checkpoint(llama, tmp_path / "ckpt", cfg, cfg))


def _quant_layers(model):
    from gptqkit.nn import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _rewrite(path: Path, edit):
    """Loads every tensor of a single-file checkpoint, applies edit(dict), writes it back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_json(path: Path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- round trips

def test_round_trip_single_file(gptqkit, llama, saved):
    from gptqkit.checkpoint import load_checkpoint

    names = sorted(os.listdir(saved))
    assert {"config.json", "quantize_config.json", "model.safetensors", "generation_config.json"} <= set(names)
    assert not any(n.endswith(".index.json") for n in names)
    assert not any(p.name.startswith(".ckpt.gptqkit") for p in saved.parent.iterdir())

    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert cfg["quantization_config"]["bits"] == 4 and cfg["architectures"] == ["LlamaForCausalLM"]
    qfile = json.loads((saved / "quantize_config.json").read_text())
    assert qfile["group_size"] == 32 and qfile["checkpoint_format"] == "gptq"

    from safetensors import safe_open
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.q_proj.qweight").get_dtype() == "I32"
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"  # unquantized, stored in its dtype
    assert "model.layers.0.mlp.down_proj.g_idx" in keys and "model.layers.0.mlp.down_proj.weight" not in keys

    loaded = load_checkpoint(saved)
    assert not loaded.training
    assert set(_quant_layers(loaded)) == set(_quant_layers(llama)) and len(_quant_layers(loaded)) == 14
    assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert loaded.config.quantization_config["bits"] == 4
    torch.testing.assert_close(_logits(loaded, IDS), _logits(llama, IDS), rtol=0, atol=1e-5)
    out = loaded.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)
    ref = llama.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_sharded_round_trip(gptqkit, llama, tmp_path):
    from gptqkit.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint

    cfg = _qconfig(bits=4, group_size=32)
    out = Path(save_checkpoint(llama, tmp_path / "sharded", cfg, cfg, max_shard_size="24KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = llama.state_dict()
    for s in shards:  # each shard within the limit, unless it holds one tensor larger than it
        members = [k for k, v in index["weight_map"].items() if v == s]
        size = sum(state[k].numel() * state[k].element_size() for k in members)
        assert size <= 24_000 or len(members) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in llama.state_dict().values())
    loaded = load_checkpoint(out)
    torch.testing.assert_close(_logits(loaded, IDS), _logits(llama, IDS), rtol=0, atol=1e-5)
    assert checkpoint_info(out)["files"] == shards


def test_act_order_round_trip(gptqkit, tmp_path):
    from gptqkit.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint

    model = _tiny_llama(gptqkit, seed=1, bits=3, group_size=16, desc_act=True)
    layer = model.model.layers[0].mlp.down_proj
    assert not torch.equal(layer.g_idx, torch.arange(128, dtype=torch.int32) // 16)  # really permuted
    cfg = _qconfig(bits=3, group_size=16, desc_act=True)
    out = save_checkpoint(model, tmp_path / "act", cfg, cfg)
    loaded = load_checkpoint(out)
    torch.testing.assert_close(loaded.model.layers[0].mlp.down_proj.g_idx, layer.g_idx, rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)
    info = checkpoint_info(out)
    assert info["layers"]["model.layers.0.mlp.down_proj"]["act_order"] is True
    assert info["bits"] == 3 and info["desc_act"] is True


def test_v2_asymmetric_round_trip(gptqkit, tmp_path):
    from gptqkit.checkpoint import load_checkpoint, save_checkpoint

    model = _tiny_llama(gptqkit, seed=2, bits=4, group_size=32, sym=False, fmt="v2")
    cfg = _qconfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")
    out = save_checkpoint(model, tmp_path / "v2", cfg, cfg)
    assert json.loads((Path(out) / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    loaded = load_checkpoint(out)
    assert {m.format for m in _quant_layers(loaded).values()} == {"v2"}
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)


def test_gpt2_conv1d_round_trip_with_tied_embeddings(gptqkit, tmp_path):
    from gptqkit.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(3)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = _quantize_model(gptqkit, transformers.AutoModelForCausalLM.from_config(config), group_size=-1)
    c_attn = model.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)  # Conv1D(nf=192, nx=64)
    assert model.lm_head.weight is model.transformer.wte.weight
    cfg = _qconfig(bits=4, group_size=-1)
    out = Path(save_checkpoint(model, tmp_path / "gpt2", cfg, cfg))
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # the tied copy is omitted
    assert "transformer.h.1.mlp.c_proj.qweight" in keys
    loaded = load_checkpoint(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # re-tied
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)
    loaded.generate(IDS[:1], max_new_tokens=3, do_sample=False)

    # Saved from the base model (keys without "transformer."), as some old exports are.
    _rewrite(out, lambda t: t.update({k[len("transformer."):]: t.pop(k) for k in list(t)}))
    torch.testing.assert_close(_logits(load_checkpoint(out), IDS), _logits(model, IDS), rtol=0, atol=1e-5)


def test_quantized_lm_head_of_a_tied_model(gptqkit, tmp_path):
    from gptqkit.checkpoint import load_checkpoint, save_checkpoint
    from gptqkit.nn import QuantLinear

    torch.manual_seed(4)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = _quantize_model(gptqkit, transformers.AutoModelForCausalLM.from_config(config), lm_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    cfg = _qconfig(bits=4, group_size=32, lm_head=True)
    out = save_checkpoint(model, tmp_path / "qhead", cfg, cfg)
    loaded = load_checkpoint(out)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)
    loaded.generate(IDS[:1], max_new_tokens=3, do_sample=False)
    assert isinstance(loaded.lm_head, QuantLinear) and not hasattr(loaded.lm_head, "weight")


def test_autogptq_style_folder(gptqkit, llama, saved):
    """Only quantize_config.json (no quantization_config in config.json), weights named by
    model_file_base_name, g_idx of a non-act-order layer absent (as very old checkpoints do)."""
    from gptqkit.checkpoint import load_checkpoint

    _edit_json(saved / "config.json", lambda d: d.pop("quantization_config"))
    (saved / "quantize_config.json").write_text(json.dumps({
        "bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
        "sym": True, "true_sequential": True, "model_name_or_path": None,
        "model_file_base_name": "gptq_model-4bit-32g"}))
    _rewrite(saved, lambda t: t.pop("model.layers.1.self_attn.o_proj.g_idx"))
    os.rename(saved / "model.safetensors", saved / "gptq_model-4bit-32g.safetensors")
    loaded = load_checkpoint(saved)
    torch.testing.assert_close(_logits(loaded, IDS), _logits(llama, IDS), rtol=0, atol=1e-5)


def test_dtype_override(gptqkit, llama, saved):
    from gptqkit.checkpoint import load_checkpoint

    loaded = load_checkpoint(saved, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # scales kept as stored
    logits = _logits(loaded, IDS)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_tokenizer_is_saved(gptqkit, llama, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from gptqkit.checkpoint import save_checkpoint

    vocab = {f"w{i}": i for i in range(127)}
    vocab["[UNK]"] = 127
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    cfg = _qconfig(bits=4, group_size=32)
    out = save_checkpoint(llama, tmp_path / "tok", cfg, cfg, tokenizer=fast)
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again("w3 w17")["input_ids"] == [3, 17]


def test_checkpoint_info(gptqkit, saved):
    from gptqkit.checkpoint import checkpoint_info

    info = checkpoint_info(saved)
    assert info["num_quantized_layers"] == 14 and info["files"] == ["model.safetensors"]
    q = info["layers"]["model.layers.0.self_attn.q_proj"]
    assert (q["in_features"], q["out_features"], q["bits"], q["group_size"], q["groups"]) == (64, 64, 4, 32, 2)
    assert q["shapes"] == {"qweight": [8, 64], "qzeros": [2, 8], "scales": [2, 64], "g_idx": [64]}
    assert q["bytes"] == 8 * 64 * 4 + 2 * 8 * 4 + 2 * 64 * 2 + 64 * 4 and q["fp16_bytes"] == 64 * 64 * 2
    assert q["act_order"] is False
    assert info["compression"] > 2.5
    assert info["total_bytes"] == info["quantized_bytes"] + info["other_bytes"]
    assert info["model_type"] == "llama"


def test_parse_size():
    from gptqkit.checkpoint import parse_size

    assert parse_size("2GB") == 2 * 10 ** 9 and parse_size("1GiB") == 2 ** 30
    assert parse_size("500mb") == 500 * 10 ** 6 and parse_size(1234) == 1234 and parse_size("1.5KB") == 1500
    for bad in ("two GB", "0", -5, "5XB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


# --------------------------------------------------------------------------- damaged checkpoints

def test_corrupt_safetensors_names_the_file(gptqkit, saved):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or unreadable safetensors file"):
        load_checkpoint(saved)
    f.write_bytes(b"\x07garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt"):
        load_checkpoint(saved)


def test_corrupt_or_missing_shard(gptqkit, llama, tmp_path):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    cfg = _qconfig(bits=4, group_size=32)
    out = Path(save_checkpoint(llama, tmp_path / "sh", cfg, cfg, max_shard_size="24KB"))
    shard = out / "model-00002-of-" f"{len(list(out.glob('model-*.safetensors'))):05d}.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt or unreadable"):
        load_checkpoint(out)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in model.safetensors.index.json is missing"):
        load_checkpoint(out)


@pytest.mark.parametrize("victim", ["model.layers.0.mlp.up_proj.scales", "model.layers.1.self_attn.k_proj.qweight",
                                    "model.norm.weight"])
def test_missing_tensor(gptqkit, saved, victim):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    _rewrite(saved, lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=f"{victim}: missing tensor"):
        load_checkpoint(saved)


@pytest.mark.parametrize("victim,shape,needle", [
    ("model.layers.0.self_attn.v_proj.qzeros", (2, 5), r"qzeros: expected shape \[2, 4\]"),
    ("model.layers.0.self_attn.v_proj.scales", (3, 32), r"scales: has 3 groups, but group_size=32"),
    ("model.layers.0.self_attn.v_proj.g_idx", (63,), r"g_idx: expected shape \[64\]"),
    ("model.layers.1.mlp.gate_proj.qweight", (8, 127), r"qweight: expected shape \[8, 128\]"),
    ("model.layers.1.mlp.gate_proj.qweight", (9, 128), r"qweight: expected shape \[8, 128\]"),
    ("model.layers.1.input_layernorm.weight", (63,), r"input_layernorm.weight: expected shape \[64\], got \[63\]"),
])
def test_misshaped_tensor(gptqkit, saved, victim, shape, needle):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    def edit(t):
        t[victim] = torch.zeros(shape, dtype=t[victim].dtype)

    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(saved)


def test_wrong_dtype_and_g_idx_out_of_range(gptqkit, saved):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    name = "model.layers.0.self_attn.o_proj"
    backup = (saved / "model.safetensors").read_bytes()

    def bad_g_idx(t):
        t[f"{name}.g_idx"] = t[f"{name}.g_idx"].clone()
        t[f"{name}.g_idx"][7] = 2

    _rewrite(saved, bad_g_idx)
    with pytest.raises(CheckpointError, match=rf"{name}\.g_idx: g_idx\[7\] = 2 is out of range \[0, 2\)"):
        load_checkpoint(saved)
    (saved / "model.safetensors").write_bytes(backup)
    _rewrite(saved, lambda t: t.update({f"{name}.qweight": t[f"{name}.qweight"].to(torch.int64)}))
    with pytest.raises(CheckpointError, match=rf"{name}\.qweight: expected dtype int32, got I64"):
        load_checkpoint(saved)


def test_unexpected_tensor(gptqkit, saved):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    _rewrite(saved, lambda t: t.update({"model.layers.0.mystery": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mystery: unexpected tensor"):
        load_checkpoint(saved)


def test_quantized_tensors_for_a_module_the_model_lacks(gptqkit, saved):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    def edit(t):
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            t[f"model.layers.5.mlp.up_proj.{s}"] = t[f"model.layers.0.mlp.up_proj.{s}"].clone()

    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.5\.mlp\.up_proj\.\w+: unexpected tensor"):
        load_checkpoint(saved)


def test_config_contradicting_tensors(gptqkit, saved):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    def to8(d):
        (d["quantization_config"] if "quantization_config" in d else d)["bits"] = 8

    _edit_json(saved / "config.json", to8)
    with pytest.raises(CheckpointError, match="config.json says bits=8 but quantize_config.json says bits=4"):
        load_checkpoint(saved)
    _edit_json(saved / "quantize_config.json", to8)
    with pytest.raises(CheckpointError, match=r"qweight: has \d+ rows, which fits bits=4 for in_features=\d+, but the "
                                              r"quantization config says bits=8"):
        load_checkpoint(saved)

    def g64(d):
        (d["quantization_config"] if "quantization_config" in d else d).update(bits=4, group_size=64)

    _edit_json(saved / "config.json", g64)
    _edit_json(saved / "quantize_config.json", g64)
    with pytest.raises(CheckpointError, match=r"down_proj\.scales: has 4 groups, but group_size=64 with in_features=128 gives 2"):
        load_checkpoint(saved)


def test_dynamic_override_contradiction(gptqkit, saved):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    def dyn(d):
        (d["quantization_config"] if "quantization_config" in d else d)["dynamic"] = {r".*\.down_proj": {"bits": 8}}

    _edit_json(saved / "config.json", dyn)
    _edit_json(saved / "quantize_config.json", dyn)
    with pytest.raises(CheckpointError, match=r"down_proj\.qweight: has 16 rows, which fits bits=4.*bits=8"):
        load_checkpoint(saved)


def test_not_a_checkpoint(gptqkit, saved, tmp_path):
    from gptqkit.checkpoint import CheckpointError, load_checkpoint

    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")
    os.remove(saved / "quantize_config.json")
    _edit_json(saved / "config.json", lambda d: d.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        load_checkpoint(saved)
    _edit_json(saved / "config.json", lambda d: d.update(quantization_config={"quant_method": "awq", "bits": 4}))
    with pytest.raises(CheckpointError, match="quant_method"):
        load_checkpoint(saved)


# --------------------------------------------------------------------------- saving: validation and atomicity

def test_save_refuses_inconsistent_config_and_foreign_folders(gptqkit, llama, tmp_path):
    from gptqkit.checkpoint import CheckpointError, save_checkpoint

    with pytest.raises(CheckpointError, match=r"quantized with bits=4, but the quantization config says bits=8"):
        save_checkpoint(llama, tmp_path / "x", _qconfig(bits=8, group_size=32), None)
    with pytest.raises(CheckpointError, match="groups, but group_size=128"):
        save_checkpoint(llama, tmp_path / "x", _qconfig(bits=4, group_size=128), None)
    with pytest.raises(CheckpointError, match="stores v1 zero points, but checkpoint_format is 'gptq_v2'"):
        save_checkpoint(llama, tmp_path / "x", _qconfig(bits=4, group_size=32, checkpoint_format="gptq_v2"), None)
    assert not (tmp_path / "x").exists()

    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint; refusing to replace it"):
        save_checkpoint(llama, home, _qconfig(bits=4, group_size=32), None)
    assert (home / "thesis.tex").read_text() == "precious"
    fp_model = tmp_path / "fp-model"  # the original full-precision model: never replaced
    llama.config.save_pretrained(fp_model)
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        save_checkpoint(llama, fp_model, _qconfig(bits=4, group_size=32), None)
    assert (fp_model / "config.json").exists()


def test_saved_folder_permissions_follow_umask(gptqkit, saved):
    mode = saved.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


def _leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".gptqkit-" in p.name]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failed_save_leaves_previous_checkpoint_intact(gptqkit, llama, saved, monkeypatch, exchange):
    from gptqkit import checkpoint
    from gptqkit.checkpoint import load_checkpoint, save_checkpoint

    if not exchange:
        monkeypatch.setattr(checkpoint, "_rename_exchange", lambda a, b: False)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    other = _tiny_llama(gptqkit, seed=7)
    real_write = checkpoint._write_safetensors
    calls = []

    def crash_on_second_shard(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "_write_safetensors", crash_on_second_shard)
    cfg = _qconfig(bits=4, group_size=32)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(other, saved, cfg, cfg, max_shard_size="24KB")
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert _leftovers(saved.parent) == []
    torch.testing.assert_close(_logits(load_checkpoint(saved), IDS), _logits(llama, IDS), rtol=0, atol=1e-5)

    # A successful save over it replaces it completely (no stale single-file weights next to new shards).
    monkeypatch.setattr(checkpoint, "_write_safetensors", real_write)
    save_checkpoint(other, saved, cfg, cfg, max_shard_size="24KB")
    assert not (saved / "model.safetensors").exists()
    assert _leftovers(saved.parent) == []
    torch.testing.assert_close(_logits(load_checkpoint(saved), IDS), _logits(other, IDS), rtol=0, atol=1e-5)


def test_hard_crash_leaves_no_valid_looking_folder(gptqkit, llama, saved, monkeypatch):
    """A process killed mid-save never runs its cleanup: simulate that by disabling it."""
    from gptqkit import checkpoint
    from gptqkit.checkpoint import load_checkpoint, save_checkpoint

    def killed(tensors, path, metadata):
        raise KeyboardInterrupt  # not an Exception: like a signal in the middle of the write

    monkeypatch.setattr(checkpoint, "_write_safetensors", killed)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)
    cfg = _qconfig(bits=4, group_size=32)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(llama, saved, cfg, cfg)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(llama, saved.parent / "fresh", cfg, cfg)
    monkeypatch.undo()

    assert not (saved.parent / "fresh").exists()
    debris = [saved.parent / n for n in _leftovers(saved.parent)]
    assert len(debris) == 2 and all(d.name.startswith((".ckpt.gptqkit-tmp-", ".fresh.gptqkit-tmp-")) for d in debris)
    for d in debris:
        assert not (d / "config.json").exists()  # config.json is written last
        with pytest.raises((FileNotFoundError, ValueError)):
            load_checkpoint(d)
    torch.testing.assert_close(_logits(load_checkpoint(saved), IDS), _logits(llama, IDS), rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="was interrupted"):
        load_checkpoint(saved.parent / "fresh")
    for d in debris:
        shutil.rmtree(d)


def test_failed_swap_restores_previous_checkpoint(gptqkit, llama, saved, monkeypatch):
    from gptqkit import checkpoint
    from gptqkit.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setattr(checkpoint, "_rename_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # previous moved aside, new one fails to move in
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", flaky_rename)
    cfg = _qconfig(bits=4, group_size=32)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(_tiny_llama(gptqkit, seed=9), saved, cfg, cfg)
    monkeypatch.undo()
    assert _leftovers(saved.parent) == []
    torch.testing.assert_close(_logits(load_checkpoint(saved), IDS), _logits(llama, IDS), rtol=0, atol=1e-5)
