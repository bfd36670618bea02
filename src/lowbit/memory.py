"""Process-level memory settings for long quantization runs.

glibc serves large allocations from its heap once its (dynamic) mmap threshold has grown, and
a heap fragmented by PyTorch's big temporary tensors keeps freed memory resident.
``serve_large_blocks_with_mmap`` fixes the threshold at 1 MiB, so freeing a large block returns
it to the system at once. It is not free: every large temporary then costs an mmap and fresh
zeroed pages. Measured on SmolLM2-135M, lazy loading, w4g128, by ``benchmarks/allocator.py``
(table in docs/results.md): HQQ 31.6 s -> 112.6 s and peak 1,152 -> 662 MB; GPTQ with 32 x 512
calibration tokens 139 s -> 169 s and 1,635 -> 1,009 MB; RTN 1.9 s -> 5.0 s, peak unchanged.

So it is opt-in: ``lowbit quantize --low-memory``. It changes the whole process, so lowbit
never calls it on import; library users may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def serve_large_blocks_with_mmap(threshold_bytes: int = 1 << 20) -> bool:
    """Ask glibc to mmap every allocation of ``threshold_bytes`` or more; False where not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
    log.debug("glibc mmap threshold set to %d bytes: %s", threshold_bytes, ok)
    return ok


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (1e6 bytes).

    Reads VmHWM, which belongs to the current address space. ``ru_maxrss`` is not used where
    VmHWM exists: Linux carries it across fork and exec, so a child started by a large parent
    would report the parent's size.
    """
    hwm = _status_mb("VmHWM")
    if not math.isnan(hwm):
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def resident_mb() -> float:
    """This process's resident memory now (VmRSS) in MB; NaN where /proc is not there."""
    return _status_mb("VmRSS")


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status (kB) in MB (1e6 bytes); NaN when absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return math.nan
