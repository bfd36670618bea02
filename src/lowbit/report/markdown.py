"""The report's Markdown summary: the same tables and captions as the page, without figures
(they live in the HTML page beside it), and the chat checks as one line per prompt."""

from __future__ import annotations

from lowbit.report.build import Report
from lowbit.report.collect import ChatSet, check_text
from lowbit.report.tables import Table


def render(report: Report, page_name: str) -> str:
    lines = [f"# {report.title}", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.text:
            lines += [paragraph, ""]
        for title, table in section.tables:
            if title:
                lines += [f"### {title}", ""]
            lines += [table_markdown(table), ""]
        for plot in section.plots:
            lines += [f"*Figure in {page_name}: {plot.title}.* {plot.caption}", ""]
        for title, table in section.appendix:
            lines += [f"### {title}", "", table_markdown(table), ""]
        if section.chat is not None:
            lines += [chat_markdown(section.chat), ""]
    lines += ["Made by `lowbit report` from: " + ", ".join(f"`{s}`" for s in report.sources), ""]
    return "\n".join(lines)


def table_markdown(table: Table) -> str:
    def row(cells):
        return "| " + " | ".join(_cell(c) for c in cells) + " |"

    align = ["---:" if num else "---" for num in table.numeric]
    return "\n".join([row(table.headers), "|" + "|".join(align) + "|", *[
        row([f"*{c}*" if baseline and c else c for c in cells]) for cells, baseline in zip(table.rows, table.emphasis)
    ]])


def chat_markdown(chat: ChatSet) -> str:
    lines = []
    for item in chat.items:
        checks = "; ".join(f"{k}: {check_text(v)}" for k, v in item.checks.items())
        lines.append(f"- **{item.id or item.prompt[:60]}**: {checks or 'no checks'}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
