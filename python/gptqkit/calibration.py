"""Calibration data for GPTQ: from texts, token ids, files or dataset names to padded batches.

The one entry point is :func:`prepare_calibration`; it returns a list of
batches ``{"input_ids": LongTensor [b, T], "attention_mask": LongTensor [b, T]}``
(CPU tensors). Short examples are right-padded; padded positions have
``attention_mask == 0`` and must be dropped before they reach a Hessian (with
right padding and causal attention they never influence the real tokens).

Accepted ``examples``:

* **a list of strings**: tokenized with ``tokenizer`` (special tokens such as
  BOS included, as the model would see a prompt), one example per string;
* **a list of dicts** with ``input_ids`` (and optionally ``attention_mask``) as
  lists of ints, lists of lists, or 1-d / 2-d tensors or arrays (e.g. the
  outputs of ``tokenizer(text)``); zeros in a given mask are kept as padding;
* **a tensor or array of token ids** ``[n, seqlen]`` (or one 1-d sequence),
  or a list of lists of ints;
* **a path** (``str`` or ``os.PathLike``) to a file:

  - ``.txt`` / ``.raw`` / ``.tokens`` (or any other extension): plain text,
    prepared the WikiText way: CRLF normalised to LF, split into lines, empty
    lines dropped, lines joined with ``"\\n\\n"``;
  - ``.jsonl``: one JSON object per line with a ``"text"`` field
    (``text_field`` to change it); ``.json``: a list of such objects or of strings;
  - ``.npy``, ``.pt`` / ``.pth``, ``.safetensors``: an integer array of token ids
    ``[n, seqlen]`` used as is (a ``.pt``/``.safetensors`` file may hold a single
    tensor or one named ``input_ids``);

* **a Hugging Face dataset name** (any string that is not an existing file and
  does not look like a path), as ``"name"``, ``"name:config"`` or
  ``"name:config:split"`` (default split ``train``; text column
  ``text_field``), when the ``datasets`` library is installed and can reach it.

Texts from a file or a dataset are always *sampled*: they are joined into one
token stream (tokenized without special tokens) and ``nsamples`` windows of
``seqlen`` tokens are drawn at random start positions with ``seed``, as in the
GPTQ paper's calibration (defaults 128 windows of 512 tokens). In-memory
strings, dicts and tensors are used as given unless ``nsamples`` is passed,
in which case strings are sampled the same way and token rows / dicts are cut
to the first ``nsamples``. Token arrays are never re-windowed.

Example::

    from gptqkit.calibration import prepare_calibration
    batches = prepare_calibration("../shared/data/wikitext-2/wiki.valid.tokens", tok,
                                  nsamples=128, seqlen=512, seed=0,
                                  max_seqlen=model.config.max_position_embeddings)
    batches = prepare_calibration(["Hello world.", "GPTQ is ..."], tok, batch_size=2)
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "DEFAULT_NSAMPLES",
    "DEFAULT_SEQLEN",
    "load_token_array",
    "make_batches",
    "model_max_length",
    "prepare_calibration",
    "read_jsonl",
    "read_text_file",
    "sample_windows",
    "tokenize_stream",
]

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 512
TOKEN_ARRAY_EXTS = (".npy", ".pt", ".pth", ".safetensors")

Batch = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------- helpers

def model_max_length(config: Any) -> Optional[int]:
    """The longest context a model config allows, or ``None`` if it does not say.

    Looks at ``max_position_embeddings``, ``n_positions``, ``max_sequence_length``
    and ``seq_length`` (the first that is a positive integer).
    """
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _join_lines(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n\n".join(line for line in text.split("\n") if line.strip())


def read_text_file(path: Union[str, os.PathLike]) -> str:
    """Reads a UTF-8 text file, prepared the WikiText way (see the module docs).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no text.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = _join_lines(f.read())
    if not text:
        raise ValueError(f"calibration file {path!r} is empty (no non-blank line)")
    return text


