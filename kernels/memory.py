"""Output buffers for the fused kernels: large CPU outputs backed by transparent huge pages.

On CPU a fresh multi-megabyte tensor is a new mmap; writing it the first time takes one page fault per
4 KiB page, which costs more than the kernel's own memory traffic (measured on the 2-core development
machine: filling a fresh 64 MiB fp32 tensor took ~28 ms, ~7 ms after MADV_HUGEPAGE, ~2.5 ms when
already faulted). Advising the kernel to back the buffer with 2 MiB pages before the first write cuts
the faults by 512x. torch does the same for every allocation when THP_MEM_ALLOC_ENABLE=1 is set; this
module applies it to the fused kernels' own outputs only. Content and lifetime are those of a plain
torch.empty: the advice changes only how the pages are backed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

_MADV_HUGEPAGE = 14  # linux/mman.h
_PAGE = 4096
_HUGE_PAGE = 2 * 1024 * 1024


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none (not Linux, no libc found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the whole pages of `tensor`'s storage with huge pages; True if it accepted.

    Only advice: a refusal (no THP in the kernel, another OS) leaves the tensor as it was.
    """
    madvise = _madvise()
    nbytes = tensor.untyped_storage().nbytes()
    if madvise is None or tensor.device.type != "cpu" or nbytes < 2 * _HUGE_PAGE:
        return False
    start = tensor.untyped_storage().data_ptr()
    first = -(-start // _PAGE) * _PAGE
    last = (start + nbytes) // _PAGE * _PAGE
    return last > first and madvise(first, last - first, _MADV_HUGEPAGE) == 0


def empty_output(shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """torch.empty(shape) for a kernel output that will be written in full; huge pages on CPU."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.device.type == "cpu":
        advise_huge_pages(out)
    return out
