"""The third-party side of the interoperability test (test_interop.py).

Runs in its own Python environment, the one ``scripts/setup.sh`` makes in
``.venv-interop`` (transformers with optimum and GPTQModel, the loader
transformers itself uses for GPTQ checkpoints; see requirements-interop.txt),
so that GPTQModel's import-time side effects (environment variables, thread
pools, logging) stay out of the pytest process. It never imports gptqkit:
what it reports is what the other tools make of a checkpoint.

    python third_party_reader.py JOB.json

JOB.json::

    {"inputs": "inputs.safetensors",          # x_<K> [rows, K] per input width, "tokens" [b, t]
     "quantize": [{"src": dir, "dst": dir, "bits": 4, "group_size": 32,
                   "sym": false, "desc_act": true, "calibration": "cal.safetensors"}],
     "read": [{"name": "a", "path": dir, "loader": "transformers"}],
     "out": dir}

``quantize`` jobs run first (GPTQModel quantizes and saves a checkpoint, which
the caller then reads with gptqkit); every ``read`` checkpoint is loaded with
``transformers.AutoModelForCausalLM.from_pretrained`` (which hands the GPTQ
layers to GPTQModel's kernels), with ``"loader": "transformers+defuser"`` the
same after ``defuser.replace_fused_blocks(model_type)`` (MoE models, whose
experts transformers otherwise builds fused), or, with ``"loader":
"gptqmodel"``, with ``GPTQModel.load``, and ``out/<name>.safetensors`` receives, per
quantized layer, its output for ``x_<in_features>`` plus the model's logits
for ``tokens``; ``out/report.json`` names the kernels and versions used, or
the error a checkpoint's loading raised.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def _gptqmodel():
    """The gptqmodel module, made usable on a 2-core machine."""
    import gptqmodel

    # GPTQModel 7.7 sizes its CPU worker pool at (cores + 1) // 2 but asks a
    # model-loader pool of 2 from it, which fails on a 2-core machine (as CI's).
    gptqmodel._default_cpu_workers = lambda: 2
    return gptqmodel


def _quantize_with_gptqmodel(job: dict) -> None:
    import torch
    from safetensors.torch import load_file

    gptqmodel = _gptqmodel()
    ids = load_file(job["calibration"])["input_ids"]
    calibration = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in ids]
    cfg = gptqmodel.QuantizeConfig(bits=job["bits"], group_size=job["group_size"], sym=job["sym"],
                                   desc_act=job["desc_act"])
    model = gptqmodel.GPTQModel.load(job["src"], cfg, device="cpu")
    model.quantize(calibration, batch_size=1)
    model.save(job["dst"])


def _load(path: str, loader: str):
    import torch

    if loader in ("transformers", "transformers+defuser"):
        from transformers import AutoModelForCausalLM

        if loader == "transformers+defuser":
            # transformers builds MoE experts fused; defuser (GPTQModel's dependency, which
            # GPTQModel.load calls the same way) patches the model class to build them per expert.
            # It stays patched for the rest of this process.
            import defuser

            model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
            if not defuser.replace_fused_blocks(model_type):
                raise RuntimeError(f"defuser has no per-expert replacement for model_type {model_type!r}")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    gptqmodel = _gptqmodel()
    # GPTQModel.load runs its layers in fp16 or bf16 only; its plain torch kernel dequantizes
    # in fp16 and multiplies in fp16, the most exact of its CPU kernels.
    return gptqmodel.GPTQModel.load(path, device="cpu", dtype=torch.float16, backend=gptqmodel.BACKEND.TORCH).model


def _read(path: str, loader: str, inputs: dict) -> tuple[dict, dict]:
    import torch

    model = _load(path, loader).eval()
    dtype = model.get_input_embeddings().weight.dtype  # what the model computes in
    outputs, kernels = {}, set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "qweight"):
                continue
            kernels.add(type(module).__name__)
            outputs[f"layer:{name}"] = module(inputs[f"x_{module.in_features}"].to(dtype)).float().contiguous()
        outputs["logits"] = model(inputs["tokens"]).logits.float().contiguous()
    return outputs, {"loader": loader, "dtype": str(dtype).removeprefix("torch."), "kernels": sorted(kernels),
                     "layers": sum(k.startswith("layer:") for k in outputs)}


def main(job_file: str) -> None:
    import importlib.metadata as md

    from safetensors.torch import load_file, save_file

    job = json.loads(Path(job_file).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    for q in job.get("quantize", []):
        _quantize_with_gptqmodel(q)
    inputs = load_file(job["inputs"])
    report = {"versions": {p: md.version(p) for p in ("transformers", "optimum", "gptqmodel", "torch")},
              "read": {}}
    for r in job.get("read", []):
        try:
            outputs, info = _read(r["path"], r.get("loader", "transformers"), inputs)
        except Exception as e:  # reported per checkpoint; the caller decides what is expected
            report["read"][r["name"]] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            continue
        save_file(outputs, str(out / f"{r['name']}.safetensors"))
        report["read"][r["name"]] = info
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
