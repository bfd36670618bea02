"""Process-level memory settings for long quantization runs.

glibc serves large allocations from its heap once its (dynamic) mmap threshold has grown, and
a heap fragmented by PyTorch's big temporary tensors keeps freed memory resident.
``serve_large_blocks_with_mmap`` fixes the threshold at 1 MiB, so freeing a large block returns
it to the system at once. It is not free: every large temporary then costs an mmap and fresh
zeroed pages. Measured on SmolLM2-135M, lazy loading, w4g128 (docs/results.md):

- RTN: peak 1,151 MB -> 695 MB, 1.7 s -> 6.1 s (thresholds of 8 and 32 MiB: no gain);
- HQQ: 28 s -> 110 s;
- GPTQ, 128 x 512 calibration tokens: peak 1,708 MB -> 1,248 MB, time +27%;
  at 32 x 512: 1,022 -> 1,034 MB, 132 -> 167 s (``malloc_trim`` per layer: 1,092 MB, 145 s).

So it is opt-in: ``lowbit quantize --low-memory``. It changes the whole process, so lowbit
never calls it on import; library users may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

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
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux
