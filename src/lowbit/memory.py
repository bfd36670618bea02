"""Process-level memory settings for long quantization runs.

glibc serves large allocations from its heap once its (dynamic) mmap threshold has grown, and
a heap fragmented by PyTorch's big temporary tensors keeps freed memory resident: measured on
SmolLM2-135M, RTN with lazy loading peaked at about 1,070 MB by default and 620 MB with the
threshold fixed at 1 MiB. ``serve_large_blocks_with_mmap`` fixes the threshold, so freeing a
large block returns it to the system.

It is not free: every large temporary then costs an mmap and fresh zeroed pages. For GPTQ
(32 x 512 calibration tokens, lazy) it made quantization 27% slower (132 s -> 167 s) for no
lower peak (1,022 MB -> 1,034 MB; a ``malloc_trim`` per layer instead gave 145 s and 1,092 MB),
because there the peak is calibration activations, which are live anyway. So ``lowbit quantize``
sets it only for data-free methods (rtn, hqq). It changes the whole process, so lowbit never
calls it on import; library users may.
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
