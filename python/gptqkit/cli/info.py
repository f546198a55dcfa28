"""``gptqkit info``: what a GPTQ checkpoint holds, read without loading the model."""

from __future__ import annotations

import json
import os
import re
import textwrap
from typing import Any, Dict, List

from gptqkit.cli._common import UsageError, _HelpFormatter, _fmt_bytes, _folder_size, _natural_key, _quantization_method

INFO_DESCRIPTION = """\
Describe a GPTQ checkpoint without loading the model: its quantization
settings (bits, group size, act-order, symmetric, format, who made it), its
files, a table of the quantized layers (shape, bits, group size, number of
groups, whether act-order reordered the columns, bytes) and totals: bytes of
the quantized layers against the same layers in float16, the resulting bits
per weight (scales and zero points included), and the other tensors
(embeddings, norms) stored unquantized.

Mixture-of-Experts checkpoints hold one layer per expert and projection (a
128-expert, 48-block model has about 18,000); the table shows the experts of
one block's projection that share their shape and settings as one row,
model.layers.0.mlp.experts.{0-127}.down_proj (x128), with their bytes added
up. --per-expert lists every expert layer; --json always does."""

INFO_EPILOG = """\
examples:
  gptqkit info out/smollm2-4bit
  gptqkit info out/smollm2-4bit --json | python -c "import json,sys; print(json.load(sys.stdin)['bits'])"

Reads checkpoints from gptqkit, AutoGPTQ and GPTQModel (gptq and gptq_v2
formats, single-file or sharded)."""



def add_parser(sub, common) -> None:
    """Registers ``info`` on the sub-command parsers ``sub``."""
    i = sub.add_parser("info", parents=[common], formatter_class=_HelpFormatter,
                       help="settings, per-layer table and sizes of a GPTQ checkpoint",
                       description=INFO_DESCRIPTION, epilog=INFO_EPILOG)
    i.add_argument("checkpoint", metavar="CHECKPOINT", help="a GPTQ checkpoint folder")
    i.add_argument("--json", action="store_true", help="print everything as JSON (machine-readable)")
    i.add_argument("--per-expert", action="store_true",
                   help="one table row per expert layer (default: a block's experts with the same shape and "
                        "settings share one row)")
    i.set_defaults(func=cmd_info)


_EXPERT_LAYER = re.compile(r"^(.*\.experts\.)(\d+)(\..+)$")
_ROW_KEYS = ("out_features", "in_features", "bits", "group_size", "groups", "act_order")