def read_jsonl(path: Union[str, os.PathLike], text_field: str = "text") -> List[str]:
    """Texts of a ``.jsonl`` file (one object per line) or a ``.json`` list.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, an entry without a string ``text_field``
            (naming the line), or no text at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path!r} does not exist")

    def text_of(obj, where):
        if isinstance(obj, str):
            return obj
        if isinstance(obj, Mapping):
            if text_field not in obj:
                raise ValueError(f"{where}: no {text_field!r} field (keys: {sorted(obj)[:10]})")
            if not isinstance(obj[text_field], str):
                raise ValueError(f"{where}: {text_field!r} is a {type(obj[text_field]).__name__}, not a string")
            return obj[text_field]
        raise ValueError(f"{where}: expected an object with a {text_field!r} field, got {type(obj).__name__}")

    texts = []
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: invalid JSON ({exc})") from None
            if isinstance(data, Mapping) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects or strings")
            texts = [text_of(obj, f"{path}[{i}]") for i, obj in enumerate(data)]
        else:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                texts.append(text_of(obj, f"{path}:{lineno}"))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"calibration file {path!r} holds no text")
    return texts


def load_token_array(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Loads token ids ``[n, seqlen]`` from ``.npy``, ``.pt``/``.pth`` or ``.safetensors``.

    A 1-d array is one sequence. ``.pt`` files are read with
    ``weights_only=True`` and may hold a tensor, or a dict with one tensor or an
    ``input_ids`` entry; ``.safetensors`` files one tensor or ``input_ids``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file, not an integer array, wrong rank, or empty.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            import numpy as np
            arr = torch.from_numpy(np.load(path, allow_pickle=False))
        elif ext == ".safetensors":
            from safetensors.torch import load_file
            arr = _pick_tensor(load_file(path), path)
        else:
            arr = _pick_tensor(torch.load(path, map_location="cpu", weights_only=True), path)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:
        raise ValueError(f"{path}: cannot read token ids ({type(exc).__name__}: {exc})") from None
    return _check_token_tensor(arr, path)


def _pick_tensor(obj, path):
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        if "input_ids" in obj:
            return obj["input_ids"]
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise ValueError(f"{path}: expected one tensor or an 'input_ids' entry, found keys {sorted(obj)[:10]}")
    raise ValueError(f"{path}: expected a tensor of token ids, got {type(obj).__name__}")


def _check_token_tensor(t, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except Exception as exc:
            raise ValueError(f"{where}: token ids must be integers ({exc})") from None
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{where}: token ids must be integers, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(f"{where}: expected token ids of shape [n, seqlen], got {list(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{where}: the token array is empty (shape {list(t.shape)})")
    if int(t.min()) < 0:
        raise ValueError(f"{where}: negative token id {int(t.min())}")
    return t.to(torch.long)


def _require_tokenizer(tokenizer, what):
    if tokenizer is None:
        raise ValueError(f"{what} must be tokenized: pass the model's tokenizer")


def tokenize_stream(texts: Union[str, Sequence[str]], tokenizer) -> torch.Tensor:
    """Tokenizes ``texts`` joined by ``"\\n\\n"`` into one 1-d stream, without special tokens."""
    _require_tokenizer(tokenizer, "text calibration data")
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    return _tokenize_long(tokenizer, text)


def _tokenize_long(tokenizer, text: str) -> torch.Tensor:
    """Tokenizes a long text without special tokens (silencing the "longer than the model" warning)."""
    old = getattr(tokenizer, "model_max_length", None)
    if old is not None:
        try:
            tokenizer.model_max_length = int(1e30)
        except Exception:
            old = None
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows ``[nsamples, seqlen]`` cut at random start positions from a 1-d token stream.

    Starts are uniform in ``[0, len - seqlen]`` from a ``torch.Generator``
    seeded with ``seed`` (windows may overlap, as in GPTQ's calibration).

    Raises:
        ValueError: the stream is shorter than ``seqlen``.
    """
    stream = stream.reshape(-1)
    n = stream.numel()
    if n == 0:
        raise ValueError("calibration data is empty (no tokens)")
    if n < seqlen:
        raise ValueError(f"calibration data has only {n} tokens, fewer than seqlen={seqlen}; "
                         f"give more text or a smaller seqlen")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    offsets = torch.arange(seqlen)
    return stream[starts[:, None] + offsets[None, :]].clone()


