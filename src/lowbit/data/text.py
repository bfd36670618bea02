"""Plain-text documents for calibration and evaluation, split by document into disjoint sets.

Sources (the ``source`` argument of :func:`documents`):

- ``"wiki"``: the English Wikipedia excerpt that ships inside the ``gensim`` wheel (106 articles,
  markup stripped to prose by :func:`strip_wiki_markup`, title first).
- ``"lee"``: the Lee news corpus in ``gensim`` (300 ABC news articles, one per line, 293 distinct).
- a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (field ``"text"``).
- a Hugging Face hub dataset id, ``"owner/name"`` or ``"owner/name:config"``, through the optional
  ``datasets`` package (needs a reachable hub).

Splits are fixed and deterministic: exact duplicate documents are dropped (first kept), then
document ``i`` (0-based, in file order) belongs to
``"evaluation"`` when ``i % 10 == EVAL_EVERY - 1`` (the 10th, 20th, ... document) and to
``"calibration"`` otherwise; ``"all"`` is every document. Hub datasets use their own splits
(calibration -> ``train``; evaluation -> ``test``, else ``validation``).
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from lowbit import defaults
from lowbit.errors import LowbitError

SPLITS = ("calibration", "evaluation", "all")
BUNDLED = ("wiki", "lee")
EVAL_EVERY = 10
"""Every EVAL_EVERY-th document (1-based) is evaluation text; the rest is calibration text."""

_GENSIM_DATA = "test/test_data"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILE = "lee_background.cor"


class DataError(LowbitError, ValueError):
    """A text source or calibration setting cannot be used."""


def documents(source: str = defaults.CALIBRATION_SOURCE, split: str = "calibration") -> list[str]:
    """The documents of ``split`` from ``source``, in a fixed order (see the module docstring)."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if source in BUNDLED or _is_local_file(source):
        docs = _bundled(source) if source in BUNDLED else _read_local(Path(source))
        return split_documents(unique(docs), split)
    if "/" in source and not source.endswith((".txt", ".jsonl")):
        return _hub_documents(source, split)
    raise DataError(
        f"unknown text source {source!r}: use one of {', '.join(BUNDLED)}, an existing .txt / "
        ".jsonl file, or a hub dataset id owner/name[:config]"
    )


def unique(docs) -> list[str]:
    """Drop exact repeats (first kept): the Lee corpus holds 7, and a repeat could land in both
    splits."""
    return list(dict.fromkeys(docs))


def split_documents(docs: list[str] | tuple[str, ...], split: str) -> list[str]:
    """Assign document i to evaluation when i % EVAL_EVERY == EVAL_EVERY - 1, else calibration."""
    if split == "all":
        return list(docs)
    want_eval = split == "evaluation"
    return [d for i, d in enumerate(docs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == want_eval]


# ---------------------------------------------------------------------------------------------
# Bundled text (gensim's test data; located without importing gensim, which is slow to import)


def _bundled(name: str) -> tuple[str, ...]:
    path = _gensim_data_dir() / (_WIKI_FILE if name == "wiki" else _LEE_FILE)
    if not path.is_file():
        raise DataError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall gensim"
        )
    return _read_wiki_dump(path) if name == "wiki" else _read_lines(path)


def _gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the bundled texts 'wiki' and 'lee' come from gensim's test data; "
            "install it with: pip install --no-deps gensim"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _GENSIM_DATA


