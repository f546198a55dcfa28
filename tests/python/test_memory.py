"""gptqkit._memory: giving dead file-mapped weights' pages back, and only those."""

from __future__ import annotations

import gc
import mmap
import sys

import numpy as np
import pytest
torch = pytest.importorskip("torch")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/proc maps are Linux-only")


def _mapped_tensor(tmp_path, n=1 << 20):
    """A float32 tensor inside a private (copy-on-write) file mapping that outlives it, as
    transformers' safetensors loading gives: one mapping per file, one storage per weight."""
    path = tmp_path / "weights.bin"
    np.arange(2 * n, dtype=np.float32).tofile(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _MAPPINGS.append(mapping)  # the mapping stays alive, as the model's other weights keep it
    return torch.frombuffer(mapping, dtype=torch.float32, count=n, offset=4 * n)


_MAPPINGS: list = []


@linux_only
def test_dead_mapped_tensor_is_released(gptqkit, tmp_path):
    from gptqkit._memory import exclusive_file_ranges, release_file_pages

    t = _mapped_tensor(tmp_path)
    t.mul_(2)  # written, as quantized values are: its pages are now private copies
    noted = exclusive_file_ranges([t])
    assert len(noted) == 1 and noted[0][2] == t.numel() * 4
    del t
    gc.collect()
    assert release_file_pages(noted) >= (1 << 20) * 4 - 2 * 4096


@linux_only
def test_tensor_still_held_is_kept(gptqkit, tmp_path):
    from gptqkit._memory import exclusive_file_ranges, release_file_pages

    t = _mapped_tensor(tmp_path)
    t.add_(1)
    noted = exclusive_file_ranges([t])
    keeper = t  # somebody else still holds the very tensor
    del t
    assert release_file_pages(noted) == 0
    assert float(keeper[10]) == (1 << 20) + 11.0  # untouched


@linux_only
def test_views_and_anonymous_memory_are_never_noted(gptqkit, tmp_path):
    from gptqkit._memory import exclusive_file_ranges

    t = _mapped_tensor(tmp_path)
    view = t[100:]  # shares the storage: releasing would corrupt it
    assert exclusive_file_ranges([t]) == []
    del view
    assert len(exclusive_file_ranges([t])) == 1
    assert exclusive_file_ranges([torch.zeros(1 << 20)]) == []  # heap memory: torch frees it itself


def test_trim_heap_is_harmless(gptqkit):
    from gptqkit._memory import trim_heap

    trim_heap()
    trim_heap()



def _resident_bytes(t: torch.Tensor) -> int:
    """Resident bytes of the pages under ``t`` in this process (``/proc/self/pagemap`` present bit)."""
    page = mmap.PAGESIZE
    lo, hi = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo * 8)
        entries = np.frombuffer(f.read((hi - lo + 1) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


@linux_only
def test_page_out_drops_clean_mapped_pages_and_keeps_every_value(gptqkit, tmp_path):
    from gptqkit._memory import page_out

    t = _mapped_tensor(tmp_path)
    expected = torch.arange(1 << 20, 2 << 20, dtype=torch.float32)
    assert torch.equal(t, expected)  # read: every page resident, all clean
    before = _resident_bytes(t)
    assert before >= t.numel() * 4 - 4096
    assert page_out([t, t]) >= t.numel() * 4 - 2 * 4096  # the same storage is asked for once
    after = _resident_bytes(t)
    if after > before // 2:
        pytest.skip("this kernel ignores MADV_PAGEOUT")
    assert torch.equal(t, expected)  # re-read from the file


@linux_only
def test_page_out_keeps_written_pages_and_leaves_anonymous_memory(gptqkit, tmp_path):
    from gptqkit._memory import page_out

    t = _mapped_tensor(tmp_path)
    t.mul_(3)  # private copies now: only swap could take them
    page_out([t])
    assert float(t[10]) == 3.0 * ((1 << 20) + 10)
    heap = torch.ones(1 << 20)
    assert page_out([heap]) == 0
    assert float(heap.sum()) == float(1 << 20)
