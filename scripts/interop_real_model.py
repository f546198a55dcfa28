"""Reads real GPTQ checkpoints with both gptqkit and the third-party loader and compares them.

Run it with the reader environment's Python (scripts/setup.sh makes it; it sees
.venv's packages, gptqkit included):

    .venv-interop/bin/python scripts/interop_real_model.py out/smollm2-gptq [more folders...]

For each checkpoint folder (written by gptqkit, GPTQModel or AutoGPTQ) it prints:
- the number of quantized layers both sides found;
- the worst relative output error of the third-party layer (transformers ->
  optimum -> GPTQModel, its plain torch kernel, fp32) against ``x @ W``, where W
  is the weight gptqkit dequantizes from the same files, both unrounded and
  rounded to fp16 (GPTQModel dequantizes in fp16);
- the mean KL divergence between the two loaders' next-token distributions on a
  WikiText-2 sentence, with transformers' default kernel;
- whether greedy generation agrees.

The figures in docs/format.md ("Checked against a real third-party loader")
come from this script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TEXT = ("The history of the city begins in the twelfth century , when a small market grew on the "
        "river bank and the bishop granted it a charter .")


def _third_party(path: Path, plain_torch_kernel: bool):
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    kw = {}
    if plain_torch_kernel:
        bits = json.loads((path / "config.json").read_text())["quantization_config"]["bits"]
        kw["quantization_config"] = GPTQConfig(bits=bits, backend="torch")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **kw).eval()


def check(path: Path, new_tokens: int) -> dict:
    import torch

    import gptqkit
    from gptqkit.nn import QuantLinear

    ours = gptqkit.GPTQForCausalLM.from_quantized(path, device="cpu", dtype=torch.float32)
    layers = {n: m for n, m in ours.model.named_modules() if isinstance(m, QuantLinear)}
    theirs = _third_party(path, plain_torch_kernel=True)
    g = torch.Generator().manual_seed(0)
    worst, worst16, compared = 0.0, 0.0, 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if name not in layers or not hasattr(module, "qweight"):
                continue
            w = layers[name].dequantize_weight().double()
            x = torch.randn(5, w.shape[1], generator=g)
            y = module(x).double()
            bias = 0.0 if layers[name].bias is None else layers[name].bias.double()
            ref, ref16 = x.double() @ w.T + bias, x.double() @ w.half().double().T + bias
            worst = max(worst, ((y - ref).norm() / ref.norm()).item())
            worst16 = max(worst16, ((y - ref16).norm() / ref16.norm()).item())
            compared += 1
    del theirs

    default = _third_party(path, plain_torch_kernel=False)
    kernel = sorted({type(m).__name__ for m in default.modules() if hasattr(m, "qweight")})
    ids = ours.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        lp_theirs = default(ids).logits.float().log_softmax(-1)
        lp_ours = ours.model(ids).logits.float().log_softmax(-1)
    kl = (lp_ours.exp() * (lp_ours - lp_theirs)).sum(-1).mean().item()
    prompt = ids[:, :8]
    gen_theirs = default.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    gen_ours = ours.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False)
    return {"checkpoint": str(path), "layers": f"{compared} / {len(layers)}", "rel_err": worst,
            "rel_err_vs_fp16_weight": worst16, "default_kernel": kernel, "kl": kl,
            "same_greedy_tokens": bool(torch.equal(gen_theirs, gen_ours)),
            "text": ours.tokenizer.decode(gen_ours[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="GPTQ checkpoint folders")
    parser.add_argument("--new-tokens", type=int, default=12, help="greedy tokens to compare (default: 12)")
    args = parser.parse_args()
    for path in args.checkpoints:
        r = check(path, args.new_tokens)
        print(f"{r['checkpoint']}: layers {r['layers']}; relative output error {r['rel_err']:.1e} "
              f"({r['rel_err_vs_fp16_weight']:.1e} vs the weight rounded to fp16); default kernel "
              f"{', '.join(r['default_kernel'])}: KL {r['kl']:.1e}, same greedy tokens: {r['same_greedy_tokens']}")
        print(f"  {r['text']!r}")


if __name__ == "__main__":
    main()