@functools.lru_cache(maxsize=4)
def _read_wiki_dump(path: Path) -> tuple[str, ...]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML dump, as plain text."""
    docs = []
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if _local(el.tag) != "page":
                continue
            fields = {_local(c.tag): c for c in el}
            revision = fields.get("revision")
            text_el = None if revision is None else next(
                (c for c in revision if _local(c.tag) == "text"), None
            )
            is_article = fields.get("ns") is not None and fields["ns"].text == "0"
            if is_article and "redirect" not in fields and text_el is not None and text_el.text:
                body = strip_wiki_markup(text_el.text)
                if body:
                    docs.append(f"{fields['title'].text}\n\n{body}")
            el.clear()  # the dump is large; keep memory flat
    return tuple(docs)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@functools.lru_cache(maxsize=4)
def _read_lines(path: Path) -> tuple[str, ...]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


# ---------------------------------------------------------------------------------------------
# Local files and hub datasets


def _is_local_file(source: str) -> bool:
    return source.endswith((".txt", ".jsonl")) or Path(source).is_file()


def _read_local(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"text file {path} does not exist; pass an existing .txt or .jsonl file")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}:{n}: each line must be a JSON object with a string field 'text' ({e})"
                ) from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: field 'text' must be a string")
            if text.strip():
                docs.append(text.strip())
        return docs
    if path.suffix != ".txt":
        raise DataError(f"{path}: only .txt (blank-line separated) and .jsonl files are supported")
    text = path.read_text(encoding="utf-8")
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def _hub_documents(dataset_id: str, split: str) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"hub dataset {dataset_id!r} needs the datasets package: pip install datasets "
            "(or pass a local .txt / .jsonl file)"
        )
    import datasets

    name, _, config = dataset_id.partition(":")
    try:
        available = datasets.get_dataset_split_names(name, config or None)
        wanted = {"calibration": ["train"], "all": ["train"], "evaluation": ["test", "validation"]}
        hub_split = next((s for s in wanted[split] if s in available), None)
        if hub_split is None:
            raise DataError(
                f"hub dataset {dataset_id!r} has splits {available}, none of {wanted[split]}"
            )
        rows = datasets.load_dataset(name, config or None, split=hub_split)
    except DataError:
        raise
    except Exception as e:  # network, auth, missing dataset: all end the same way for the user
        raise DataError(
            f"could not load hub dataset {dataset_id!r} ({type(e).__name__}: {e}); check the id "
            "and that the hub is reachable, or pass a local .txt / .jsonl file"
        ) from None
    if "text" not in rows.column_names:
        raise DataError(f"hub dataset {dataset_id!r} has no 'text' column ({rows.column_names})")
    return [t.strip() for t in rows["text"] if t and t.strip()]


# ---------------------------------------------------------------------------------------------
# Wiki markup -> prose

# Sections that hold lists of links and citations rather than prose.
_DROPPED_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
}
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")  # [[de:Anarchismus]]
_DROPPED_ELEMENTS = ("ref", "gallery", "math", "timeline", "score", "imagemap", "syntaxhighlight",
                     "source", "templatedata", "chem", "ce")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup, close to wikitext-2's raw text.

    Drops comments, ``<ref>`` and similar elements, templates ``{{...}}`` (nested), tables
    ``{|...|}``, file / category / interlanguage links and reference sections; keeps the visible
    text of links (``[[target|text]]`` -> ``text``), external links and headings
    (``== X ==`` -> ``X``); removes bold / italic quotes, list markers and remaining HTML tags.
    """
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    for tag in _DROPPED_ELEMENTS:
        text = re.sub(rf"<{tag}\b[^>]*?/>", "", text, flags=re.I)
        text = re.sub(rf"<{tag}\b[^>]*?>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    text = _drop_balanced(text, "{{", "}}")
    text = _drop_balanced(text, "{|", "|}")
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url text]
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]*>", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and other behaviour switches
    return _clean_lines(text)


def _drop_balanced(text: str, open_: str, close: str, drop=lambda span: True) -> str:
    """Remove each outermost balanced ``open_ ... close`` span for which ``drop(span)`` holds.

    Nesting is followed; an unclosed span is kept.
    """
    out, depth, kept_from, span_start = [], 0, 0, 0
    for m in re.finditer(f"{re.escape(open_)}|{re.escape(close)}", text):
        if m.group() == open_:
            if depth == 0:
                span_start = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0 and drop(text[span_start:m.end()]):
                out.append(text[kept_from:span_start])
                kept_from = m.end()
    out.append(text[kept_from:])
    return "".join(out)


_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _is_hidden_link(target: str) -> bool:
    t = target.strip().lower()
    return t.startswith(_DROPPED_LINK_PREFIXES) or bool(_INTERWIKI.match(t))


def _replace_links(text: str) -> str:
    """Resolve ``[[...]]`` innermost first, so links inside file captions vanish with the file."""

    def visible(m: re.Match) -> str:
        target, _, label = m.group(1).partition("|")
        return "" if _is_hidden_link(target) else (label or target).strip()

    while True:
        new = _INNER_LINK.sub(visible, text)
        if new == text:
            break
        text = new
    # Captions holding single brackets ("Bicyclo[1.1.0]butane") escape the innermost pass.
    return _drop_balanced(text, "[[", "]]", drop=lambda span: _is_hidden_link(span[2:]))


def _clean_lines(text: str) -> str:
    text = re.sub(r"\([ \t]*[,;]?[ \t]*\)", "", text)  # "( )" left where templates were removed
    entries = []  # (heading level or 0 for prose, text)
    dropping_level = 0
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if dropping_level and level > dropping_level:
                continue  # a subsection of a dropped section
            dropping_level = level if title.lower() in _DROPPED_SECTIONS else 0
            if not dropping_level and title:
                entries.append((level, title))
            continue
        if dropping_level:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r" +([,.;:])(?=\s|$)", r"\1", line)
        # Lines that were pure markup leave only punctuation behind (e.g. "|" or "()").
        if line and not re.search(r"\w", line):
            continue
        entries.append((0, line))
    lines = []
    for i, (level, line) in enumerate(entries):
        if level == 0:
            lines.append(line)
        elif _section_has_prose(entries, i):  # headings of removed tables or lists go too
            lines.extend(["", line, ""])
    body = "\n".join(lines)
    body = re.sub(r"\n{3,}", "\n\n", body)
    return body.strip()


def _section_has_prose(entries: list[tuple[int, str]], i: int) -> bool:
    """Whether prose follows heading ``i`` before the next heading of the same or a higher level."""
    for level, line in entries[i + 1:]:
        if level == 0 and line:
            return True
        if 0 < level <= entries[i][0]:
            return False
    return False
