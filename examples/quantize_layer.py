#!/usr/bin/env python3
"""Quantize one real layer of SmolLM2-135M with GPTQ and compare with round-to-nearest.

Collects the layer's real input activations on WikiText-2 calibration windows,
accumulates the GPTQ Hessian with ``gptqkit.HessianAccumulator``, quantizes the
weight with ``gptqkit.quantize_weight`` and with plain round-to-nearest (the same
min-max grid, no error feedback), packs the GPTQ result into the checkpoint
layout and dequantizes it back, then reports the relative output error
``||X (W - Q)^T|| / ||X W^T||`` of each on held-out windows.

    python examples/quantize_layer.py                      # defaults below
    python examples/quantize_layer.py --layer model.layers.3.self_attn.o_proj --bits 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import gptqkit

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "wiki.valid.tokens")


class _Captured(Exception):
    """Stops the forward pass once the target layer has seen its input."""


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Min-max round-to-nearest per group: the baseline GPTQ improves on."""
    maxq = 2**bits - 1
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    out = torch.empty_like(w)
    for c0 in range(0, k, gs):
        x = w[:, c0:c0 + gs]
        xmin = torch.clamp(x.min(dim=1).values, max=0)
        xmax = torch.clamp(x.max(dim=1).values, min=0)
        if sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin[both_zero], xmax[both_zero] = -1.0, 1.0
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale)
        q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, c0:c0 + gs] = scale[:, None] * (q - zero[:, None])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: scripts/fetch_smollm2.py's cache)")
    ap.add_argument("--layer", default="model.layers.12.mlp.down_proj", help="dotted name of an nn.Linear")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="calibration text file (WikiText-2 validation)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows for the error figure")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    ap.add_argument("--desc-act", action="store_true", help="act-order")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model
    if model_dir is None:
        sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
        from fetch_smollm2 import default_out
        model_dir = default_out()
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            sys.exit(f"no model at {model_dir}: run `python scripts/fetch_smollm2.py` first (or pass --model)")
    if not os.path.exists(args.text):
        sys.exit(f"calibration text not found: {args.text} (pass --text FILE)")

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layer = model.get_submodule(args.layer)
    if not isinstance(layer, torch.nn.Linear):
        sys.exit(f"{args.layer} is a {type(layer).__name__}, not an nn.Linear")

    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    gen = torch.Generator().manual_seed(args.seed)
    total = args.nsamples + args.eval_windows
    starts = torch.randint(0, len(ids) - args.seqlen - 1, (total,), generator=gen)
    windows = [ids[s:s + args.seqlen] for s in starts.tolist()]

    captured: list[torch.Tensor] = []

    def hook(_module, inputs):
        captured.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).contiguous())
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    acc = gptqkit.HessianAccumulator(layer.in_features)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, w in enumerate(windows):
            try:
                model(w[None])
            except _Captured:
                pass
            if i < args.nsamples:
                acc.add_batch(captured.pop())
    handle.remove()
    t_calib = time.perf_counter() - t0
    x_eval = torch.cat(captured)

    W = layer.weight.detach().contiguous()
    t0 = time.perf_counter()
    res = gptqkit.quantize_weight(W, acc.hessian(), bits=args.bits, group_size=args.group_size,
                                  sym=not args.asym, desc_act=args.desc_act)
    t_quant = time.perf_counter() - t0
    packed = gptqkit.pack(res.codes, res.zeros, res.scales, res.g_idx, args.bits,
                          format="v2" if args.asym else "v1")
    Q_gptq = gptqkit.dequantize(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, args.bits, packed.format)
    Q_rtn = round_to_nearest(W, args.bits, args.group_size, sym=not args.asym)

    ref = x_eval @ W.T

    def rel_err(Q: torch.Tensor) -> float:
        return float(torch.linalg.norm(x_eval @ Q.T - ref) / torch.linalg.norm(ref))

    e_rtn, e_gptq = rel_err(Q_rtn), rel_err(Q_gptq)
    print(f"layer {args.layer}  weight {tuple(W.shape)}  {args.bits}-bit g{args.group_size} "
          f"{'asym' if args.asym else 'sym'}{' act-order' if args.desc_act else ''}")
    print(f"calibration: {acc.n_samples} tokens ({args.nsamples} x {args.seqlen}) in {t_calib:.1f} s; "
          f"held out: {x_eval.shape[0]} tokens")
    print(f"GPTQ solve: {t_quant * 1000:.0f} ms, damping {res.damp_used:.3g} ({res.damp_attempts} attempt(s)), "
          f"loss {res.loss:.4g}")
    print(f"relative output error  round-to-nearest: {e_rtn:.4f}   GPTQ (packed, dequantized): {e_gptq:.4f}"
          f"   -> {e_rtn / e_gptq:.2f}x lower")
    bytes_q = sum(t.numel() * t.element_size() for t in (packed.qweight, packed.qzeros, packed.scales, packed.g_idx))
    print(f"packed size {bytes_q / 1024:.0f} KiB vs fp16 {W.numel() * 2 / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
