"""gptqkit checkpoints in the third-party loader, and the other way round.

transformers loads GPTQ checkpoints through optimum and GPTQModel; that
stack runs in its own environment (``.venv-interop``, made by
scripts/setup.sh from requirements-interop.txt) through
``third_party_reader.py``, so none of it is imported here.

* gptqkit -> transformers/GPTQModel: tiny models quantized and saved by
  gptqkit in every format option (bits 2/3/4/8, groups, sym/asym, act-order,
  static groups, v1/v2, GPT-2's Conv1D, biases) are loaded by
  ``AutoModelForCausalLM.from_pretrained``; every quantized layer's output
  for a fixed input must equal ``x @ W`` in float64 with the weight gptqkit
  dequantizes from the same files, rounded to fp16 (GPTQModel dequantizes in
  fp16, gptqkit in fp32, both from the same fp16 scales): a layout that
  differed in any code, zero or g_idx would be off by O(1), not 1e-6.
* GPTQModel -> gptqkit: checkpoints GPTQModel quantizes and saves (a Llama, a
  Mixtral and a GPT-OSS) are read by ``from_quantized`` and checked the same way
  against GPTQModel's own layers.

Without ``.venv-interop`` the tests skip; CI sets GPTQKIT_REQUIRE_INTEROP=1
so that they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import make_tiny_model, make_tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
READER = Path(__file__).with_name("third_party_reader.py")
TOKENS = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(7))

# name -> (architecture, QuantizeConfig arguments)
GPTQKIT_CHECKPOINTS = {
    # with asymmetric calibration: meta.gptaq must not trouble the readers
    "llama-4bit-g32-act-order-gptaq": ("llama", dict(bits=4, group_size=32, desc_act=True, gptaq=True)),
    "llama-4bit-g32-asym-v2": ("llama", dict(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")),
    "llama-3bit-g32-asym-static-groups": ("llama", dict(bits=3, group_size=32, sym=False, desc_act=True,
                                                         static_groups=True)),
    "llama-8bit-per-row": ("llama", dict(bits=8, group_size=-1)),
    "llama-2bit-g16-asym-group-aware": ("llama", dict(bits=2, group_size=16, sym=False, act_group_aware=True)),
    # layers left in full precision: o_proj in block 0 only (a "-:" rule), every gate_proj (the False
    # spelling, which GPTQModel does not read), both after a rule that matches gate_proj too (GPTQModel
    # applies the first match): the saved config must declare them to both readers
    "llama-4bit-g32-dynamic-skips": ("llama", dict(bits=4, group_size=32, dynamic={
        r".*\.mlp\..*": {"damp_percent": 0.02}, r"-:.*\.0\.self_attn\.o_proj$": {},
        r".*\.mlp\.gate_proj": False})),
    "qwen2-4bit-g32-act-order-bias": ("qwen2", dict(bits=4, group_size=32, desc_act=True, sym=False)),
    "gpt2-conv1d-4bit-g32": ("gpt2", dict(bits=4, group_size=32)),
    # MoE: per-expert layers (mlp.experts.<e>.gate_proj); Qwen2-MoE also keeps its one-output
    # shared_expert_gate in full precision
    "mixtral-moe-4bit-g32-gptaq": ("mixtral", dict(bits=4, group_size=32, gptaq=True)),
    "qwen2-moe-4bit-g32": ("qwen2_moe", dict(bits=4, group_size=32)),
    "qwen3-moe-4bit-g32-act-order": ("qwen3_moe", dict(bits=4, group_size=32, desc_act=True)),
    # GPT-OSS: transposed, biased experts with interleaved gate/up rows and a clamped gate
    "gpt-oss-moe-4bit-g32-act-order": ("gpt_oss", dict(bits=4, group_size=32, desc_act=True)),
}
# How each checkpoint is read (third_party_reader.py's loaders):
# * "transformers": AutoModelForCausalLM.from_pretrained, which hands the layers to GPTQModel.
# * "gptqmodel": GPTQModel.load. transformers 5.23 cannot load any GPT-2 GPTQ checkpoint,
#   GPTQModel's own included (GPT-2's _init_weights touches c_proj.weight, which GPTQModel's
#   quantized layer has not), so GPT-2 (Conv1D) checkpoints are checked through GPTQModel.load.
# * "transformers+defuser": from_pretrained after defuser.replace_fused_blocks(model_type), which
#   GPTQModel.load does too. transformers 5.23 (with optimum 2.3) builds MoE experts fused, so on its
#   own it loads no per-expert GPTQ checkpoint, GPTQModel's included: the experts would stay
#   randomly initialised. defuser 0.0.28 has no such replacement for GPT-OSS, so only GPTQModel.load
#   reads GPT-OSS checkpoints (it splits the experts itself).
LOADERS = {"gpt2": ("gptqmodel",), "mixtral": ("gptqmodel", "transformers+defuser"),
           "qwen2_moe": ("gptqmodel", "transformers+defuser"), "qwen3_moe": ("gptqmodel", "transformers+defuser"),
           "gpt_oss": ("gptqmodel",)}
DYNAMIC_LOADERS = ("transformers", "gptqmodel")  # a dynamic config is read by both
READS = [(name, loader) for name, (arch, cfg) in GPTQKIT_CHECKPOINTS.items()
         for loader in (DYNAMIC_LOADERS if "dynamic" in cfg else LOADERS.get(arch, ("transformers",)))]
MOE_ROUTER_GAIN = 16.0  # see _decisive_routers
GPTQMODEL_CHECKPOINT = dict(bits=4, group_size=32, sym=False, desc_act=True)
#: GPTQModel also quantizes a tiny Mixtral and a tiny GPT-OSS (its defuser splits the experts as
#: gptqkit.moe does), read back with GPTQModel.load
GPTQMODEL_MOE_CHECKPOINT = dict(bits=4, group_size=32, sym=True, desc_act=False)
GPTQMODEL_MOE_ARCHITECTURES = {"gptqmodel-mixtral": "mixtral", "gptqmodel-gpt-oss": "gpt_oss"}


def _reader_python() -> str | None:
    explicit = os.environ.get("GPTQKIT_INTEROP_PYTHON")
    if explicit:
        return explicit
    default = ROOT / ".venv-interop" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.fixture(scope="module")
def reader_python():
    python = _reader_python()
    if python is None:
        message = ("no third-party reader environment: run scripts/setup.sh (it makes .venv-interop) "
                   "or point GPTQKIT_INTEROP_PYTHON at a Python with transformers, optimum and gptqmodel")
        if os.environ.get("GPTQKIT_REQUIRE_INTEROP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


def _decisive_routers(model):
    """The tiny MoE models' routers scaled up. Randomly initialised, they score the experts almost
    alike, and a near-tie in a token's top-k can go either way between an fp16 and an fp32 reader,
    which then run different experts; real routers are far from uniform."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("mlp.gate", "mlp.router")) and isinstance(getattr(module, "weight", None),
                                                                         torch.Tensor):
                module.weight.mul_(MOE_ROUTER_GAIN)
    return model


