"""Quantization time and peak memory with glibc's default allocator vs. a fixed mmap threshold.

    python benchmarks/allocator.py                                   # rtn and hqq, w4g128
    python benchmarks/allocator.py --methods gptq --samples 32 --thresholds 0,1

Each (method, threshold) runs in its own process, since the threshold is process-wide:
``lowbit.quantize.quantize_pretrained`` (lazy loading) after
``lowbit.memory.serve_large_blocks_with_mmap(threshold)`` (threshold 0: not called). Time is
the quantization itself; peak is the child's VmHWM. Prints a markdown table with ratios to the
default allocator measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from lowbit import defaults

CHILD = """
import json, sys
from lowbit.memory import peak_rss_mb, serve_large_blocks_with_mmap
model, method, scheme, samples, threshold = sys.argv[1:6]
if int(threshold):
    serve_large_blocks_with_mmap(int(threshold))
from lowbit.data.calibration import CalibrationSpec
from lowbit.quantize import quantize_pretrained
from lowbit.recipe import Recipe
spec = CalibrationSpec(num_samples=int(samples))
_, _, report = quantize_pretrained(model, Recipe(scheme=scheme, method=method), spec, progress=False)
print(json.dumps({"seconds": report.seconds, "peak_mb": peak_rss_mb()}))
"""


def measure(model: str, method: str, scheme: str, samples: int, threshold: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, method, scheme, str(samples), str(threshold)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rtn,hqq")
    parser.add_argument("--scheme", default="w4g128")
    parser.add_argument("--samples", type=int, default=defaults.CALIBRATION_SAMPLES,
                        help=f"calibration samples (x {defaults.CALIBRATION_SEQ_LEN} tokens)")
    parser.add_argument("--thresholds", default="0,1,8,32", help="MiB; 0 = default allocator")
    args = parser.parse_args()
    thresholds = sorted({0, *(int(t) for t in args.thresholds.split(","))})  # 0 is the baseline

    print(f"model {args.model}, {args.scheme}, lazy loading, "
          f"{args.samples} x {defaults.CALIBRATION_SEQ_LEN} calibration tokens "
          "(calibrated methods only)\n")
    print("| method | mmap threshold | time s | x default | peak MB | x default |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        base = None
        for mib in thresholds:
            r = measure(args.model, method, args.scheme, args.samples, mib << 20)
            base = base or r
            label = "default" if mib == 0 else f"{mib} MiB"
            print(f"| {method} | {label} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} "
                  f"| {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
