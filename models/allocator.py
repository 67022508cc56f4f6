"""glibc malloc's thresholds set so that a model call's freed tensors are reused, not unmapped.

glibc gives large blocks back to the kernel as soon as they are freed: a block above the mmap
threshold is mapped for itself and unmapped at ``free``, and free memory at the top of a heap
above the trim threshold is released (``madvise``/``sbrk``). Its defaults (a threshold that
starts at 128 KiB and only grows as mapped blocks are freed, a trim threshold twice that) suit
programs whose large blocks live long. A model call is the opposite: every call allocates its
outputs and temporaries afresh (a batch of 256 fast-model memories is 5.2 MB) and frees the
previous call's, so each call faults its pages in again, a kernel trap for every 4 KiB page.
Keeping them mapped makes a freed block the next call's block.

How much it matters depends on the pattern of sizes. A model thread's eager recurrent steps
over batches of 64, 40, 56 and 24 rows in turn fault 90 pages in a step with glibc's defaults
and 0.95 with these thresholds (``tests/unit/test_allocator.py``; 311 and 0.55 when the heads'
shift allocated one rolled weighting per offset). Over HTTP (``python -m
bench.http --model models/fast --image gray8 --compile 1 --malloc-keep-mb 0 512 0 512``) the
fast model's 64-image predictions ran at 22,837 and 22,325 images/s against 15,509 and 15,922
with glibc's defaults; single steps and the batch form did not move (4,674-4,817 steps/s).
``bench.model``, which repeats one batch size, is not helped: glibc's own adaptive threshold
already fits a single size. The cost is memory: a process keeps up to ``keep_mb`` of freed
heap mapped (its resident set stays near its peak).

``mallopt`` is glibc's API for exactly this (``mallopt(3)``); the same thresholds can be set
before a process starts with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``. Other C
libraries (musl) have no ``mallopt``, and there nothing is changed.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt(3) parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit (HEAP_MAX_SIZE / 2); mallopt refuses more
DEFAULT_KEEP_MB = 512


def keep_freed_memory(keep_mb: int = DEFAULT_KEEP_MB) -> bool:
    """Raise glibc's mmap threshold to its maximum and its trim threshold to ``keep_mb`` MiB.

    Returns True when both were set; False on a C library without ``mallopt`` (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, keep_mb * 2**20))