def _index_ranges(indices: List[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ",".join(parts)


def _layer_rows(layers: Dict[str, Dict[str, Any]], per_expert: bool) -> List[tuple]:
    """``(label, layer dict)`` table rows in natural order; unless ``per_expert``, the experts of one
    ``...experts.<e>.<proj>`` family with equal shape and settings become one row, bytes summed."""
    order: List[tuple] = []  # ("layer", name) or ("family", key), at the first member's place
    families: Dict[tuple, List[tuple]] = {}
    for name in sorted(layers, key=_natural_key):
        m = None if per_expert else _EXPERT_LAYER.match(name)
        if m is None:
            order.append(("layer", name))
            continue
        key = (m.group(1), m.group(3)) + tuple(layers[name].get(k) for k in _ROW_KEYS)
        if key not in families:
            families[key] = []
            order.append(("family", key))
        families[key].append((int(m.group(2)), name))
    rows = []
    for kind, ref in order:
        members = sorted(families[ref]) if kind == "family" else [(None, ref)]
        if len(members) == 1:
            rows.append((members[0][1], layers[members[0][1]]))
            continue
        merged = dict(layers[members[0][1]])
        merged["bytes"] = sum(layers[name].get("bytes") or 0 for _, name in members)
        label = f"{ref[0]}{{{_index_ranges([k for k, _ in members])}}}{ref[1]} (x{len(members)})"
        rows.append((label, merged))
    return rows


def _info_text(info: Dict[str, Any], disk: tuple, per_expert: bool = False) -> str:
    qc = info.get("quantization_config") or {}
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    lines = []
    arch = ", ".join(info.get("architectures") or []) or "?"
    lines.append(f"checkpoint:   {os.path.abspath(info['path'])}")
    lines.append(f"model:        {info.get('model_type') or '?'} ({arch})")
    if meta.get("quantizer"):
        lines.append(f"made by:      {meta['quantizer']}")
    fmt = info.get("checkpoint_format")
    lines.append(f"format:       {fmt} ({'true zero points' if fmt == 'gptq_v2' else 'v1: zero points stored minus 1'})")
    onoff = lambda v: "on" if v else "off"  # noqa: E731
    settings = [f"bits {info['bits']}", f"group size {info['group_size']}",
                "sym" if info.get("sym") else "asym", f"act-order (desc_act) {onoff(info.get('desc_act'))}"]
    for key, label in (("act_group_aware", "group-aware order"), ("static_groups", "static groups"),
                       ("true_sequential", "true-sequential")):
        v = qc.get(key, meta.get(key))
        if v is not None:
            settings.append(f"{label} {onoff(v)}")
    for key, label in (("damp_percent", "damp"), ("clip_steps", "clip steps"), ("clip_min_ratio", "clip min ratio")):
        v = qc.get(key, meta.get(key))
        if v is not None:
            settings.append(f"{label} {v}")
    gptaq = meta.get("gptaq")
    if isinstance(gptaq, dict):
        settings.append(f"asymmetric calibration (gptaq) alpha {gptaq.get('alpha')}")
    lines.append("settings:     " + textwrap.fill(", ".join(settings), width=86, subsequent_indent=" " * 14,
                                                 break_on_hyphens=False))
    if qc.get("dynamic"):
        lines.append(f"dynamic:      {json.dumps(qc['dynamic'])}")
    if qc.get("lm_head"):
        lines.append("lm_head:      quantized")
    files = info.get("files") or []
    shown = ", ".join(files[:4]) + (f", ... ({len(files)} files)" if len(files) > 4 else "")
    lines.append(f"weights:      {shown}")
    lines.append(f"on disk:      {_fmt_bytes(disk[0])} in {disk[1]} files")
    lines.append("")

    layers = info.get("layers") or {}
    if layers:
        rows = _layer_rows(layers, per_expert)
        w = max(len("layer"), max(len(n) for n, _ in rows))
        head = f"{'layer':<{w}}  {'out x in':>13}  {'bits':>4}  {'group':>5}  {'groups':>6}  {'act-order':>9}  {'bytes':>9}"
        lines.append(head)
        lines.append("-" * len(head))
        for n, L in rows:
            shape = f"{L.get('out_features')} x {L.get('in_features')}"
            lines.append(f"{n:<{w}}  {shape:>13}  {L.get('bits')!s:>4}  {L.get('group_size')!s:>5}  "
                         f"{L.get('groups')!s:>6}  {'yes' if L.get('act_order') else 'no':>9}  "
                         f"{_fmt_bytes(L.get('bytes')):>9}")
        lines.append("")
    weights = sum((L.get("in_features") or 0) * (L.get("out_features") or 0) for L in layers.values())
    qb, fb = info.get("quantized_bytes") or 0, info.get("fp16_bytes") or 0
    ratio = f", {fb / qb:.2f}x smaller" if qb else ""
    bpw = f", {qb * 8 / weights:.2f} bits per weight with scales and zeros" if weights else ""
    lines.append(f"quantized layers: {info.get('num_quantized_layers', len(layers))}, "
                 f"{_fmt_bytes(qb)} vs {_fmt_bytes(fb)} in float16{ratio}{bpw}")
    lines.append(f"other tensors:    {_fmt_bytes(info.get('other_bytes'))} (embeddings, norms, ... unquantized)")
    lines.append(f"all tensors:      {_fmt_bytes(info.get('total_bytes'))}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    path = os.path.expanduser(args.checkpoint)
    if not os.path.exists(path):
        raise UsageError(f"CHECKPOINT {args.checkpoint!r}: no such folder")
    if not os.path.isdir(path):
        raise UsageError(f"CHECKPOINT {args.checkpoint!r}: expected a checkpoint folder, got a file")
    if os.path.isfile(os.path.join(path, "config.json")) and _quantization_method(path) is None:
        raise UsageError(f"CHECKPOINT {args.checkpoint!r}: not a GPTQ checkpoint (its config.json has no "
                         f"quantization_config and there is no quantize_config.json); a full-precision model "
                         f"is quantized with 'gptqkit quantize'")
    from gptqkit.checkpoint import checkpoint_info

    info = checkpoint_info(path)
    disk = _folder_size(path)
    if args.json:
        out = dict(info)
        out["disk_bytes"], out["disk_files"] = disk
        print(json.dumps(out, indent=2, default=str))
    else:
        print(_info_text(info, disk, per_expert=args.per_expert))
    return 0

