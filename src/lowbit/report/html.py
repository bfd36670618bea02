"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG, no scripts and
no network resources, so it opens the same anywhere, offline."""

from __future__ import annotations

import base64
from html import escape

from lowbit.report.build import Report, Section
from lowbit.report.collect import ChatSet, check_text
from lowbit.report.tables import Table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.baseline td { font-style: italic; background: #fafafa; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; max-width: 70em; margin-top: 0.4em; }
table.chat td { max-width: 38em; } table.chat pre { white-space: pre-wrap; margin: 0; font-size: 0.95em; }
footer { margin-top: 3em; font-size: 0.8em; color: #666; }
"""


def render(report: Report) -> str:
    body = [f"<h1>{escape(report.title)}</h1>", _contents(report.sections)]
    body += [_section(s) for s in report.sections]
    body.append("<footer>Made by <code>lowbit report</code> from: "
                + ", ".join(f"<code>{escape(s)}</code>" for s in report.sources) + "</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(report.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _contents(sections: list[Section]) -> str:
    items = "".join(f'<li><a href="#{escape(s.id)}">{escape(s.title)}</a></li>' for s in sections)
    return f"<nav><ul>{items}</ul></nav>"


def _section(section: Section) -> str:
    parts = [f'<section id="{escape(section.id)}">', f"<h2>{escape(section.title)}</h2>"]
    parts += [f"<p>{escape(p)}</p>" for p in section.text]
    for title, table in section.tables:
        if title:
            parts.append(f"<h3>{escape(title)}</h3>")
        parts.append(table_html(table))
    for plot in section.plots:
        data = base64.b64encode(plot.png).decode("ascii")
        parts.append(f'<figure id="fig-{escape(plot.id)}"><img alt="{escape(plot.title)}" '
                     f'src="data:image/png;base64,{data}"><figcaption><b>{escape(plot.title)}.</b> '
                     f"{escape(plot.caption)}</figcaption></figure>")
    for title, table in section.appendix:
        parts.append(f"<details><summary>{escape(title)}</summary>{table_html(table)}</details>")
    if section.chat is not None:
        parts.append(chat_html(section.chat))
    parts.append("</section>")
    return "\n".join(parts)


def table_html(table: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.headers)
    rows = []
    for cells, baseline in zip(table.rows, table.emphasis):
        tds = "".join(f'<td{" class=num" if num else ""}>{escape(c)}</td>' for c, num in zip(cells, table.numeric))
        rows.append(f'<tr{" class=baseline" if baseline else ""}>{tds}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def chat_html(chat: ChatSet) -> str:
    answer_keys = list(dict.fromkeys(k for item in chat.items for k in item.answers))
    head = "".join(f"<th>{escape(h)}</th>" for h in ["prompt", *answer_keys, "checks"])
    rows = []
    for item in chat.items:
        prompt = (f"<b>{escape(item.id)}</b><br>" if item.id else "") + f"<pre>{escape(item.prompt)}</pre>"
        answers = "".join(f"<td><pre>{escape(item.answers.get(k, ''))}</pre></td>" for k in answer_keys)
        checks = "<br>".join(f"{escape(k)}: {escape(check_text(v))}" for k, v in item.checks.items())
        rows.append(f"<tr><td>{prompt}</td>{answers}<td>{checks}</td></tr>")
    return f'<table class="chat"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
