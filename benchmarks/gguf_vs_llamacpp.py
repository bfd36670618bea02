"""lowbit's calibration-aware GGUF files against llama.cpp's own quantizer with an importance
matrix, on the same float model and the same text, both measured by llama.cpp.

    python benchmarks/gguf_vs_llamacpp.py --llama-bin path/to/llama.cpp/build/bin
    python benchmarks/gguf_vs_llamacpp.py --llama-bin ... --types Q4_0,IQ4_NL,Q4_K_M --method gptq

llama.cpp's tools are not on PyPI as programs; build them once from the llama.cpp source that
the llama-cpp-python sdist vendors (about 25 minutes on 2 cores):

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \\
          -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build --target llama-quantize llama-imatrix llama-perplexity -j2

What runs, for one bundled model (``--model``, a GGUF-distributed one):

1. float: ``llama-quantize --allow-requantize SOURCE float.gguf F32`` (the model's float
   weights, exactly what lowbit converts to);
2. llama.cpp: ``llama-imatrix`` on float.gguf over lowbit's calibration documents
   (``--calib-chunks`` x 512 tokens), then ``llama-quantize --imatrix`` to each type;
3. lowbit: ``lowbit quantize MODEL --scheme gguf:TYPE --method METHOD --format gguf:TYPE``
   (calibration: 128 x 512 tokens of the same documents);
4. scoring: ``llama-perplexity --kl-divergence-base`` on float.gguf over lowbit's evaluation
   documents (``--eval-chunks`` x 512 tokens), then ``--kl-divergence`` for every file: llama.cpp
   runs every file (its runtime error included) and reports mean KL, 99th percentile, same top-1.

Prints a markdown table (bits per weight of the decoder matrices as stored).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from lowbit.contents import gguf_linear_bits
from lowbit.data.calibration import DOCUMENT_SEPARATOR
from lowbit.data.text import documents
from lowbit.models.load import source_gguf


def run(cmd: list, log: Path) -> str:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        out = subprocess.run(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(out.stdout)
    if out.returncode:
        sys.exit(f"failed ({out.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return out.stdout


def kl_stats(text: str) -> dict:
    """llama-perplexity's KL summary lines: mean KLD, 99.0% KLD, same top p, mean PPL ratio."""
    def grab(label):
        m = re.search(rf"{label}\s*:\s*([-0-9.]+)", text)
        return float(m.group(1)) if m else float("nan")
    return {"mean_kl": grab("Mean    KLD"), "p99_kl": grab("99.0%   KLD"), "top1": grab("Same top p") / 100,
            "ppl_ratio": grab(r"Mean PPL\(Q\)/PPL\(base\)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", required=True, type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="Q4_0,IQ4_NL,Q4_K_M")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--calib-chunks", type=int, default=128)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="keep files here (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    binary = lambda name: args.llama_bin / name  # noqa: E731
    source = source_gguf(args.model, work)
    if source is None:
        sys.exit(f"{args.model} is not a GGUF-distributed model")
    calib, evaluation = work / "calib.txt", work / "eval.txt"
    calib.write_text(DOCUMENT_SEPARATOR.join(documents("wiki", "calibration")))
    evaluation.write_text(DOCUMENT_SEPARATOR.join(documents("wiki", "evaluation")))
    float_gguf = work / "float.gguf"
    if not float_gguf.exists():
        run([binary("llama-quantize"), "--allow-requantize", source, float_gguf, "F32"], log)
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        run([binary("llama-imatrix"), "-m", float_gguf, "-f", calib, "-o", imatrix, "-c", 512,
             "--chunks", args.calib_chunks, "-t", 2], log)
    base = work / "base.kld"
    run([binary("llama-perplexity"), "-m", float_gguf, "-f", evaluation, "-c", 512, "--chunks", args.eval_chunks,
         "--kl-divergence-base", base, "-t", 2], log)
    rows = []
    for t in args.types.split(","):
        ours = work / f"lowbit-{args.method}-{t}.gguf"
        theirs = work / f"llamacpp-imatrix-{t}.gguf"
        if not theirs.exists():
            run([binary("llama-quantize"), "--allow-requantize", "--imatrix", imatrix, float_gguf, theirs, t], log)
        if not ours.exists():
            run([sys.executable, "-m", "lowbit.cli", "quantize", args.model, "--scheme", f"gguf:{t}",
                 "--method", args.method, "--format", f"gguf:{t}", "--out", ours, "--quiet"], log)
        for label, f in ((f"llama.cpp + imatrix ({args.calib_chunks} x 512)", theirs),
                         (f"lowbit {args.method} (128 x 512)", ours)):
            stats = kl_stats(run([binary("llama-perplexity"), "-m", f, "-f", evaluation, "-c", 512, "--chunks",
                                  args.eval_chunks, "--kl-divergence-base", base, "--kl-divergence", "-t", 2], log))
            rows.append((t, label, gguf_linear_bits(f), stats))
    print(f"\n{args.model}, {args.eval_chunks} x 512 evaluation tokens (llama.cpp scores the second half of "
          "each chunk), every file run by llama.cpp against float.gguf run by llama.cpp\n")
    print("| type | quantizer | bits/weight (decoder matrices) | mean KL | KL p99 | same top-1 | PPL ratio |")
    print("|---|---|---|---|---|---|---|")
    for t, label, bits, s in rows:
        print(f"| {t} | {label} | {bits:.3f} | {s['mean_kl']:.4f} | {s['p99_kl']:.4f} | {s['top1']:.3f} | "
              f"{s['ppl_ratio']:.4f} |")
    print(f"\nfiles and the full llama.cpp output: {work}")


if __name__ == "__main__":
    main()
