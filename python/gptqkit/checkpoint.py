"""Saving, loading and inspecting GPTQ checkpoints.

A checkpoint is a folder holding

* the weights as safetensors: ``model.safetensors``, or shards
  ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``
  when they exceed ``max_shard_size``. A quantized layer ``P`` is stored as
  ``P.qweight``, ``P.qzeros``, ``P.scales``, ``P.g_idx`` (+ ``P.bias``), see
  ``docs/format.md``; every other tensor is stored unchanged in its dtype.
  Tied weights are stored once (an output embedding tied to the input
  embedding is omitted, as transformers does);
* ``config.json`` (the model's transformers config with a
  ``quantization_config`` entry) and ``quantize_config.json`` (the same
  settings, for AutoGPTQ/GPTQModel-style readers);
* ``generation_config.json`` and the tokenizer files when available.

:func:`save_checkpoint` writes atomically, :func:`load_checkpoint` rebuilds
the transformers model with :class:`gptqkit.nn.QuantLinear` layers and
validates every tensor, :func:`checkpoint_info` summarises a checkpoint
without loading it (``gptqkit info``).

Checkpoints written by AutoGPTQ and GPTQModel load too: ``gptq`` (v1) and
``gptq_v2`` zero-point formats, act-order ``g_idx``, single-file and sharded,
AutoGPTQ's ``quantize_config.json``-only folders and its
``model_file_base_name`` weight file names.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from gptqkit.config import QuantizeConfig, dynamic_for_readers
from gptqkit.discovery import UnsupportedModelError, find_blocks, is_linear_like
from gptqkit.moe import defuse_experts, fused_experts
from gptqkit.nn.quant_linear import QuantLinear, _linear_features, _num_groups
from gptqkit.packing import packed_words

__all__ = ["CheckpointError", "checkpoint_info", "load_checkpoint", "parse_size", "save_checkpoint"]

CONFIG_NAME = "config.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_BITS = (2, 3, 4, 8)

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded as asked; the message names the file or tensor."""


