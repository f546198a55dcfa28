"""A random packed GPTQ layer for the GEMM tests (CPU and GPU), built with gptqkit.pack."""

from __future__ import annotations

import torch


def random_packed_layer(gptqkit, n, k, bits, group_size, act_order=False, fmt="v1", seed=0,
                        scale_dtype=torch.float16):
    """Random codes, zeros (>= 1 in v1, which cannot store 0), scales (float16, as checkpoints
    store them, unless ``scale_dtype`` says otherwise) and a natural or shuffled (act-order)
    ``g_idx``, packed into the checkpoint layout."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g)
    zeros = torch.randint(1 if fmt == "v1" else 0, 2 ** bits, (groups, n), dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.05 + 0.001).to(scale_dtype)
    if group_size == -1:
        g_idx = torch.zeros(k, dtype=torch.int32)
    else:
        order = torch.randperm(k, generator=g) if act_order else torch.arange(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return gptqkit.pack(codes, zeros, scales, g_idx, bits, fmt)
