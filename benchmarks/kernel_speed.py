"""Time QuantizedLinear's kernels against float F.linear on SmolLM2-135M's linear shapes.

    python benchmarks/kernel_speed.py                 # 2 threads, batch 1 and 512, ~1-2 minutes
    python benchmarks/kernel_speed.py --threads 1 --batches 1,16

Prints one table (markdown): milliseconds per call (median and best of the repeats after a
warm-up call) and the ratio to float32 F.linear measured in the same run. Random weights: kernel
speed does not depend on the values. Numbers are for this machine only; see docs/kernels.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lowbit.core import parse_args, quantize
from lowbit.nn import KERNELS, QuantizedLinear

# SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, intermediate 1536.
SHAPES = {
    "q_proj/o_proj": (576, 576),
    "k_proj/v_proj": (192, 576),
    "gate/up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
SCHEMES = ("w8", "w4g64", "w4g128")  # int8 per channel; int4 symmetric in groups of 64 / 128


@dataclass(frozen=True)
class Timing:
    median_ms: float
    best_ms: float  # on a shared CPU the best call is the closest to the uncontended cost


def time_calls(fn, repeats: int, budget_s: float) -> Timing:
    """Times of ``fn()`` after one warm-up call; fewer repeats for slow calls so the whole run
    stays short (at least 2)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    n = max(2, min(repeats, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(1e3 * statistics.median(times), 1e3 * min(times))


def run(batches, repeats: int, budget_s: float) -> list[tuple]:
    """Rows of (layer, N, K, batch, path, timing, float32 F.linear timing); every kernel gets
    float32 inputs."""
    rows = []
    for shape_name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.02
        for batch in batches:
            x = torch.randn(batch, k)
            xb, wb = x.bfloat16(), weight.bfloat16()
            base = time_calls(partial(F.linear, x, weight), repeats, budget_s)
            rows.append((shape_name, n, k, batch, "F.linear float32", base, base))
            t = time_calls(partial(F.linear, xb, wb), repeats, budget_s)
            rows.append((shape_name, n, k, batch, "F.linear bfloat16", t, base))
            for scheme in SCHEMES:
                layer = QuantizedLinear(quantize(weight, parse_args(scheme)))
                for kernel in KERNELS:
                    if layer.kernel_support(kernel) is not None:
                        continue
                    layer.set_kernel(kernel)
                    with torch.inference_mode():
                        t = time_calls(partial(layer, x), repeats, budget_s)
                    rows.append((shape_name, n, k, batch, f"{scheme} {kernel}", t, base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,512", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=15, help="most timed calls per row")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timed calls per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    start = time.perf_counter()
    rows = run(batches, args.repeats, args.budget)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| layer | N x K | batch | path | median ms | x float32 | best ms | x float32 |")
    print("|---|---|---|---|---|---|---|---|")
    for shape_name, n, k, batch, path, t, base in rows:
        print(f"| {shape_name} | {n}x{k} | {batch} | {path} | {t.median_ms:.3f} | "
              f"{t.median_ms / base.median_ms:.2f} | {t.best_ms:.3f} | {t.best_ms / base.best_ms:.2f} |")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
