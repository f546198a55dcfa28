"""Models published in MXFP4 (GPT-OSS) or block-scaled FP8 (DeepSeek-V3) are dequantized while
loading and quantized from those values; other quantized checkpoints are refused.

The tiny checkpoints are written here from random codes and scales, and the reference weights
are decoded here too, from the formats' definitions (MXFP4: two E2M1 codes per byte, low nibble
first, times 2^(scale - 127) per 32 inputs; FP8: e4m3 values times one fp32 factor per block),
independently of transformers' loader."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli_runner import run_cli  # noqa: E402
from tiny_models import VOCAB, make_tiny_model, make_tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_cpu")

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
FP8_BLOCK = 32
TOKENS = torch.randint(4, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11))


def _rewrite(folder, tensors, quantization_config):
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    make_tiny_tokenizer().save_pretrained(folder)


def _mxfp4_gpt_oss(folder):
    """A tiny GPT-OSS stored like openai/gpt-oss: experts as ``<proj>_blocks [E, out, in/32, 16]``
    (uint8, two codes each) and ``<proj>_scales [E, out, in/32]`` (uint8 exponents). Returns the
    experts' weights decoded in float64, in the model's ``[E, in, out]`` layout."""
    from safetensors.torch import load_file

    make_tiny_model("gpt_oss").save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    lut = torch.tensor(E2M1, dtype=torch.float64)
    decoded = {}
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, k, n = tensors.pop(name).shape
        blocks = torch.randint(0, 256, (experts, n, k // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(117, 121, (experts, n, k // 32), dtype=torch.uint8, generator=g)
        codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).reshape(experts, n, k // 32, 32).long()
        values = lut[codes] * torch.exp2(scales.double() - 127)[..., None]
        decoded[name] = values.reshape(experts, n, k).transpose(1, 2)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    _rewrite(folder, tensors, {"quant_method": "mxfp4",
                               "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                          "model.embed_tokens", "lm_head"]})
    return decoded


def _fp8_llama(folder):
    """A tiny Llama stored like DeepSeek-V3: block Linear weights in float8_e4m3fn with one
    ``weight_scale_inv`` factor per 32 x 32 block. Returns the weights decoded in float64."""
    from safetensors.torch import load_file

    make_tiny_model("llama").save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    decoded = {}
    for name in [k for k in tensors if ".layers." in k and k.endswith("_proj.weight")]:
        w = tensors[name]
        n, k = w.shape
        factors = torch.rand(-(-n // FP8_BLOCK), -(-k // FP8_BLOCK), generator=g) * 0.002 + 0.0005
        full = factors.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
        codes = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = codes, factors
        decoded[name] = codes.double() * full.double()
    _rewrite(folder, tensors, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [FP8_BLOCK, FP8_BLOCK]})
    return decoded


def _quantize_and_reload(model, folder):
    """Quantizes the loaded model (4-bit, groups of 32), saves and reloads it; returns
    (quantized logits, reloaded logits, saved quantization_config)."""
    from gptqkit import GPTQForCausalLM

    model.quantize(torch.randint(4, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2)), batch_size=4,
                   progress=False)
    with torch.no_grad():
        ours = model.model(TOKENS).logits
    model.save_quantized(folder)
    loaded = GPTQForCausalLM.from_quantized(folder)
    with torch.no_grad():
        again = loaded.model(TOKENS).logits
    return ours, again, json.loads((folder / "config.json").read_text())["quantization_config"]


def _assert_quantized_from(model, decoded_rows):
    """Every quantized layer is within 4-bit GPTQ's usual weight error (measured 10-18 % here)
    of the weights decoded from the stored format: GPTQ started from those values."""
    from gptqkit.nn import QuantLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(decoded_rows)
    for name, ref in decoded_rows.items():
        error = (layers[name].dequantize_weight().double() - ref).norm() / ref.norm()
        assert error < 0.25, (name, error.item())


def test_gpt_oss_published_in_mxfp4_is_dequantized_then_quantized(gptqkit, tmp_path):
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    decoded = _mxfp4_gpt_oss(tmp_path / "mxfp4")
    q = GPTQForCausalLM.from_pretrained(tmp_path / "mxfp4", QuantizeConfig(group_size=32), dtype=torch.float32)
    assert getattr(q.model.config, "quantization_config", None) is None  # a plain full-precision model now
    state = {k: v.detach().clone() for k, v in q.model.state_dict().items()}  # quantize() rewrites weights in place
    for name, ref in decoded.items():
        assert torch.equal(state[name].double(), ref), name  # every E2M1 value x 2^k is exact in fp32
    # the experts' rows as [out, in] per expert layer (gate_proj / up_proj: the halves of gate_up)
    rows = {}
    for name, ref in decoded.items():
        block = name.rsplit(".", 1)[0]
        for e in range(ref.shape[0]):
            w = ref[e].T
            if name.endswith("gate_up_proj"):
                rows[f"{block}.{e}.gate_proj"], rows[f"{block}.{e}.up_proj"] = w[: w.shape[0] // 2], w[w.shape[0] // 2:]
            else:
                rows[f"{block}.{e}.down_proj"] = w
    ours, again, saved = _quantize_and_reload(q, tmp_path / "gptq")
    assert saved["quant_method"] == "gptq" and "modules_to_not_convert" not in saved
    _assert_quantized_from(q.model, {**rows, **{n: state[f"{n}.weight"].double() for n in _attention(q.model)}})
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_upcast_dequantized_widens_only_narrower_parameters(gptqkit):
    """transformers 5.20 leaves MXFP4 experts it dequantized in bfloat16 under dtype=float32 (the
    model then fails its first forward): loading casts such parameters up to the model's dtype,
    exactly, and leaves wider ones (modules a model keeps in float32) alone."""
    from gptqkit.source_formats import upcast_dequantized

    model = make_tiny_model("llama")
    layer = model.model.layers[0].mlp.down_proj
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    expected = layer.weight.detach().double()
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(RuntimeError):
        model(ids)
    assert upcast_dequantized(model, None) == ["model.layers.0.mlp.down_proj.weight"]  # to the embeddings' dtype
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight.double(), expected)
    model(ids)
    assert upcast_dequantized(model, torch.float32) == []

    model = make_tiny_model("llama", dtype=torch.bfloat16)
    model.model.norm.weight.data = model.model.norm.weight.data.float()
    assert upcast_dequantized(model, torch.bfloat16) == []
    assert model.model.norm.weight.dtype == torch.float32


def _attention(model):
    return [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]


def test_fp8_model_is_dequantized_then_quantized(gptqkit, tmp_path):
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    decoded = _fp8_llama(tmp_path / "fp8")
    q = GPTQForCausalLM.from_pretrained(tmp_path / "fp8", QuantizeConfig(group_size=32), dtype=torch.float32)
    assert getattr(q.model.config, "quantization_config", None) is None
    state = q.model.state_dict()
    assert not any(k.endswith("weight_scale_inv") for k in state)
    for name, ref in decoded.items():
        torch.testing.assert_close(state[name].double(), ref, rtol=2.0 ** -23, atol=0)  # one fp32 rounding
    ours, again, saved = _quantize_and_reload(q, tmp_path / "gptq")
    assert saved["quant_method"] == "gptq"
    _assert_quantized_from(q.model, {n.removesuffix(".weight"): ref for n, ref in decoded.items()})
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_cli_quantizes_an_mxfp4_model_and_says_how(gptqkit, tmp_path):
    _mxfp4_gpt_oss(tmp_path / "mxfp4")
    calibration = tmp_path / "calib.pt"
    torch.save(torch.randint(4, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3)), calibration)
    status, out, err = run_cli(["quantize", tmp_path / "mxfp4", tmp_path / "gptq", "--group-size", "32",
                             "--calibration", calibration, "--dtype", "float32"])
    assert status == 0, err
    assert "stores its weights in mxfp4; transformers dequantizes them while loading" in out + err
    assert "quantized 32 layers" in out  # 2 blocks x (4 attention + 4 experts x 3)
    status, out, err = run_cli(["eval-ppl", tmp_path / "gptq", "--compare", tmp_path / "mxfp4",
                             "--tokens", calibration, "--seqlen", "32", "--windows", "4"])
    assert status == 0, err
    assert "perplexity" in out and "KL" in out


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes"])
def test_other_quantized_models_are_refused(gptqkit, tmp_path, method):
    """Quantizing already rounded weights again only adds error: the API and the CLI say so
    before loading anything."""
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    folder = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"is already quantized \({method}\); quantize needs the full-precision "
                                         r"model, or one stored in a format transformers dequantizes on load "
                                         r"\(fp8, mxfp4\)"):
        GPTQForCausalLM.from_pretrained(folder, QuantizeConfig())
    status, _, err = run_cli(["quantize", folder, tmp_path / "out"])
    assert status == 2 and f"is already quantized ({method})" in err and "(fp8, mxfp4)" in err
    assert not (tmp_path / "out").exists()
