"""Fingerprints of quantized models: a SHA-256 over every tensor of the state dict, per method.

Run it before and after a change that should not change results (a refactor), e.g. with the old
code first on the path:

    PYTHONPATH=/path/to/old/src python benchmarks/fingerprint.py --out old.json
    python benchmarks/fingerprint.py --out new.json && diff old.json new.json

Default: the tiny random Llama and Qwen2 models (seconds). ``--model smollm2-135m`` runs the real
model (w4g128 with ``--samples`` calibration windows of 512 tokens; minutes per method).
Uses only library calls that exist before and after the stage refactor (Recipe(scheme, method)).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch

TINY_RUNS = [("rtn", "w4g16"), ("rtn", "w8"), ("hqq", "w4g16-asym"), ("gptq", "w4g16"),
             ("gptq", "w3g16-asym"), ("awq", "w4g16"), ("awq", "w4g16-asym")]


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tiny(methods: list[str] | None) -> dict[str, str]:
    from lowbit.models.tiny import tiny_model
    from lowbit.quantize import quantize
    from lowbit.recipe import Recipe

    out = {}
    for arch in ("llama", "qwen2"):
        for method, scheme in TINY_RUNS:
            if methods and method not in methods:
                continue
            torch.manual_seed(0)
            model = tiny_model(arch, seed=0)
            calib = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
            quantize(model, Recipe(scheme=scheme, method=method), calib, progress=False)
            out[f"{arch}/{method}/{scheme}"] = state_hash(model)
            print(f"{arch}/{method}/{scheme}: {out[f'{arch}/{method}/{scheme}']}", flush=True)
    return out


def real(model_name: str, methods: list[str], samples: int) -> dict[str, str]:
    from lowbit.data.calibration import CalibrationSpec
    from lowbit.quantize import quantize_pretrained
    from lowbit.recipe import Recipe

    out = {}
    for method in methods:
        start = time.perf_counter()
        model, _, _ = quantize_pretrained(model_name, Recipe(scheme="w4g128", method=method),
                                          CalibrationSpec(num_samples=samples), progress=False)
        out[f"{model_name}/{method}/w4g128/{samples}"] = state_hash(model)
        print(f"{method}: {state_hash(model)} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a model spec such as smollm2-135m")
    parser.add_argument("--methods", default="", help="comma-separated (default: all of rtn,hqq,gptq,awq)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (real model)")
    parser.add_argument("--out", help="write the fingerprints to this JSON file")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if args.model == "tiny":
        result = tiny(methods)
    else:
        result = real(args.model, methods or ["rtn", "hqq", "gptq", "awq"], args.samples)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