def make_batches(rows: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None,
                 batch_size: int = 1, pad_token_id: int = 0) -> List[Batch]:
    """Groups 1-d token rows into right-padded batches, in order.

    Args:
        rows: 1-d LongTensors (lengths may differ).
        masks: matching 1-d masks (1 real token, 0 padding); all ones if omitted.
        batch_size: rows per batch (the last batch may be smaller).
        pad_token_id: id written at padded positions (masked out anyway).
    """
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        mchunk = masks[s:s + batch_size] if masks is not None else [torch.ones_like(r) for r in chunk]
        T = max(r.numel() for r in chunk)
        ids = torch.full((len(chunk), T), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, (r, m) in enumerate(zip(chunk, mchunk)):
            ids[i, :r.numel()] = r
            mask[i, :r.numel()] = m
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _ragged(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (list, tuple))


def _rows_from_dict(ex: Mapping, i: int):
    """1-d id rows and masks of one dict example (1-d, 2-d or ragged lists of lists)."""
    if "input_ids" not in ex:
        raise ValueError(f"examples[{i}]: a dict example needs 'input_ids' (keys: {sorted(ex)[:10]})")
    where = f"examples[{i}]['input_ids']"
    raw_ids, raw_mask = ex["input_ids"], ex.get("attention_mask")
    if _ragged(raw_ids):
        ids_rows = [_check_token_tensor(_as_tensor(r, f"{where}[{j}]"), f"{where}[{j}]")[0]
                    for j, r in enumerate(raw_ids)]
        if raw_mask is None:
            mask_rows = [None] * len(ids_rows)
        elif _ragged(raw_mask) and len(raw_mask) == len(ids_rows):
            mask_rows = list(raw_mask)
        else:
            raise ValueError(f"examples[{i}]: attention_mask does not match the rows of input_ids")
    else:
        ids = _check_token_tensor(_as_tensor(raw_ids, where), where)
        ids_rows = list(ids)
        if raw_mask is None:
            mask_rows = [None] * len(ids_rows)
        else:
            m = _as_tensor(raw_mask, f"examples[{i}]['attention_mask']")
            if m.ndim == 1:
                m = m.unsqueeze(0)
            if tuple(m.shape) != tuple(ids.shape):
                raise ValueError(f"examples[{i}]: attention_mask shape {list(m.shape)} does not match "
                                 f"input_ids shape {list(ids.shape)}")
            mask_rows = list(m)
    masks = []
    for j, (r, m) in enumerate(zip(ids_rows, mask_rows)):
        if m is None:
            masks.append(torch.ones_like(r))
            continue
        m = _as_tensor(m, f"examples[{i}]['attention_mask']").reshape(-1)
        if m.numel() != r.numel():
            raise ValueError(f"examples[{i}]: attention_mask row {j} has {m.numel()} entries, input_ids "
                             f"has {r.numel()}")
        if m.dtype.is_floating_point or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"examples[{i}]['attention_mask']: expected 0/1 integers")
        m = m.to(torch.long)
        # strip left/right padding; the batch is re-padded on the right
        nz = torch.nonzero(m).reshape(-1)
        if nz.numel():
            a, b = int(nz[0]), int(nz[-1]) + 1
            r, m = r[a:b], m[a:b]
        ids_rows[j] = r
        masks.append(m)
    return ids_rows, masks


def _as_tensor(x, where):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(x)
    except Exception as exc:
        raise ValueError(f"{where}: expected a list of ints or an integer tensor ({exc})") from None