# =========================================================================== sizes

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: Union[int, str], what: str = "max_shard_size") -> int:
    """Bytes in ``size``: an int, or a string like ``"2GB"``, ``"500MB"``, ``"1.5GiB"``, ``"64KB"``.

    Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units (KiB,
    MiB, GiB, TiB) powers of 1024, as in transformers' ``max_shard_size``.
    ``what`` names the argument in error messages.
    """
    if isinstance(size, bool):
        raise ValueError(f"{what}: expected bytes or a size like '2GB', got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"{what}: expected a positive size, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{what}: expected bytes or a size like '2GB', '500MB', '1GiB', got {size!r}")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"{what}: expected a positive size, got {size!r}")
    return int(value)


# =========================================================================== helpers shared by save and load

def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON in {what} ({exc})") from None


def _tied_map(model: nn.Module) -> Dict[str, str]:
    """``{target: source}`` names of tied parameters (e.g. ``lm_head.weight -> model.embed_tokens.weight``)."""
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    if getter is not None:
        try:
            return dict(getter(all_submodels=True))
        except Exception:  # pragma: no cover - unusual tying patterns
            pass
    # Older transformers: only the word embeddings.
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    except Exception:
        return {}
    if out_emb is None or in_emb is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    if id(out_emb) not in names or id(in_emb) not in names:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def _module_and_attr(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _layer_format(checkpoint_format: str) -> str:
    return "v2" if checkpoint_format == "gptq_v2" else "v1"


# =========================================================================== save

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if sys.platform.startswith("win"):  # pragma: no cover - directories cannot be fsynced there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


def _write_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """Writes one safetensors file and flushes it to disk (a seam for the atomicity tests)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    _fsync_file(path)


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False when unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _is_gptq_checkpoint(folder: Path) -> bool:
    """True for a folder holding a GPTQ checkpoint (the only kind of non-empty folder save may replace)."""
    if (folder / QUANTIZE_CONFIG_NAME).is_file():
        return True
    try:
        with open(folder / CONFIG_NAME, "r", encoding="utf-8") as f:
            return isinstance(json.load(f).get("quantization_config"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _swap_into_place(new: Path, out: Path) -> None:
    """Makes the complete folder ``new`` appear at ``out``; a previous ``out`` is deleted only afterwards."""
    parent = out.parent
    if not out.exists():
        os.rename(new, out)
        _fsync_dir(parent)
        return
    if _rename_exchange(new, out):  # atomic: `out` is now the new checkpoint, `new` the old one
        _fsync_dir(parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = parent / f".{out.name}.gptqkit-old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)  # put the previous checkpoint back
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def _plan_shards(names: List[str], tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    """Greedy shards in state-dict order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: List[List[str]] = [[]]
    size = 0
    for name in names:
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _state_for_saving(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's persistent tensors, tied copies removed, on the CPU and contiguous."""
    state = model.state_dict()
    for target, source in _tied_map(model).items():
        if target in state and source in state and target != source:
            a, b = state[target], state[source]
            if a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape:
                del state[target]
    out: Dict[str, torch.Tensor] = {}
    seen_storage: Dict[Tuple[int, int], str] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise CheckpointError(f"{name}: the tensor is on the meta device (no data); load or quantize the "
                                  f"model fully before saving")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (id(t), 0)
        if key in seen_storage:  # shared memory that is not a declared tie: store an independent copy
            t = t.clone()
        else:
            seen_storage[key] = name
        out[name] = t
    return out


def _check_layers_against_config(model: nn.Module, qcfg: QuantizeConfig) -> None:
    fmt = _layer_format(qcfg.checkpoint_format)
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        settings = qcfg.resolve(name)
        if settings is None:
            raise CheckpointError(f"{name}: is quantized, but the quantization config's dynamic rules skip it")
        if module.bits != settings.bits:
            raise CheckpointError(f"{name}: quantized with bits={module.bits}, but the quantization config says "
                                  f"bits={settings.bits} for it")
        expected_groups = _num_groups(module.in_features, settings.group_size)
        if module.scales.shape[0] != expected_groups:
            raise CheckpointError(f"{name}: has {module.scales.shape[0]} groups, but group_size="
                                  f"{settings.group_size} from the quantization config gives {expected_groups}")
        if module.format != fmt:
            raise CheckpointError(f"{name}: stores {module.format} zero points, but checkpoint_format is "
                                  f"{qcfg.checkpoint_format!r} ({fmt})")


def _block_layers(model: nn.Module, blocks_path: str) -> tuple:
    """``(quantized, full_precision)``: block-relative layer name -> the block indices where it is a
    :class:`QuantLinear`, or a linear layer left in full precision."""
    quantized: Dict[str, List[int]] = {}
    full_precision: Dict[str, List[int]] = {}
    for index, block in enumerate(model.get_submodule(blocks_path)):
        for name, module in block.named_modules():
            if isinstance(module, QuantLinear):
                quantized.setdefault(name, []).append(index)
            elif name and is_linear_like(module):
                full_precision.setdefault(name, []).append(index)
    return quantized, full_precision


def declare_unquantized_layers(quantization_config: Mapping[str, Any], model: nn.Module,
                               blocks_path: str, layers: Optional[tuple] = None) -> Dict[str, Any]:
    """``quantization_config`` extended so that other readers leave full-precision block layers alone.

    transformers (through optimum) turns *every* Linear layer of the decoder
    blocks into a GPTQ layer unless ``modules_in_block_to_quantize`` lists the
    quantized ones, and GPTQModel follows its model definition and the
    ``dynamic`` rules. A layer gptqkit left in full precision (fewer than 32
    outputs such as Qwen2-MoE's ``shared_expert_gate``, a ``dynamic`` skip, a
    narrowed ``modules_in_block_to_quantize``) would otherwise become an empty
    GPTQ layer in those readers, or be refused. When a block holds such a
    layer, this adds

    * ``modules_in_block_to_quantize`` (unless the config already narrows the
      layers): one list of the quantized layers, by block-relative name, or by
      full name for one quantized in some blocks only (optimum matches the
      entries as suffixes of full names; GPTQModel ignores the list);
    * a ``dynamic`` skip rule (``"-:"``, GPTQModel's spelling, see
      :func:`gptqkit.config.dynamic_for_readers`) per full-precision layer
      name that no existing rule skips, for the blocks where it stays in full
      precision (``\\d+`` if in all of them).

    A model whose block layers are all quantized gets the config unchanged.
    ``layers``: :func:`_block_layers` of the model, when the caller has it already.
    """
    quantized, full_precision = layers if layers is not None else _block_layers(model, blocks_path)
    out = copy.deepcopy(dict(quantization_config))
    if not full_precision:
        return out
    if out.get("modules_in_block_to_quantize") is None:
        out["modules_in_block_to_quantize"] = [[
            entry for name, indices in quantized.items()
            for entry in ([name] if name not in full_precision else [f"{blocks_path}.{i}.{name}" for i in indices])]]
    already = QuantizeConfig(dynamic=out.get("dynamic"))
    dynamic = dict(out.get("dynamic") or {})
    for name, indices in full_precision.items():
        if all(already.resolve(f"{blocks_path}.{i}.{name}") is None for i in indices):
            continue
        where = r"\d+" if name not in quantized else "(?:" + "|".join(map(str, indices)) + ")"
        dynamic[f"-:{re.escape(blocks_path)}\\.{where}\\.{re.escape(name)}$"] = {}
    if dynamic:
        out["dynamic"] = dynamic_for_readers(dynamic)
    return out


def save_checkpoint(model: nn.Module, out_dir: PathLike, quantize_config_dict: Optional[Mapping[str, Any]] = None,
                    quantization_config_dict: Optional[Mapping[str, Any]] = None, tokenizer: Any = None,
                    max_shard_size: Union[int, str] = "2GB", blocks_path: Optional[str] = None) -> str:
    """Writes a quantized transformers model as a GPTQ checkpoint folder, atomically.

    Args:
        model: a transformers causal LM whose quantized layers are
            :class:`gptqkit.nn.QuantLinear`.
        out_dir: the checkpoint folder (symlinks resolved). An existing GPTQ
            checkpoint there is replaced as a whole; any other non-empty
            folder (e.g. the original full-precision model) is refused and
            left untouched.
        quantize_config_dict: written as ``quantize_config.json`` (e.g.
            ``QuantizeConfig.to_quantization_config()``). ``None``: the same
            dict as ``quantization_config_dict``.
        quantization_config_dict: stored as ``config.json``'s
            ``quantization_config``. ``None``: ``quantize_config_dict`` with
            ``quant_method: "gptq"``. At least one of the two is required.
        tokenizer: saved with ``save_pretrained`` when given.
        max_shard_size: shards above this size (``"2GB"``, ``"500MB"``, bytes).
        blocks_path: dotted path of the decoder blocks' ModuleList (found as
            :func:`gptqkit.discovery.find_blocks` does when ``None``). Block
            layers left in full precision are declared in both configs, see
            :func:`declare_unquantized_layers`.

    Every layer is checked against the config (bits, number of groups,
    zero-point format, ``dynamic`` rules) before anything is written.

    Atomicity: everything is written into a hidden temporary sibling folder
    (``.NAME.gptqkit-tmp-*``; ``config.json`` last), each file fsynced; the
    finished folder is then swapped in with renames (one atomic exchange on
    Linux) and only then is a previous checkpoint deleted. A crash or an
    exception mid-save leaves the previous checkpoint untouched and no
    folder at ``out_dir`` that looks valid; on an exception the temporary
    folder is removed.

    Returns:
        The checkpoint folder's path.
    """
    if quantize_config_dict is None and quantization_config_dict is None:
        raise ValueError("save_checkpoint: pass quantize_config_dict and/or quantization_config_dict")
    if quantization_config_dict is None:
        quantization_config_dict = dict(quantize_config_dict)
        quantization_config_dict.setdefault("quant_method", "gptq")
    if quantize_config_dict is None:
        quantize_config_dict = dict(quantization_config_dict)
    if blocks_path is None:
        try:
            blocks_path = find_blocks(model)[0]
        except UnsupportedModelError:
            pass  # no decoder blocks to declare anything about
    if blocks_path is not None:
        layers = _block_layers(model, blocks_path)
        quantization_config_dict = declare_unquantized_layers(quantization_config_dict, model, blocks_path, layers)
        quantize_config_dict = declare_unquantized_layers(quantize_config_dict, model, blocks_path, layers)
    quantization_config_dict = copy.deepcopy(dict(quantization_config_dict))
    quantize_config_dict = copy.deepcopy(dict(quantize_config_dict))
    qcfg = QuantizeConfig.from_quantization_config(quantization_config_dict)
    qcfg_file = QuantizeConfig.from_quantization_config(quantize_config_dict)
    for key in ("bits", "group_size", "desc_act", "sym", "checkpoint_format"):
        if getattr(qcfg, key) != getattr(qcfg_file, key):
            raise ValueError(f"save_checkpoint: quantize_config_dict and quantization_config_dict disagree on "
                             f"{key}: {getattr(qcfg_file, key)!r} vs {getattr(qcfg, key)!r}")
    max_bytes = parse_size(max_shard_size)
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise CheckpointError("save_checkpoint: the model has no QuantLinear layer (quantize it first)")
    from gptqkit.nn.fusion import fused_groups

    if fused_groups(model):
        raise CheckpointError("save_checkpoint: the model has fused projections (gptqkit.nn.fuse_projections); call "
                              "gptqkit.nn.unfuse_projections(model) first (GPTQForCausalLM.save_quantized does it "
                              "by itself)")
    _check_layers_against_config(model, qcfg)

    out = Path(os.path.realpath(os.fspath(out_dir)))
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_gptq_checkpoint(out):
        raise CheckpointError(f"{out}: is a non-empty folder that is not a GPTQ checkpoint; refusing to replace "
                              f"it (saving replaces the whole folder: choose a new or empty folder)")

    tensors = _state_for_saving(model)
    names = list(tensors)
    shards = _plan_shards(names, tensors, max_bytes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.gptqkit-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # (not mkdtemp: its 0700 mode would stick to the checkpoint)
    try:
        metadata = {"format": "pt"}
        if len(shards) == 1:
            _write_safetensors({n: tensors[n] for n in shards[0]}, tmp / WEIGHTS_NAME, metadata)
        else:
            weight_map: Dict[str, str] = {}
            total = len(shards)
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{total:05d}.safetensors"
                _write_safetensors({n: tensors[n] for n in shard}, tmp / fname, metadata)
                weight_map.update({n: fname for n in shard})
            total_size = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                        tmp / WEIGHTS_INDEX_NAME)
        _write_json(quantize_config_dict, tmp / QUANTIZE_CONFIG_NAME)

        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

        # config.json last: a folder without it is never mistaken for a checkpoint.
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config_dict
        config.architectures = [type(model).__name__]
        if getattr(config, "dtype", None) is None:  # record the dtype of the unquantized weights
            floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
            if floats:
                config.dtype = floats[0]
        config.save_pretrained(str(tmp))
        for p in tmp.iterdir():
            if p.is_file():
                _fsync_file(p)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


# =========================================================================== reading tensors

class _TensorStore:
    """Every tensor of a checkpoint's safetensors file(s), opened once, errors naming file and tensor."""

    def __init__(self, folder: Path, base_name: Optional[str] = None):
        from safetensors import safe_open

        self.folder = folder
        self._stack = contextlib.ExitStack()
        self.where: Dict[str, str] = {}  # tensor name -> file name
        self._handles: Dict[str, Any] = {}
        index_path, single = self._discover(folder, base_name)
        try:
            if index_path is not None:
                index = _read_json(index_path, "the shard index")
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
                files = sorted(set(weight_map.values()))
                for fname in files:
                    if not (folder / fname).is_file():
                        raise CheckpointError(f"{folder / fname}: shard listed in {index_path.name} is missing")
                for fname in files:
                    keys = self._open(safe_open, fname)
                    listed = {k for k, v in weight_map.items() if v == fname}
                    extra = sorted(keys - listed)
                    if extra:
                        raise CheckpointError(f"{fname}: holds tensor(s) {extra[:5]} that {index_path.name} does "
                                              f"not list (inconsistent shard index)")
                    absent = sorted(listed - keys)
                    if absent:
                        raise CheckpointError(f"{absent[0]}: missing tensor ({index_path.name} places it in "
                                              f"{fname}, which does not hold it)")
                self.where = dict(weight_map)
            else:
                keys = self._open(safe_open, single)
                self.where = {k: single for k in keys}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _discover(folder: Path, base_name: Optional[str]) -> Tuple[Optional[Path], Optional[str]]:
        candidates = []
        if base_name:
            candidates.append(base_name)
        candidates.append("model")
        for base in candidates:
            if (folder / f"{base}.safetensors.index.json").is_file():
                return folder / f"{base}.safetensors.index.json", None
            if (folder / f"{base}.safetensors").is_file():
                return None, f"{base}.safetensors"
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(found) == 1:
            return None, found[0]
        if len(found) > 1:
            raise CheckpointError(f"{folder}: several safetensors files {found[:4]} but no "
                                  f"{WEIGHTS_INDEX_NAME} saying which tensors they hold")
        legacy = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if legacy:
            raise CheckpointError(f"{folder}: only pickled weights {legacy[:3]}; gptqkit loads safetensors "
                                  f"checkpoints only (convert them with safetensors.torch.save_file)")
        raise CheckpointError(f"{folder}: no weights (expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")

    def _open(self, safe_open: Callable, fname: str) -> set:
        path = self.folder / fname
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            keys = set(handle.keys())
        except Exception as exc:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
        self._handles[fname] = handle
        return keys

    def keys(self) -> Iterable[str]:
        return self.where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def meta(self, name: str) -> Tuple[Tuple[int, ...], str]:
        """``(shape, safetensors dtype string)`` from the header only."""
        fname = self.where[name]
        try:
            sl = self._handles[fname].get_slice(name)
            return tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype())
        except Exception as exc:
            raise CheckpointError(f"{name}: cannot read its header in {fname} ({exc})") from None

    def get(self, name: str) -> torch.Tensor:
        fname = self.where[name]
        try:
            return self._handles[fname].get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{name}: cannot read it from {self.folder / fname}: corrupt or unreadable "
                                  f"safetensors file ({exc})") from None

    def files(self) -> List[str]:
        return sorted(set(self.where.values()))

    def close(self) -> None:
        self._stack.close()


# =========================================================================== configuration of a checkpoint

def _checkpoint_folder(path: PathLike) -> Path:
    folder = Path(os.fspath(path))
    if not folder.exists():
        hint = ""
        if folder.parent.is_dir():
            leftovers = sorted(p.name for p in folder.parent.glob(f".{folder.name}.gptqkit-*"))
            if leftovers:
                hint = (f" (found {leftovers[:3]} next to it: a save into this path was interrupted; a folder "
                        f"'-old-' is the previous checkpoint, '-tmp-' an unfinished one)")
        raise FileNotFoundError(f"{folder}: no such checkpoint folder{hint}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a checkpoint folder, got a file")
    return folder


def _read_quantization(folder: Path) -> Tuple[Dict[str, Any], Dict[str, Any], QuantizeConfig]:
    """``(config.json dict, merged quantization dict, QuantizeConfig)`` of a checkpoint folder."""
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (the model's transformers config is needed)")
    raw = _read_json(cfg_path, CONFIG_NAME)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    in_config = raw.get("quantization_config")
    qfile_path = folder / QUANTIZE_CONFIG_NAME
    in_file = _read_json(qfile_path, QUANTIZE_CONFIG_NAME) if qfile_path.is_file() else None
    if in_config is None and in_file is None:
        raise CheckpointError(f"{folder}: not a GPTQ checkpoint (no quantization_config in {CONFIG_NAME} and no "
                              f"{QUANTIZE_CONFIG_NAME})")
    for d, where in ((in_config, f"{CONFIG_NAME}: quantization_config"), (in_file, QUANTIZE_CONFIG_NAME)):
        if d is not None and not isinstance(d, dict):
            raise CheckpointError(f"{folder / where.split(':')[0]}: {where} must be a JSON object")
    merged: Dict[str, Any] = dict(in_file or {})
    merged.update(in_config or {})
    try:
        qcfg = QuantizeConfig.from_quantization_config(merged)
    except ValueError as exc:
        raise CheckpointError(f"{folder}: invalid quantization config: {exc}") from None
    if in_config is not None and in_file is not None:
        try:
            a = QuantizeConfig.from_quantization_config(in_config)
            b = QuantizeConfig.from_quantization_config(in_file)
        except ValueError as exc:
            raise CheckpointError(f"{folder}: invalid quantization config: {exc}") from None
        for key in ("bits", "group_size", "desc_act", "sym", "checkpoint_format"):
            if getattr(a, key) != getattr(b, key):
                raise CheckpointError(f"{folder}: {CONFIG_NAME} says {key}={getattr(a, key)!r} but "
                                      f"{QUANTIZE_CONFIG_NAME} says {key}={getattr(b, key)!r}")
    return raw, merged, qcfg


# =========================================================================== validation of one quantized layer

def _fits_bits(rows: int, k: int) -> List[int]:
    return [b for b in _SUPPORTED_BITS if packed_words(k, b) == rows]


def _validate_layer(store: _TensorStore, key_of: Callable[[str], str], name: str, k: int, n: int, bits: int,
                    group_size: int, desc_act: bool, static_groups: bool) -> Dict[str, torch.Tensor]:
    """Reads and checks the tensors of quantized layer ``name``; returns them by short name."""
    groups = _num_groups(k, group_size)
    src = {t: key_of(f"{name}.{t}") for t in QUANT_TENSORS}
    for t in ("qweight", "qzeros", "scales"):
        if src[t] not in store:
            raise CheckpointError(f"{src[t]}: missing tensor (layer {name} is stored quantized and needs "
                                  f"qweight, qzeros, scales and g_idx)")
    out: Dict[str, torch.Tensor] = {}

    # qweight int32 [packed_words(K, bits), N]
    shape, dtype = store.meta(src["qweight"])
    if dtype != "I32":
        raise CheckpointError(f"{src['qweight']}: expected dtype int32, got {dtype}")
    if len(shape) != 2 or shape[1] != n:
        raise CheckpointError(f"{src['qweight']}: expected shape [{packed_words(k, bits)}, {n}] "
                              f"([packed_words(in_features={k}, bits={bits}), out_features={n}]), got {list(shape)}")
    if shape[0] != packed_words(k, bits):
        fits = _fits_bits(shape[0], k)
        if fits:
            raise CheckpointError(f"{src['qweight']}: has {shape[0]} rows, which fits bits={fits[0]} for "
                                  f"in_features={k}, but the quantization config says bits={bits} "
                                  f"(the config contradicts the tensors)")
        raise CheckpointError(f"{src['qweight']}: expected shape [{packed_words(k, bits)}, {n}] "
                              f"([packed_words(in_features={k}, bits={bits}), out_features={n}]), got {list(shape)}")

    # scales [G, N] float
    shape, dtype = store.meta(src["scales"])
    if dtype not in ("F16", "F32", "BF16"):
        raise CheckpointError(f"{src['scales']}: expected dtype float16, float32 or bfloat16, got {dtype}")
    if len(shape) != 2 or shape[1] != n:
        raise CheckpointError(f"{src['scales']}: expected shape [{groups}, {n}] ([groups, out_features]), got "
                              f"{list(shape)}")
    if shape[0] != groups:
        raise CheckpointError(f"{src['scales']}: has {shape[0]} groups, but group_size={group_size} with "
                              f"in_features={k} gives {groups} (the config contradicts the tensors)")

    # qzeros int32 [G, packed_words(N, bits)]
    shape, dtype = store.meta(src["qzeros"])
    if dtype != "I32":
        raise CheckpointError(f"{src['qzeros']}: expected dtype int32, got {dtype}")
    want = [groups, packed_words(n, bits)]
    if list(shape) != want:
        raise CheckpointError(f"{src['qzeros']}: expected shape {want} ([groups, packed_words(out_features={n}, "
                              f"bits={bits})]), got {list(shape)}")

    for t in ("qweight", "qzeros", "scales"):
        out[t] = store.get(src[t])

    # g_idx int32 [K], values in [0, G)
    trivial = (torch.arange(k, dtype=torch.int32) // group_size if group_size > 0
               else torch.zeros(k, dtype=torch.int32))
    if src["g_idx"] in store:
        shape, dtype = store.meta(src["g_idx"])
        if dtype not in ("I32", "I64"):
            raise CheckpointError(f"{src['g_idx']}: expected dtype int32, got {dtype}")
        if list(shape) != [k]:
            raise CheckpointError(f"{src['g_idx']}: expected shape [{k}] ([in_features]), got {list(shape)}")
        g_idx = store.get(src["g_idx"])
        if k:
            lo, hi = int(g_idx.min()), int(g_idx.max())
            if lo < 0 or hi >= groups:
                bad = int(((g_idx < 0) | (g_idx >= groups)).nonzero()[0, 0])
                raise CheckpointError(f"{src['g_idx']}: g_idx[{bad}] = {int(g_idx[bad])} is out of range "
                                      f"[0, {groups}) (groups = scales.shape[0])")
        g_idx = g_idx.to(torch.int32)
        if not desc_act and not torch.equal(g_idx, trivial):
            warnings.warn(f"{src['g_idx']}: desc_act is False but g_idx is not k // group_size; gptqkit uses "
                          f"g_idx as stored, other loaders may assume the sequential order", stacklevel=3)
    elif desc_act and not static_groups:
        raise CheckpointError(f"{src['g_idx']}: missing tensor (required with desc_act=True)")
    else:  # old checkpoints without act-order may omit it: the sequential order is implied
        g_idx = trivial
    out["g_idx"] = g_idx.contiguous()
    return out


# =========================================================================== load

def _quantized_prefixes(keys: Iterable[str]) -> set:
    """Layers with a qweight or qzeros in the checkpoint (missing siblings are reported later)."""
    out = set()
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("qweight", "qzeros") and prefix:
            out.add(prefix)
    return out


@contextlib.contextmanager
def _parameters_on_meta():
    """Creates every ``nn.Parameter`` registered inside on the meta device.

    Buffers (rotary frequencies and the like, often non-persistent and thus
    absent from checkpoints) are still computed for real: they are small.
    Parameters are allocated (uninitialised, untouched) for an instant before
    moving to meta, so no memory is committed. The patch is process-wide
    while active: modules built concurrently in other threads are affected.
    """
    original = nn.Module.register_parameter

    def register_parameter(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _key_mapper(store_keys: Iterable[str], expected: set, prefix: str) -> Callable[[str], str]:
    """Model key -> checkpoint key. Identity, unless the checkpoint was saved from the base model
    (keys without ``prefix.``) or with an extra ``prefix.``, or names Mixtral's experts as
    transformers 4 did (:data:`_LEGACY_MOE_NAMES`)."""
    store_keys = set(store_keys)
    best = lambda key: key  # noqa: E731
    if prefix:
        p = prefix + "."

        def strip(key):
            return key[len(p):] if key.startswith(p) else key

        def add(key):
            return p + key

        best_hits = len(expected & store_keys)
        for mapper in (strip, add):
            hits = sum(1 for key in expected if mapper(key) in store_keys)
            if hits > best_hits:
                best, best_hits = mapper, hits
    return _with_legacy_moe_names(best, store_keys)


#: transformers 4's Mixtral names (still those of most Mixtral GPTQ checkpoints, e.g. TheBloke's and what
#: vLLM's Mixtral reads) for the layers of gptqkit's split experts: (model name pattern, checkpoint name)
_LEGACY_MOE_NAMES = [
    (re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj\."), r".block_sparse_moe.experts.\1.w1."),
    (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj\."), r".block_sparse_moe.experts.\1.w3."),
    (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj\."), r".block_sparse_moe.experts.\1.w2."),
    (re.compile(r"\.mlp\.gate\."), r".block_sparse_moe.gate."),
]


def _with_legacy_moe_names(key_of: Callable[[str], str], store_keys: Iterable[str]) -> Callable[[str], str]:
    """``key_of`` that also speaks transformers 4's Mixtral expert names, for checkpoints written with them."""
    if not any(".block_sparse_moe." in k for k in store_keys):
        return key_of

    def legacy(key):
        key = key_of(key)
        for pattern, replacement in _LEGACY_MOE_NAMES:
            key = pattern.sub(replacement, key)
        return key
    return legacy


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module, attr = _module_and_attr(model, name)
    if attr in module._parameters:
        old = module._parameters[attr]
        requires_grad = old.requires_grad if old is not None and value.is_floating_point() else False
        module._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:  # pragma: no cover - keys come from the model's own state_dict
        raise CheckpointError(f"{name}: the model has no parameter or buffer of that name")


def _resolve_dtype(dtype, config, store: _TensorStore, quantized_keys: set) -> torch.dtype:
    if dtype is not None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.replace("torch.", ""), None)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
        return dtype
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype.replace("torch.", ""), None)
    if cfg_dtype in _FLOAT_DTYPES:
        return cfg_dtype
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    for key in store.keys():
        if key not in quantized_keys:
            _, st = store.meta(key)
            if st in names:
                return names[st]
    return torch.float16


def _defuse_stored_experts(model: nn.Module, store: "_TensorStore") -> None:
    """Splits the model's fused MoE experts into per-expert layers (:mod:`gptqkit.moe`) unless the
    checkpoint stores them fused (``<experts>.gate_up_proj``, or ``<experts>.up_proj`` for experts
    without a gate)."""
    fused = fused_experts(model)
    if not fused:
        return
    key_of = _key_mapper(store.keys(), set(model.state_dict()), getattr(model, "base_model_prefix", ""))
    defuse_experts(model, keep=lambda name: key_of(f"{name}.gate_up_proj") in store
                   or key_of(f"{name}.up_proj") in store)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: Optional[Union[torch.dtype, str]] = None) -> nn.Module:
    """Loads a GPTQ checkpoint folder as a transformers model with QuantLinear layers.

    The model is built from ``config.json`` with every parameter on the meta
    device (no full-precision weight is ever materialised); each ``nn.Linear``
    or ``Conv1D`` whose ``<name>.qweight`` is in the checkpoint is replaced by
    a :class:`gptqkit.nn.QuantLinear`, and every tensor is read with
    ``safetensors`` and validated against the layer and the quantization
    config (``bits``, ``group_size``, ``dynamic`` per-module overrides):
    ``qweight`` int32 ``[packed_words(K, bits), N]``, ``qzeros`` int32
    ``[G, packed_words(N, bits)]``, ``scales`` float ``[G, N]``, ``g_idx``
    int32 ``[K]`` with values in ``[0, G)``; non-quantized tensors must match
    the model's shapes. Tied embeddings are re-tied.

    Args:
        path: checkpoint folder (``config.json`` with ``quantization_config``
            and/or ``quantize_config.json``; safetensors single-file or
            sharded, AutoGPTQ's ``model_file_base_name`` honoured).
        device: where to put the model. On a CUDA/ROCm device each quantized
            layer is repacked once into the GPU kernels' layout as it moves
            there (``QuantLinear`` on the GPU, ``docs/gpu_gemm.md``).
        dtype: dtype of the non-quantized weights (and biases); default: the
            config's ``dtype`` or, failing that, the checkpoint's. ``scales``
            keep their stored dtype.

    Returns:
        The model, in eval mode, with ``config.quantization_config`` set.

    Raises:
        FileNotFoundError: no such folder, or no ``config.json``.
        CheckpointError (a ``ValueError``): naming the file or tensor at fault:
            corrupt safetensors file, missing, mis-shaped, mis-typed or
            unexpected tensor, ``g_idx`` out of range, or a quantization
            config that contradicts the tensors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _checkpoint_folder(path)
    raw_config, qdict, qcfg = _read_quantization(folder)
    fmt = _layer_format(qcfg.checkpoint_format)
    store = _TensorStore(folder, qdict.get("model_file_base_name"))
    try:
        config = AutoConfig.from_pretrained(str(folder))
        quantized_ckpt = _quantized_prefixes(store.keys())
        quant_keys_ckpt = {f"{m}.{t}" for m in quantized_ckpt for t in QUANT_TENSORS + ("bias",)}
        dtype = _resolve_dtype(dtype, config, store, quant_keys_ckpt)

        quantization_config = getattr(config, "quantization_config", None)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with _parameters_on_meta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.config.quantization_config = quantization_config if quantization_config is not None else qdict
        _defuse_stored_experts(model, store)

        module_names = {n for n, _ in model.named_modules()}
        expected_keys = set(model.state_dict().keys())
        layer_keys = {f"{n}.{t}" for n in module_names for t in QUANT_TENSORS}
        key_of = _key_mapper(store.keys(), expected_keys | layer_keys, getattr(model, "base_model_prefix", ""))
        ckpt_to_model = {key_of(k): k for k in expected_keys | layer_keys}

        # ---- replace the quantized layers
        quantized: Dict[str, QuantLinear] = {}
        for ckpt_prefix in sorted(quantized_ckpt):
            model_key = ckpt_to_model.get(f"{ckpt_prefix}.qzeros")
            name = model_key.rpartition(".")[0] if model_key else None
            if name is None or name not in module_names:
                some = next(f"{ckpt_prefix}.{t}" for t in QUANT_TENSORS if f"{ckpt_prefix}.{t}" in store)
                raise CheckpointError(f"{some}: unexpected tensor: {type(model).__name__} has no module "
                                      f"{ckpt_prefix!r} to quantize")
            ckpt_key = key_of(f"{name}.qweight")
            module = model.get_submodule(name)
            try:
                k, n = _linear_features(module)
            except TypeError:
                raise CheckpointError(f"{ckpt_key}: {name} is a {type(module).__name__}, not a Linear or "
                                      f"Conv1D layer that can be quantized") from None
            settings = qcfg.resolve(name)
            if settings is None:
                raise CheckpointError(f"{ckpt_key}: the quantization config's dynamic rules skip {name}, but the "
                                      f"checkpoint stores it quantized (the config contradicts the tensors)")
            tensors = _validate_layer(store, key_of, name, k, n, settings.bits, settings.group_size,
                                      settings.desc_act, settings.static_groups)
            bias_key = key_of(f"{name}.bias")
            bias = None
            if bias_key in store:
                shape, st = store.meta(bias_key)
                if list(shape) != [n]:
                    raise CheckpointError(f"{bias_key}: expected shape [{n}] ([out_features]), got {list(shape)}")
                bias = store.get(bias_key)
                if not bias.is_floating_point():
                    raise CheckpointError(f"{bias_key}: expected a floating-point dtype, got {bias.dtype}")
                bias = bias.to(dtype)
            elif getattr(module, "bias", None) is not None:
                raise CheckpointError(f"{bias_key}: missing tensor (the {type(module).__name__} {name} has a bias)")
            layer = QuantLinear(settings.bits, settings.group_size, k, n, bias=bias is not None, format=fmt,
                                device="meta", dtype=tensors["scales"].dtype)
            layer._assign(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bias)
            parent, attr = _module_and_attr(model, name)
            setattr(parent, attr, layer)
            quantized[name] = layer

        # ---- every other tensor
        tied = _tied_map(model)
        state = model.state_dict(keep_vars=True)
        consumed = {key_of(f"{m}.{t}") for m in quantized for t in QUANT_TENSORS + ("bias",)}
        loaded: set = set()
        for model_key, current in state.items():
            owner = model_key.rpartition(".")[0]
            if owner in quantized:
                continue
            ckpt_key = key_of(model_key)
            if ckpt_key not in store:
                source = tied.get(model_key)
                if source is not None and key_of(source) in store:
                    continue  # re-tied below
                raise CheckpointError(f"{ckpt_key}: missing tensor (the model's {model_key} is not in the "
                                      f"checkpoint)")
            shape, _ = store.meta(ckpt_key)
            if tuple(shape) != tuple(current.shape):
                raise CheckpointError(f"{ckpt_key}: expected shape {list(current.shape)}, got {list(shape)}")
            value = store.get(ckpt_key)
            if value.is_floating_point() and current.is_floating_point():
                value = value.to(current.dtype)
            elif value.dtype != current.dtype:
                raise CheckpointError(f"{ckpt_key}: expected dtype {current.dtype}, got {value.dtype}")
            _set_tensor(model, model_key, value)
            consumed.add(ckpt_key)
            loaded.add(model_key)

        # ---- leftovers (old checkpoints may carry values of buffers that are now non-persistent)
        non_persistent = set()
        for mod_name, mod in model.named_modules():
            for b in getattr(mod, "_non_persistent_buffers_set", ()):
                non_persistent.add(f"{mod_name}.{b}" if mod_name else b)
        leftovers = sorted(k for k in store.keys() if k not in consumed and ckpt_to_model.get(k, k) not in non_persistent
                           and not k.endswith("rotary_emb.inv_freq"))
        if leftovers:
            more = f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
            raise CheckpointError(f"{leftovers[0]}: unexpected tensor ({type(model).__name__} has no such parameter"
                                  f" or buffer; unexpected: {leftovers[:5]}{more}) in {store.where[leftovers[0]]}")

        # ---- re-tie embeddings
        untied = []
        for target, source in tied.items():
            if target in loaded or target.rpartition(".")[0] in quantized:
                untied.append(target)
                continue
            module, attr = _module_and_attr(model, target)
            src_module, src_attr = _module_and_attr(model, source)
            setattr(module, attr, getattr(src_module, src_attr))
        if untied and hasattr(model, "all_tied_weights_keys"):
            for target in untied:
                model.all_tied_weights_keys.pop(target, None)
        if any(t.rpartition(".")[0] in quantized for t in untied):
            model.config.tie_word_embeddings = False  # a quantized output layer cannot share the embedding

        for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in items:
                if t.device.type == "meta":  # pragma: no cover - every key was either loaded or reported
                    raise CheckpointError(f"{name}: {kind} was not loaded from the checkpoint")
    finally:
        store.close()

    if torch.device(device).type != "cpu":
        model.to(device)
    model.eval()
    return model


# =========================================================================== info

def checkpoint_info(path: PathLike) -> Dict[str, Any]:
    """A summary of a GPTQ checkpoint, read from its configs and safetensors headers.

    Returns a dict with:
        ``path``, ``model_type``, ``architectures``, ``quantization_config``
        (the merged dict), ``bits``, ``group_size``, ``desc_act``, ``sym``,
        ``checkpoint_format``, ``files`` (safetensors file names),
        ``layers`` (``{name: {bits, group_size, groups, in_features,
        out_features, bias, act_order, bytes, fp16_bytes, shapes: {tensor:
        shape}}}``), ``num_quantized_layers``, ``quantized_bytes`` (bytes of
        the quantized layers' tensors), ``fp16_bytes`` (the same layers as
        float16 weights), ``compression`` (their ratio), ``other_bytes``
        (every non-quantized tensor) and ``total_bytes``.

    Raises:
        FileNotFoundError / CheckpointError as :func:`load_checkpoint`.
    """
    folder = _checkpoint_folder(path)
    raw_config, qdict, qcfg = _read_quantization(folder)
    store = _TensorStore(folder, qdict.get("model_file_base_name"))
    sizes = {"I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "BOOL": 1}
    try:
        def nbytes(key):
            shape, st = store.meta(key)
            count = 1
            for s in shape:
                count *= s
            return count * sizes.get(st, 4)

        layers: Dict[str, Dict[str, Any]] = {}
        consumed = set()
        for name in sorted(_quantized_prefixes(store.keys())):
            settings = qcfg.resolve(name)
            bits = settings.bits if settings is not None else qcfg.bits
            group_size = settings.group_size if settings is not None else qcfg.group_size
            shapes = {}
            for t in QUANT_TENSORS + ("bias",):
                if f"{name}.{t}" in store:
                    shapes[t] = list(store.meta(f"{name}.{t}")[0])
                    consumed.add(f"{name}.{t}")
            qw = shapes.get("qweight", [])
            n = qw[1] if len(qw) == 2 else (shapes["scales"][-1] if "scales" in shapes else None)
            k = shapes["g_idx"][0] if "g_idx" in shapes else (qw[0] * 32 // bits if qw else None)
            act_order = False
            if "g_idx" in shapes and len(shapes["g_idx"]) == 1 and group_size > 0:
                g = store.get(f"{name}.g_idx").to(torch.int64)
                act_order = not torch.equal(g, torch.arange(g.numel()) // group_size)
            layer_bytes = sum(nbytes(f"{name}.{t}") for t in shapes)
            bias_bytes = nbytes(f"{name}.bias") if "bias" in shapes else 0
            layers[name] = {
                "bits": bits, "group_size": group_size,
                "groups": shapes["scales"][0] if "scales" in shapes else None,
                "in_features": k, "out_features": n, "bias": "bias" in shapes, "act_order": act_order,
                "bytes": layer_bytes, "fp16_bytes": 2 * (k or 0) * (n or 0) + bias_bytes, "shapes": shapes,
            }
        quantized_bytes = sum(v["bytes"] for v in layers.values())
        fp16_bytes = sum(v["fp16_bytes"] for v in layers.values())
        other_bytes = sum(nbytes(k) for k in store.keys() if k not in consumed)
        return {
            "path": str(folder),
            "model_type": raw_config.get("model_type"),
            "architectures": raw_config.get("architectures"),
            "quantization_config": qdict,
            "bits": qcfg.bits,
            "group_size": qcfg.group_size,
            "desc_act": qcfg.desc_act,
            "sym": qcfg.sym,
            "checkpoint_format": qcfg.checkpoint_format,
            "files": store.files(),
            "layers": layers,
            "num_quantized_layers": len(layers),
            "quantized_bytes": quantized_bytes,
            "fp16_bytes": fp16_bytes,
            "compression": (fp16_bytes / quantized_bytes) if quantized_bytes else None,
            "other_bytes": other_bytes,
            "total_bytes": quantized_bytes + other_bytes,
        }
    finally:
        store.close()
