"""The report's tables as plain rows of text, shared by the HTML page and the Markdown summary.

A column that no run fills is left out, so a report built from compare results alone has no
empty task or speed columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.report.collect import Collection, Run, Verdict
from lowbit.report.peers import Peer

VERDICT_WORDS = {"pass": "pass", "noise": "over budget, within noise", "fail": "FAIL"}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    """Per column: right-aligned numbers."""
    emphasis: list[bool]
    """Per row: the float baseline (drawn in italics)."""


def runs_table(collection: Collection) -> Table:
    runs = collection.ordered()
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    bench = bench_columns(runs, MAIN_BENCH)
    columns: list[tuple[str, bool, object]] = [
        ("run", False, lambda r: r.label + (" (float)" if r.baseline else "")),
        ("method", False, lambda r: r.method or ""),
        ("scheme", False, lambda r: r.scheme or ""),
        ("size MB", True, lambda r: _num(r.size_mb, ".1f")),
        ("bits/weight", True, lambda r: _num(r.bits_per_weight, ".3f")),
        *[(title, True, _bench_cell(key)) for key, title in bench],
        ("perplexity", True, lambda r: _num(r.fidelity and r.fidelity.perplexity, ".3f")),
        ("ppl change", True, lambda r: _num(r.fidelity and r.fidelity.ppl_change_pct, "+.2f", "%")),
        ("mean KL", True, lambda r: _num(r.fidelity and r.fidelity.mean_kl, ".4f")),
        ("KL p99", True, lambda r: _num(r.fidelity and r.fidelity.p99_kl, ".3f")),
        ("top-1", True, lambda r: _num(r.fidelity and r.fidelity.top1_agreement, ".3f")),
        *[(task, True, _task_cell(task)) for task in tasks],
        ("budget", False, lambda r: verdict_text(r.verdict)),
    ]
    cells = [[fn(r) for _, _, fn in columns] for r in runs]
    keep = [i for i in range(len(columns)) if i == 0 or any(row[i] for row in cells)]
    return Table([columns[i][0] for i in keep], [[row[i] for i in keep] for row in cells],
                 [columns[i][1] for i in keep], [r.baseline for r in runs])


BENCH_TITLES = {"load_seconds": "load time", "rss_mb": "RSS", "weight_mb": "weights", "peak_rss_mb": "peak RSS"}
MAIN_BENCH = re.compile(r"^(weight_mb|rss_mb|decode_b\d+)_ratio$")
"""The ratios the table of runs shows; the speed table shows them all."""


def bench_columns(runs: list[Run], only: re.Pattern | None = None) -> list[tuple[str, str]]:
    """(key, title) of the speed and memory ratios to the float model (``lowbit bench``), in the
    order first seen; ``only``: those whose key matches."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.bench if k.endswith("_ratio"))
            if only is None or only.match(k)]
    return [(k, _bench_title(k.removesuffix("_ratio")) + " x") for k in keys]


def _bench_title(name: str) -> str:
    if name in BENCH_TITLES:
        return BENCH_TITLES[name]
    kind, _, batch = name.rpartition("_b")
    if batch.isdigit():
        return f"{'TTFT' if kind == 'ttft' else kind.replace('_', ' ')} b{batch}"
    return name.replace("_", " ")


def bench_table(collection: Collection) -> Table | None:
    """Every speed and memory ratio of the runs a bench measured; None without a bench."""
    runs = [r for r in collection.ordered() if r.bench]
    columns = bench_columns(runs)
    if not columns:
        return None
    rows = [[r.label + (" (float)" if r.baseline else "")] + [_bench_cell(k)(r) for k, _ in columns] for r in runs]
    return Table(["run"] + [t for _, t in columns], rows, [False] + [True] * len(columns), [r.baseline for r in runs])


def validation_table(run: Run) -> Table:
    """Per task of a validate run: accuracies, changes, paired error, verdict."""
    headers = ["task", "n", "baseline", "quantized", "change", "relative", "recovery", "paired se", "p", "verdict"]
    rows = []
    for t in run.verdict.tasks:
        rows.append([
            str(t.get("task", "")), _num(t.get("n"), "d"),
            _acc(t.get("baseline_accuracy"), t.get("baseline_stderr")), _acc(t.get("accuracy"), t.get("stderr")),
            _num(_pct(t.get("change")), "+.2f", " pt"), _num(_pct(t.get("relative_change")), "+.2f", "%"),
            _num(t.get("recovery"), ".1f", "%"), _num(_pct(t.get("paired_stderr")), ".2f", " pt"),
            _num(t.get("p_value"), ".3g"), VERDICT_WORDS.get(str(t.get("verdict")), str(t.get("verdict") or "")),
        ])
    return Table(headers, rows, [False] + [True] * 8 + [False], [False] * len(rows))


def peers_table(peers: list[Peer]) -> Table:
    rows = [[p.name, _num(p.bits, ".2f"), _num(p.size_mb, ".1f"), _num(p.kl, ".4g")] for p in peers]
    table = Table(["peer", "bits/weight", "size MB", "mean KL"], rows, [False, True, True, True], [False] * len(rows))
    keep = [i for i in range(4) if i in (0, 3) or any(r[i] for r in rows)]
    return Table([table.headers[i] for i in keep], [[r[i] for i in keep] for r in rows],
                 [table.numeric[i] for i in keep], table.emphasis)


def verdict_text(verdict: Verdict | None) -> str:
    if verdict is None:
        return ""
    word = VERDICT_WORDS.get(verdict.verdict, verdict.verdict)
    return f"{word} ({verdict.budget:.1%} budget)" if verdict.budget is not None else word


def _bench_cell(key: str):
    return lambda r: _num(r.bench.get(key), ".2f", "x")


def _task_cell(task: str):
    def cell(r: Run) -> str:
        score = r.tasks.get(task)
        return "" if score is None else _acc(score.accuracy, score.stderr)
    return cell


def _acc(accuracy, stderr) -> str:
    if not isinstance(accuracy, int | float):
        return ""
    text = f"{100 * accuracy:.1f}"
    return text + (f" ± {100 * stderr:.1f}" if isinstance(stderr, int | float) else "")


def _pct(value):
    return 100 * value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _num(value, spec: str, suffix: str = "") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:{spec}}{suffix}"