def _load_dataset_texts(name: str, text_field: str) -> List[str]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ValueError(f"calibration {name!r} is neither an existing file nor loadable as a dataset: "
                         f"the `datasets` library is not installed (pip install datasets), and dataset "
                         f"names need network access; pass a .txt/.jsonl/.npy/.pt/.safetensors file "
                         f"instead") from None
    from datasets import load_dataset
    parts = name.split(":")
    path, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = load_dataset(path, config, split=split)
    except Exception as exc:
        raise ValueError(f"calibration dataset {name!r} could not be loaded ({type(exc).__name__}: {exc}); "
                         f"pass a local text/JSONL file or token array instead") from None
    if text_field not in ds.column_names:
        raise ValueError(f"calibration dataset {name!r}: no {text_field!r} column (columns: {ds.column_names})")
    texts = [t for t in ds[text_field] if isinstance(t, str)]
    if not any(t.strip() for t in texts):
        raise ValueError(f"calibration dataset {name!r} holds no text")
    return texts


def _looks_like_path(s: str) -> bool:
    return (os.sep in s or "/" in s or s.startswith(".") or s.startswith("~")
            or os.path.splitext(s)[1].lower() in TOKEN_ARRAY_EXTS + (".txt", ".raw", ".tokens", ".jsonl", ".json"))


# --------------------------------------------------------------------------- entry point