def _calibration(n=8, seqlen=64, seed=0):
    return torch.randint(4, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exchange(gptqkit, reader_python, tmp_path_factory):
    """Quantizes and saves the gptqkit checkpoints, runs the reader once over all of them (and
    has GPTQModel quantize one of its own); returns (folder, report)."""
    from safetensors.torch import save_file

    from gptqkit import GPTQForCausalLM, QuantizeConfig

    root = tmp_path_factory.mktemp("interop")
    for name, (arch, cfg) in GPTQKIT_CHECKPOINTS.items():
        q = GPTQForCausalLM(_decisive_routers(make_tiny_model(arch)), QuantizeConfig(**cfg))
        q.quantize(_calibration(), batch_size=4, progress=False)
        q.save_quantized(root / name)
        make_tiny_tokenizer().save_pretrained(root / name)  # GPTQModel.load wants one
    reads = [{"name": f"{name}@{loader}", "path": str(root / name), "loader": loader} for name, loader in READS]

    fp_folders = {}
    for arch in ("llama", *GPTQMODEL_MOE_ARCHITECTURES.values()):
        fp_folders[arch] = root / f"tiny-{arch}-fp32"
        _decisive_routers(make_tiny_model(arch)).save_pretrained(fp_folders[arch])
        make_tiny_tokenizer().save_pretrained(fp_folders[arch])
    save_file({"input_ids": _calibration(seed=1).contiguous()}, str(root / "calibration.safetensors"))
    reads.append({"name": "gptqmodel", "path": str(root / "gptqmodel")})
    reads += [{"name": name, "path": str(root / name), "loader": "gptqmodel"} for name in GPTQMODEL_MOE_ARCHITECTURES]

    widths = {64, 128, 192, 256}  # every in_features of the tiny models (GPT-2's MLP: 4 x 64)
    g = torch.Generator().manual_seed(3)
    # fp16-representable, so that a reader computing in fp16 sees the same input
    inputs = {f"x_{k}": torch.randn(5, k, generator=g).half().float() for k in widths}
    save_file({**inputs, "tokens": TOKENS.contiguous()}, str(root / "inputs.safetensors"))
    job = {"inputs": str(root / "inputs.safetensors"), "out": str(root / "out"), "read": reads,
           "quantize": [dict(GPTQMODEL_CHECKPOINT, src=str(fp_folders["llama"]), dst=str(root / "gptqmodel"),
                             calibration=str(root / "calibration.safetensors"))]
                       + [dict(GPTQMODEL_MOE_CHECKPOINT, src=str(fp_folders[arch]), dst=str(root / name),
                               calibration=str(root / "calibration.safetensors"))
                          for name, arch in GPTQMODEL_MOE_ARCHITECTURES.items()]}
    (root / "job.json").write_text(json.dumps(job))
    # cwd: GPTQModel writes a logs/ folder into the working directory while it quantizes
    run = subprocess.run([reader_python, str(READER), str(root / "job.json")], capture_output=True, text=True,
                         timeout=900, cwd=root)
    assert run.returncode == 0, f"third-party reader failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    return root, json.loads((root / "out" / "report.json").read_text())


# Worst |error| of a layer output, in units of sum_k |x_k w_k| (the size of the dot product's
# terms), allowed per compute precision: an fp32 reader's error is fp32 accumulation; an fp16
# reader rounds its output (and its products) to fp16, 2^-11 each. A layout error (a wrong code,
# zero point, scale or g_idx entry) is of the order of a whole term, far above either.
ALLOWED = {"float32": 1e-5, "float16": 2.0 ** -9}


def _compare_layers(gptqkit_model, reader_outputs, inputs):
    """Worst error of the reader's layer outputs against x @ fp16(W_gptqkit) in float64."""
    from gptqkit.nn import QuantLinear

    ours = {n: m for n, m in gptqkit_model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {k[len("layer:"):] for k in reader_outputs if k.startswith("layer:")}
    assert theirs == set(ours), f"layers differ: only gptqkit {set(ours) - theirs}, only reader {theirs - set(ours)}"
    worst = 0.0
    for name, layer in ours.items():
        x = inputs[f"x_{layer.in_features}"].double()
        w = layer.dequantize_weight().half().double()
        ref = x @ w.T
        if layer.bias is not None:
            ref += layer.bias.double()
        magnitude = x.abs() @ w.abs().T
        got = reader_outputs[f"layer:{name}"].double()
        worst = max(worst, ((got - ref).abs() / magnitude).max().item())
    return worst


def _load_outputs(root, name):
    from safetensors.torch import load_file

    return load_file(str(root / "out" / f"{name}.safetensors")), load_file(str(root / "inputs.safetensors"))


def _assert_same_logits(theirs, ours):
    # gptqkit runs the model in fp32; the reader's weights are rounded to fp16 (2^-11 each) and a
    # GPTQModel.load model runs in fp16 throughout: measured 2e-4 to 7e-4 of the logits' range, and
    # 1.2e-3 to 1.5e-3 for GPT-OSS (biases, clamped gate, attention sinks, all in fp16). A layout
    # error is far above the bound: GPT-OSS's gate/up halves read as de-interleaved gate and up
    # rows gave 0.79. (The predicted tokens agree wherever the top two logits are more than twice
    # the bound apart; closer ones, which a tiny random model has, may flip.)
    scale = ours.abs().max().item()
    assert (theirs - ours).abs().max().item() <= 4e-3 * scale


@pytest.mark.slow
@pytest.mark.parametrize("name,loader", READS, ids=[f"{n}@{loader}" for n, loader in READS])
def test_third_party_reads_gptqkit_checkpoints(gptqkit, exchange, name, loader):
    from gptqkit import GPTQForCausalLM

    root, report = exchange
    read = report["read"][f"{name}@{loader}"]
    assert "error" not in read, f"{read['error']}\n{read['traceback']}"
    outputs, inputs = _load_outputs(root, f"{name}@{loader}")
    q = GPTQForCausalLM.from_quantized(root / name, device="cpu", dtype=torch.float32)
    assert _compare_layers(q.model, outputs, inputs) < ALLOWED[read["dtype"]], read
    with torch.no_grad():
        _assert_same_logits(outputs["logits"], q.model(TOKENS).logits)


@pytest.mark.slow
def test_gptqkit_reads_gptqmodel_checkpoints(gptqkit, exchange):
    from gptqkit import GPTQForCausalLM

    root, report = exchange
    read = report["read"]["gptqmodel"]
    assert "error" not in read, f"{read['error']}\n{read['traceback']}"
    cfg = json.loads((root / "gptqmodel" / "quantize_config.json").read_text())
    assert "gptqmodel" in str(cfg["meta"]["quantizer"]) and cfg["desc_act"] is True and cfg["sym"] is False
    outputs, inputs = _load_outputs(root, "gptqmodel")
    q = GPTQForCausalLM.from_quantized(root / "gptqmodel", device="cpu", dtype=torch.float32)
    g_idx = q.model.model.layers[0].mlp.down_proj.g_idx
    assert not torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=g_idx.dtype) // 32)  # really act-order
    assert _compare_layers(q.model, outputs, inputs) < ALLOWED[read["dtype"]], read
    with torch.no_grad():
        _assert_same_logits(outputs["logits"], q.model(TOKENS).logits)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GPTQMODEL_MOE_ARCHITECTURES))
def test_gptqkit_reads_gptqmodel_moe_checkpoints(gptqkit, exchange, name):
    """GPTQModel's Mixtral and GPT-OSS checkpoints (experts split by its defuser, saved per expert)
    load into gptqkit's own split of the model: every expert layer agrees with the reader's, and
    so do the logits (GPT-OSS's gate_proj / up_proj halves are split the same way in both)."""
    from gptqkit import GPTQForCausalLM

    root, report = exchange
    read = report["read"][name]
    assert "error" not in read, f"{read['error']}\n{read['traceback']}"
    outputs, inputs = _load_outputs(root, name)
    q = GPTQForCausalLM.from_quantized(root / name, device="cpu", dtype=torch.float32)
    assert read["layers"] == 2 * (4 + 3 * 4)  # attention and every expert of both blocks
    assert _compare_layers(q.model, outputs, inputs) < ALLOWED[read["dtype"]], read
    with torch.no_grad():
        _assert_same_logits(outputs["logits"], q.model(TOKENS).logits)
