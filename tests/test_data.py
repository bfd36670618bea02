"""Text sources, splits, markup stripping, calibration and evaluation token sets."""

import json

import pytest
import torch

from lowbit.data import (
    CalibrationSpec,
    DataError,
    calibration_tokens,
    documents,
    evaluation_tokens,
    strip_wiki_markup,
    text as text_module,
    tokenize_documents,
)
from lowbit.errors import ConfigError, LowbitError

WIKI_SAMPLE = """{{Infobox person
| name = Ada {{nowrap|Lovelace}}
| image = {{!}}
}}
'''Ada Lovelace''' (10 December 1815 &ndash; 1852)<ref name="a">Source, p.&nbsp;3</ref> was an
[[England|English]] [[mathematician]].<ref name="b"/> <!-- hidden note -->

== Early life ==
[[File:Ada.jpg|thumb|A portrait by [[Alfred Edward Chalon|Chalon]] of ''Ada'']]
She wrote about the [[Analytical Engine]] ({{lang-fr|moteur}}), see [http://example.org the notes].
{| class="wikitable"
! a !! b
|-
| {{flag|UK}} || 2
|}
* First item
# Second item

=== Work ===
Her notes<ref>{{cite book|title=Notes}}</ref> are famous.

== See also ==
* [[Charles Babbage]]

== References ==
{{reflist}}
[[Category:1815 births]]
[[de:Ada Lovelace]]
"""

WIKI_EXPECTED = """Ada Lovelace (10 December 1815 – 1852) was an
English mathematician.

Early life

She wrote about the Analytical Engine, see the notes.

First item
Second item

Work

Her notes are famous."""


def test_strip_wiki_markup_inline_sample():
    assert strip_wiki_markup(WIKI_SAMPLE) == WIKI_EXPECTED


def test_strip_wiki_markup_file_caption_with_brackets():
    # A single bracket in the caption hides the file link from the innermost-link pass.
    text = "Before.\n[[Image:C4.png|thumb|Bicyclo[1.1.0]butane and [[isobutane]].]]\nAfter."
    assert strip_wiki_markup(text) == "Before.\n\nAfter."


# lee: 300 lines minus 7 repeated articles
@pytest.mark.parametrize("source, n_docs", [("wiki", 106), ("lee", 293)])
def test_bundled_splits_are_disjoint_deterministic_and_complete(source, n_docs):
    cal = documents(source, "calibration")
    ev = documents(source, "evaluation")
    every = documents(source, "all")
    assert len(every) == n_docs == len(set(every))
    assert len(ev) == n_docs // 10 and len(cal) == n_docs - n_docs // 10
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == sorted(every)
    assert ev == every[9::10]  # the documented rule: the 10th, 20th, ... document
    assert documents(source, "evaluation") == ev  # same order every call


def test_wiki_documents_are_plain_prose():
    docs = documents("wiki", "all")
    assert docs[0].startswith("Anarchism\n\n")
    text = "\n".join(docs)
    for marker in ("{{", "}}", "[[", "]]", "{|", "<ref", "'''", "==", "&nbsp;", "thumb|"):
        assert marker not in text, marker
    assert sum(len(d.split()) for d in docs) > 400_000


def test_default_calibration_and_evaluation_share_no_documents(tokenizer):
    spec = CalibrationSpec()
    cal = documents(spec.source, spec.split)
    ev = documents(spec.source, "evaluation")
    assert not set(cal) & set(ev)
    # The evaluation stream is exactly the evaluation documents (the byte tokenizer is lossless).
    tokens = evaluation_tokens(tokenizer)
    assert tokenizer.decode(tokens[0]) == "\n\n".join(ev)


def _write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


def _docs(n):
    """Distinct documents: every word names its document."""
    return [
        f"Document number {i}. " + " ".join(f"w{i}x{j}" for j in range(10 + i)) for i in range(n)
    ]


def test_txt_and_jsonl_sources(tmp_path):
    docs = _docs(25)
    txt = _write_txt(tmp_path / "corpus.txt", [d.replace(". ", ".\n", 1) for d in docs])
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n",
        encoding="utf-8",
    )
    from_txt = documents(txt, "all")
    assert [d.replace("\n", " ") for d in from_txt] == [d.strip() for d in docs]
    assert documents(str(jsonl), "all") == [d.strip() for d in docs]
    assert documents(str(jsonl), "evaluation") == [docs[9].strip(), docs[19].strip()]
    assert len(documents(txt, "calibration")) == 23