def prepare_calibration(
    examples: Any,
    tokenizer: Any = None,
    *,
    nsamples: Optional[int] = None,
    seqlen: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 1,
    max_seqlen: Optional[int] = None,
    vocab_size: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    text_field: str = "text",
) -> List[Batch]:
    """Turns calibration ``examples`` into padded batches (see the module docs for accepted forms).

    Args:
        examples: strings, dicts, token tensor/array, a file path or a dataset name.
        tokenizer: the model's tokenizer; needed for text.
        nsamples: number of calibration sequences. Text sources are sampled
            (default 128 for files and datasets); token rows and dicts are cut
            to the first ``nsamples``.
        seqlen: tokens per sampled window (default 512 for sampled text); for
            in-memory examples used as given, longer ones are truncated to it.
        seed: seed of the window sampling.
        batch_size: sequences per batch.
        max_seqlen: the model's context length (e.g. from :func:`model_max_length`);
            a longer ``seqlen`` or example raises.
        vocab_size: when given, token ids must be below it.
        pad_token_id: id for padded positions (default: the tokenizer's pad,
            then EOS id, then 0); padding is always marked in ``attention_mask``.
        text_field: field holding the text in JSONL files and datasets.

    Returns:
        A list of ``{"input_ids": LongTensor [b, T], "attention_mask": LongTensor [b, T]}``.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: empty data, malformed entries (naming the entry), a seqlen
            beyond ``max_seqlen``, text without a tokenizer, bad arguments.
    """
    for name, v in (("nsamples", nsamples), ("seqlen", seqlen)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if max_seqlen is not None and seqlen is not None and seqlen > max_seqlen:
        raise ValueError(f"seqlen={seqlen} is beyond the model's maximum context of {max_seqlen} tokens "
                         f"(max_position_embeddings); use a seqlen of at most {max_seqlen}")

    rows: List[torch.Tensor]
    masks: Optional[List[torch.Tensor]] = None
    texts: Optional[List[str]] = None
    sample_text = False

    if isinstance(examples, (str, os.PathLike)):
        src = os.path.expanduser(os.fspath(examples))
        ext = os.path.splitext(src)[1].lower()
        if os.path.isdir(src):
            raise ValueError(f"calibration {src!r} is a folder; pass a file")
        if os.path.isfile(src):
            if ext in TOKEN_ARRAY_EXTS:
                rows = list(load_token_array(src))
            elif ext in (".jsonl", ".json"):
                texts, sample_text = read_jsonl(src, text_field), True
            else:
                texts, sample_text = [read_text_file(src)], True
        elif isinstance(examples, os.PathLike) or _looks_like_path(src):
            raise FileNotFoundError(f"calibration file {src!r} does not exist")
        else:
            texts, sample_text = _load_dataset_texts(src, text_field), True
    elif isinstance(examples, torch.Tensor) or type(examples).__module__ == "numpy":
        rows = list(_check_token_tensor(_as_tensor(examples, "examples"), "examples"))
    elif isinstance(examples, Mapping):
        rows, masks = _rows_from_dict(examples, 0)
    elif isinstance(examples, Sequence):
        if len(examples) == 0:
            raise ValueError("calibration data is empty: examples is an empty list")
        first = examples[0]
        if isinstance(first, str):
            for i, ex in enumerate(examples):
                if not isinstance(ex, str):
                    raise ValueError(f"examples[{i}]: expected a string like the other examples, "
                                     f"got {type(ex).__name__}")
            texts = [t for t in examples if t.strip()]
            if not texts:
                raise ValueError("calibration data is empty: every example string is blank")
            sample_text = nsamples is not None
        elif isinstance(first, Mapping):
            rows, masks = [], []
            for i, ex in enumerate(examples):
                if not isinstance(ex, Mapping):
                    raise ValueError(f"examples[{i}]: expected a dict with input_ids like the other examples, "
                                     f"got {type(ex).__name__}")
                r, m = _rows_from_dict(ex, i)
                rows += r
                masks += m
        else:
            rows = []
            for i, ex in enumerate(examples):
                if isinstance(ex, (str, Mapping)):
                    raise ValueError(f"examples[{i}]: mixed example types (expected token ids like examples[0])")
                if isinstance(ex, (int,)) and not isinstance(ex, bool):
                    rows = list(_check_token_tensor(_as_tensor(examples, "examples"), "examples"))
                    break
                rows += list(_check_token_tensor(_as_tensor(ex, f"examples[{i}]"), f"examples[{i}]"))
    else:
        raise ValueError(f"examples: unsupported type {type(examples).__name__}; expected strings, dicts with "
                         f"input_ids, a tensor of token ids, or a file path")

    if texts is not None:
        _require_tokenizer(tokenizer, "text calibration data")
        if sample_text:
            n = nsamples or DEFAULT_NSAMPLES
            T = seqlen or DEFAULT_SEQLEN
            if max_seqlen is not None and T > max_seqlen:
                raise ValueError(f"seqlen={T} is beyond the model's maximum context of {max_seqlen} tokens "
                                 f"(max_position_embeddings); pass seqlen={max_seqlen} or less")
            rows = list(sample_windows(tokenize_stream(texts, tokenizer), n, T, seed))
        else:
            rows = []
            for i, t in enumerate(texts):
                ids = tokenizer(t)["input_ids"]
                rows.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
        masks = None
    elif nsamples is not None:
        if len(rows) < nsamples:
            warnings.warn(f"calibration data has {len(rows)} sequences, fewer than nsamples={nsamples}; "
                          f"using all of them", stacklevel=2)
        rows = rows[:nsamples]
        masks = masks[:nsamples] if masks is not None else None

    # truncate in-memory examples to seqlen; drop rows without any real token
    if seqlen is not None and not sample_text:
        rows = [r[:seqlen] for r in rows]
        masks = [m[:seqlen] for m in masks] if masks is not None else None
    if masks is None:
        masks = [torch.ones_like(r) for r in rows]
    keep = [i for i, (r, m) in enumerate(zip(rows, masks)) if r.numel() > 0 and int(m.sum()) > 0]
    if not keep:
        raise ValueError("calibration data is empty: no example has any (unmasked) token")
    rows = [rows[i] for i in keep]
    masks = [masks[i] for i in keep]

    longest = max(r.numel() for r in rows)
    if max_seqlen is not None and longest > max_seqlen:
        raise ValueError(f"a calibration example has {longest} tokens, beyond the model's maximum context of "
                         f"{max_seqlen} (max_position_embeddings); pass seqlen={max_seqlen} to truncate")
    if vocab_size is not None:
        top = max(int(r.max()) for r in rows)
        if top >= vocab_size:
            raise ValueError(f"token id {top} is out of range for a vocabulary of {vocab_size} "
                             f"(wrong tokenizer or token file?)")

    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None)
        pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    return make_batches(rows, masks, batch_size, pad_token_id)
