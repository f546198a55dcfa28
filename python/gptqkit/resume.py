"""Resumable quantization: finished blocks kept on disk as the run goes.

Quantizing a large model takes hours, and a crash, an out-of-memory kill or a
lost spot instance near the end should not cost the blocks already done.
With ``GPTQForCausalLM.quantize(..., resume_dir=DIR)`` (the CLI uses
``OUT.partial`` by default) every finished decoder block is written to
``DIR/block-NNNNN.safetensors`` (its quantized layers' packed tensors and
their per-layer reports) the moment it is done, each file atomically (a
temporary name, then a rename). Run the same quantization again and the
blocks found there are restored instead of quantized: their packed weights
are loaded, and the block runs forward once on the calibration inputs, with
the same dequantized weights the original run used, to produce the next
block's inputs. The result is the checkpoint the uninterrupted run would
have written.

``DIR/manifest.json`` holds a fingerprint of what decides the result: the
quantization settings, the calibration tokens, the model's config and a
sample of every block's weights. A store made by a different run is never
mixed in: :class:`ResumeStore` raises ``ValueError`` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

MANIFEST_FILE = "manifest.json"
STORE_VERSION = 1
_BLOCK_FILE = "block-{:05d}.safetensors"
#: values sampled from the start of every Linear-like weight for the model's fingerprint
_WEIGHT_SAMPLE = 64


def _sha256(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def calibration_fingerprint(batches: Sequence[Dict[str, torch.Tensor]]) -> str:
    """sha256 of the calibration batches' token ids and attention masks, in order."""
    def chunks():
        for b in batches:
            for key in ("input_ids", "attention_mask"):
                t = b[key]
                yield f"{key}{tuple(t.shape)}".encode()
                yield _tensor_bytes(t.to(torch.int64))
    return _sha256(chunks())


def model_fingerprint(model: torch.nn.Module, blocks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    """What identifies the model: its config (minus bookkeeping keys) and the first
    values of every Linear-like weight of every block (a different checkpoint of the
    same architecture, e.g. a fine-tune, differs there)."""
    from .discovery import find_linear_layers

    config = getattr(model, "config", None)
    cfg = {}
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items()
               if not k.startswith("_") and k not in ("transformers_version", "quantization_config", "use_cache",
                                                       "torch_dtype", "dtype")}
    config_hash = _sha256([json.dumps(cfg, sort_keys=True, default=str).encode()])

    def chunks():
        for i, block in enumerate(blocks):
            for name, layer in sorted(find_linear_layers(block).items()):
                w = getattr(layer, "weight", None)
                if w is None or w.device.type == "meta":
                    continue
                yield f"{i}.{name}{tuple(w.shape)}".encode()
                yield _tensor_bytes(w.detach().reshape(-1)[:_WEIGHT_SAMPLE].float())
    return {"config": config_hash, "weights": _sha256(chunks()), "blocks": len(blocks)}


def _write_atomically(path: str, write) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ResumeStore:
    """The finished blocks of one quantization run, in a folder.

    Args:
        path: the folder (created if missing).
        fingerprint: JSON-serialisable description of the run (settings,
            calibration, model; see :func:`calibration_fingerprint`,
            :func:`model_fingerprint`).

    Raises:
        ValueError: the folder holds a store of a different run (the message
            names the differing entries), or of another store version, or its
            manifest is unreadable.
    """

    def __init__(self, path: Union[str, os.PathLike], fingerprint: Dict[str, Any]):
        self.path = os.fspath(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"resume_dir: {self.path} exists and is not a folder")
        os.makedirs(self.path, exist_ok=True)
        manifest = os.path.join(self.path, MANIFEST_FILE)
        if os.path.exists(manifest):
            try:
                with open(manifest) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as exc:
                raise ValueError(f"resume_dir: {manifest} is unreadable ({exc}); delete {self.path} to start over") \
                    from None
            if not isinstance(saved, dict) or saved.get("version") != STORE_VERSION:
                raise ValueError(f"resume_dir: {manifest} is not a gptqkit store of version {STORE_VERSION}; "
                                 f"delete {self.path} to start over")
            differs = _differences(saved.get("fingerprint"), self.fingerprint)
            if differs:
                raise ValueError(f"resume_dir: {self.path} holds the blocks of a different run ({'; '.join(differs)}); "
                                 "delete it (CLI: --no-resume) to start over, or use another folder")
        else:
            body = json.dumps({"version": STORE_VERSION, "fingerprint": self.fingerprint}, indent=2, sort_keys=True)

            def write(tmp):
                with open(tmp, "w") as f:
                    f.write(body + "\n")
            _write_atomically(manifest, write)

    def block_path(self, index: int) -> str:
        return os.path.join(self.path, _BLOCK_FILE.format(index))

    def finished_blocks(self) -> int:
        """How many blocks, from block 0 on without a gap, are stored."""
        n = 0
        while os.path.exists(self.block_path(n)):
            n += 1
        return n

    def save_block(self, index: int, layers: Dict[str, Any], reports: List[Dict[str, Any]],
                   skipped: List[str]) -> None:
        """Stores block ``index``: ``layers`` maps relative names to QuantLinear layers."""
        from safetensors.torch import save_file

        tensors, meta = {}, []
        for name, q in layers.items():
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                tensors[f"{name}.{key}"] = getattr(q, key).detach().to("cpu").contiguous()
            meta.append({"name": name, "bits": q.bits, "group_size": q.group_size, "format": q.format,
                         "in_features": q.in_features, "out_features": q.out_features})
        metadata = {"gptqkit_block": str(index), "layers": json.dumps(meta), "reports": json.dumps(reports),
                    "skipped": json.dumps(list(skipped))}
        _write_atomically(self.block_path(index), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def load_block(self, index: int) -> Tuple[Dict[str, Any], List[Dict[str, Any]], List[str]]:
        """Block ``index`` as ``({name: PackedLayer}, reports, skipped)``.

        Raises:
            ValueError: the file is unreadable or inconsistent (naming it).
        """
        from safetensors import safe_open

        from .packing import PackedLayer

        path = self.block_path(index)
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                layers_meta = json.loads(metadata["layers"])
                reports = json.loads(metadata["reports"])
                skipped = json.loads(metadata["skipped"])
                if metadata.get("gptqkit_block") != str(index):
                    raise ValueError(f"it holds block {metadata.get('gptqkit_block')!r}")
                packed = {}
                for m in layers_meta:
                    t = {key: f.get_tensor(f"{m['name']}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx")}
                    packed[m["name"]] = (PackedLayer(bits=int(m["bits"]), in_features=int(m["in_features"]),
                                                     out_features=int(m["out_features"]), format=m["format"], **t),
                                         int(m["group_size"]))
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"resume_dir: {path} is unreadable ({type(exc).__name__}: {exc}); delete it and the "
                             "block files after it to quantize those blocks again") from None
        return packed, reports, skipped


def _differences(saved: Optional[Dict[str, Any]], now: Dict[str, Any], prefix: str = "") -> List[str]:
    if not isinstance(saved, dict):
        return ["no fingerprint"]
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            what = f"{prefix}{key}"
            if isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or key in ("calibration", "weights", "config"):
                out.append(f"{what} differs")
            else:
                out.append(f"{what}: {a!r} there, {b!r} now")
    return out
