"""``lowbit report``: one self-contained HTML page (and a Markdown summary) about quantized runs.

    collect   read the inputs (compare folders, lowbit folders, --json outputs) into Runs
    clipping  float weights and activations against the quantization grid (torch)
    plots     matplotlib figures -> PNG
    tables    the tables as rows of text
    build     which sections and figures exist, with their captions
    html, markdown   render a built report

Arrows point down this list's dependencies only: collect and clipping know nothing of figures,
plots nothing of files, and the renderers nothing of models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowbit.report.build import Report, build_report
from lowbit.report.collect import Collection, Run, collect
from lowbit.report.peers import Peers, read_peers


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    figures: int


def write_report(report: Report, out: str | Path) -> ReportFiles:
    """Write ``out`` (the HTML page) and the Markdown summary beside it (``report.md`` for
    ``report.html``: the same name, suffix ``.md``)."""
    from lowbit.report import html, markdown

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out.with_suffix(out.suffix + ".html") if out.suffix else out.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    out.write_text(html.render(report), encoding="utf-8")
    md.write_text(markdown.render(report, out.name), encoding="utf-8")
    return ReportFiles(out, md, sum(len(s.plots) for s in report.sections))


__all__ = ["Collection", "Peers", "Report", "ReportFiles", "Run", "build_report", "collect", "read_peers",
           "write_report"]
