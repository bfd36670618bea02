"""Whole-model resident weight memory and prefill / decode speed, as ratios to float32.

    python benchmarks/speed_memory.py                       # smollm2-135m, 2 threads
    python benchmarks/speed_memory.py --model gemma3-270m --decode-tokens 32

For each variant (float32, bfloat16, RTN W8 per-channel, RTN W4 g128 and W4 g64, each with the
kernels that can run it; layers a kernel cannot run use ``dequant``, and the table says how many)
the script measures, in one process and one run:

- weight MB: bytes of every parameter and buffer the model holds (tied tensors once), i.e. the
  resident weights including what a kernel prepared;
- prefill tokens/s: one forward pass over a batch of 1 x ``--prefill-tokens`` tokens (median of
  ``--repeats`` after a warm-up);
- decode tokens/s: greedy generation of ``--decode-tokens`` tokens after a 32-token prompt with
  the KV cache (median of ``--repeats``).

Ratios are to float32 measured in the same run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from functools import partial

import torch

from lowbit.data.calibration import evaluation_tokens
from lowbit.eval.bench import median_seconds, weight_bytes
from lowbit.models.load import load_model
from lowbit.nn import set_kernel
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

# (label, scheme or None for float, float dtype, kernel)
VARIANTS = [
    ("float32", None, torch.float32, None),
    ("bfloat16", None, torch.bfloat16, None),
    ("W8 rtn / dequant", "w8", torch.float32, "dequant"),
    ("W8 rtn / int8", "w8", torch.float32, "int8"),
    ("W8 rtn / int8-bf16", "w8", torch.float32, "int8-bf16"),
    ("W4 g128 rtn / dequant", "w4g128", torch.float32, "dequant"),
    ("W4 g128 rtn / int4", "w4g128", torch.float32, "int4"),
    ("W4 g128 rtn / int4-bf16", "w4g128", torch.float32, "int4-bf16"),
    ("W4 g64 rtn / dequant", "w4g64", torch.float32, "dequant"),
    ("W4 g64 rtn / int4", "w4g64", torch.float32, "int4"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_model(args.model)
    ids = evaluation_tokens(tokenizer, max_tokens=args.prefill_tokens)
    prompt = ids[:, :32]
    rows = []
    for label, scheme, dtype, kernel in VARIANTS:
        model = copy.deepcopy(base).to(dtype)
        used = "-"
        if scheme is not None:
            quantize(model, Recipe(scheme=scheme), progress=False)
            counts = set_kernel(model, kernel, fallback="dequant").counts()
            used = ", ".join(f"{k} {n}" for k, n in counts.items())
        with torch.inference_mode():
            prefill = median_seconds(partial(model, ids), args.repeats)
            decode = median_seconds(
                partial(model.generate, prompt, max_new_tokens=args.decode_tokens,
                        min_new_tokens=args.decode_tokens, do_sample=False),
                args.repeats,
            )
        rows.append((label, used, weight_bytes(model) / 1e6, ids.shape[1] / prefill,
                     args.decode_tokens / decode))
        print(f"measured {label}: prefill {ids.shape[1] / prefill:.0f} tok/s, "
              f"decode {args.decode_tokens / decode:.1f} tok/s", file=sys.stderr, flush=True)
        del model

    ref = rows[0]
    print(f"model {args.model}, {args.threads} threads, torch {torch.__version__}, "
          f"prefill 1 x {ids.shape[1]} tokens, decode {args.decode_tokens} tokens\n")
    print("| variant | layers per kernel | weight MB | x fp32 | prefill tok/s | x fp32 "
          "| decode tok/s | x fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, used, mb, pre, dec in rows:
        print(f"| {label} | {used} | {mb:.1f} | {mb / ref[2]:.2f} | {pre:.0f} | {pre / ref[3]:.2f} | "
              f"{dec:.1f} | {dec / ref[4]:.2f} |")


if __name__ == "__main__":
    main()
