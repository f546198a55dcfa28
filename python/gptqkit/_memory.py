"""Returning memory to the OS during quantization (Linux; a no-op elsewhere).

Why this exists: transformers 5 loads safetensors weights as views of a
private file mapping. Pages of a block's weights become resident when the
block is first used and, once gptqkit writes the quantized values into them,
turn into private copies. After the block's layers become QuantLinear those
pages are garbage, but the mapping stays alive (the embedding and norms still
live in it), so without help the whole fp model ends up resident by the last
block. :func:`release_file_pages` drops them with ``madvise(MADV_DONTNEED)``,
which for a private file mapping means "re-read from the file if ever touched
again" — harmless, as no tensor uses that memory any more (checked).

:func:`trim_heap` asks glibc to hand freed heap memory back
(``malloc_trim``): calibration allocates and frees many megabyte-sized
activations, and glibc's dynamic mmap threshold otherwise keeps them in a
fragmented heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import weakref
from typing import List, Optional, Sequence, Tuple

import torch

_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and nothing happens
_libc: Optional[ctypes.CDLL] = None
_libc_loaded = False


def _get_libc() -> Optional[ctypes.CDLL]:
    global _libc, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        if sys.platform.startswith("linux"):
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _libc.madvise.restype = ctypes.c_int
            except (OSError, AttributeError):
                _libc = None
    return _libc


def _private_file_mappings() -> List[Tuple[int, int]]:
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or not parts[1].endswith("p") or not parts[5].strip().startswith("/"):
                    continue
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                spans.append((lo, hi))
    except OSError:
        return []
    return spans


def _advise_whole_pages(libc: ctypes.CDLL, ptr: int, nbytes: int, advice: int) -> int:
    """``madvise`` on the whole pages inside ``[ptr, ptr + nbytes)`` (never a page
    shared with a neighbour's bytes); returns the bytes advised, 0 on failure."""
    page = mmap.PAGESIZE
    lo = (ptr + page - 1) // page * page
    hi = (ptr + nbytes) // page * page
    if hi > lo and libc.madvise(ctypes.c_void_p(lo), hi - lo, advice) == 0:
        return hi - lo
    return 0


def _in_file_mapping(ptr: int, nbytes: int, spans: List[Tuple[int, int]]) -> bool:
    return any(lo <= ptr and ptr + nbytes <= hi for lo, hi in spans)


def exclusive_file_ranges(tensors: Sequence[torch.Tensor]) -> List[tuple]:
    """Notes the CPU tensors that lie in a private file mapping and share their
    storage with no other tensor. Call before dropping them; pass the result to
    :func:`release_file_pages` after: only those that are then really gone
    (nobody else held them) are released."""
    if _get_libc() is None:
        return []
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return []
    spans = None
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        # 2 = the tensor we were given + the `storage` wrapper itself: no view elsewhere.
        if use_count(storage._cdata) != 2:
            continue
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if spans is None:
            spans = _private_file_mappings()
        if _in_file_mapping(ptr, nbytes, spans):
            out.append((weakref.ref(t), ptr, nbytes))
    return out


def release_file_pages(noted: Sequence[tuple]) -> int:
    """Drops the whole pages of the noted tensors that no longer exist; returns the bytes released."""
    libc = _get_libc()
    if libc is None:
        return 0
    released = 0
    for ref, ptr, nbytes in noted:
        if ref() is None:  # gone; one still referenced somewhere is kept
            released += _advise_whole_pages(libc, ptr, nbytes, _MADV_DONTNEED)
    return released


def page_out(tensors: Sequence[torch.Tensor]) -> int:
    """Asks the kernel to reclaim the resident pages of live CPU tensors that lie in
    a private file mapping (``madvise(MADV_PAGEOUT)``); returns the bytes asked for.

    Why: the embedding is read while calibration inputs are captured (and, for
    transformers 5, while loading), then not again until quantization ends,
    yet its pages stay resident through every block. Unlike ``MADV_DONTNEED``
    this never loses data: a clean page is re-read from the file when next
    touched, and a page that was written (a private copy) can only go to
    swap, so the tensors stay valid whatever they hold. Anonymous memory is
    left alone (reclaiming it would mean swapping).
    """
    libc = _get_libc()
    if libc is None:
        return 0
    spans = None
    asked = 0
    done: set = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in done:
            continue
        done.add(ptr)
        if spans is None:
            spans = _private_file_mappings()
        if _in_file_mapping(ptr, nbytes, spans):
            asked += _advise_whole_pages(libc, ptr, nbytes, _MADV_PAGEOUT)
    return asked


def trim_heap() -> None:
    libc = _get_libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:  # not glibc
            pass


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory that can still be allocated on ``device`` without swapping: free GPU
    memory (``torch.cuda.mem_get_info``), or the kernel's ``MemAvailable`` for the
    CPU (Linux). ``None`` where it cannot be known."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no driver / device gone: the caller decides
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