def test_local_source_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        documents(str(bad), "all")
    with pytest.raises(DataError, match="does not exist"):
        documents(str(tmp_path / "missing.txt"), "all")
    with pytest.raises(DataError, match="split"):
        documents("wiki", "train")
    with pytest.raises(DataError, match="unknown text source"):
        documents("no-such-source", "all")


def test_hub_source_fails_clearly_offline():
    # Either the datasets package is missing or the hub is unreachable (HF_DATASETS_OFFLINE=1).
    with pytest.raises(DataError, match="datasets|hub"):
        documents("someone/no-such-dataset-lowbit", "evaluation")


def test_missing_gensim_names_the_install_command(monkeypatch):
    real = text_module.importlib.util.find_spec
    monkeypatch.setattr(
        text_module.importlib.util, "find_spec",
        lambda name: None if name == "gensim" else real(name),
    )
    with pytest.raises(LowbitError, match="pip install --no-deps gensim"):
        documents("lee", "all")


def test_calibration_tokens_deterministic_windows(tmp_path, tokenizer):
    txt = _write_txt(tmp_path / "c.txt", _docs(40))
    spec = CalibrationSpec(source=txt, num_samples=12, seq_len=32, seed=3)
    a = calibration_tokens(spec, tokenizer)
    b = calibration_tokens(spec, tokenizer)
    reseeded = CalibrationSpec(source=txt, num_samples=12, seq_len=32, seed=4)
    other = calibration_tokens(reseeded, tokenizer)
    assert a.shape == (12, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    # Every window is a contiguous slice of the calibration stream, never of evaluation text.
    stream = tokenize_documents(documents(txt, "calibration"), tokenizer)
    slices = stream.unfold(0, 32, 1)
    for row in a:
        assert (slices == row).all(-1).any()
    ev_text = "\n\n".join(documents(txt, "evaluation"))
    assert all(tokenizer.decode(row) not in ev_text for row in a)


def test_calibration_from_bundled_lee(tokenizer):
    spec = CalibrationSpec(source="lee", num_samples=4, seq_len=64)
    tokens = calibration_tokens(spec, tokenizer)
    cal_text = "\n\n".join(documents("lee", "calibration"))
    assert tokens.shape == (4, 64)
    assert all(tokenizer.decode(row[4:-4]) in cal_text for row in tokens)


def test_calibration_text_too_short(tmp_path, tokenizer):
    txt = _write_txt(tmp_path / "short.txt", ["tiny text"] * 3)
    n = tokenize_documents(documents(txt, "calibration"), tokenizer).numel()
    with pytest.raises(DataError, match=rf"has {n} tokens, fewer than seq_len=512"):
        calibration_tokens(CalibrationSpec(source=txt, num_samples=2, seq_len=512), tokenizer)


def test_calibration_spec_records():
    spec = CalibrationSpec(source="lee", num_samples=8, seq_len=128, seed=1)
    assert CalibrationSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown field"):
        CalibrationSpec.from_dict({"num_sample": 8})
    with pytest.raises(DataError, match="num_samples"):
        CalibrationSpec(num_samples=0)
    with pytest.raises(DataError, match="split"):
        CalibrationSpec(split="test")


def test_evaluation_tokens_cut_and_deterministic(tmp_path, tokenizer):
    txt = _write_txt(tmp_path / "e.txt", _docs(30))
    full = evaluation_tokens(tokenizer, source=txt)
    cut = evaluation_tokens(tokenizer, source=txt, max_tokens=50)
    assert full.dim() == 2 and full.shape[0] == 1
    assert torch.equal(cut, full[:, :50])
    assert torch.equal(evaluation_tokens(tokenizer, source=txt), full)


@pytest.mark.slow
def test_real_wiki_with_smollm2_tokenizer():
    from lowbit.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    ev = evaluation_tokens(tok)
    assert ev.shape[1] >= 20_000  # at least 39 windows of 512
    cal = calibration_tokens(CalibrationSpec(), tok)
    assert cal.shape == (128, 512)
    assert torch.equal(cal, calibration_tokens(CalibrationSpec(), tok))
