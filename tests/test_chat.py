"""Chat checks: code extraction, format checkers, the sandbox, greedy answers of a tiny model."""

import copy
import json

import pytest
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.eval.chat import (
    PROMPTS,
    Answer,
    ChatPrompt,
    CodeTask,
    bullet_count,
    check_answer,
    common_prefix,
    compare_answers,
    end_tokens,
    extract_code,
    generate_answers,
    json_object_keys,
    mostly_chinese,
    prompt_ids,
    run_sandboxed,
)
from lowbit.models.tiny import byte_tokenizer, tiny_model

ADD = CodeTask("add", "assert add(2, 3) == 5\n")


# -- code extraction ------------------------------------------------------------------------------


def test_extract_fenced_python_block_first():
    answer = ("Here:\n```text\ndef add(a, b): return 0\n```\nand\n```python\n"
              "def add(a, b):\n    return a + b\n```\nDone.")
    assert extract_code(answer, "add") == "def add(a, b):\n    return a + b\n"


def test_extract_unclosed_fence_runs_to_the_end():
    answer = "```py\nimport math\ndef add(a, b):\n    return math.fsum([a, b])"
    assert extract_code(answer, "add") == "import math\ndef add(a, b):\n    return math.fsum([a, b])\n"


def test_extract_unfenced_definition_with_prose_and_imports():
    answer = ("Sure! import the module first.\nimport operator\n\ndef add(a, b):\n    # sum\n\n"
              "    return operator.add(a, b)\nThis returns the sum.\ndef other(): pass")
    expected = "import operator\ndef add(a, b):\n    # sum\n\n    return operator.add(a, b)\n"
    assert extract_code(answer, "add") == expected


def test_extract_indented_unfenced_definition_is_dedented():
    answer = "    def add(a, b):\n        return a + b\n"
    assert extract_code(answer, "add") == "def add(a, b):\n    return a + b\n"


def test_extract_nothing_without_the_function():
    assert extract_code("def addition(a, b):\n    return a + b", "add") is None
    assert extract_code("```python\nprint(1)\n```", "add") is None
    assert extract_code("", "add") is None


# -- format checkers ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, count", [
    ("- apple\n- pear\n- plum", 3),
    ("* apple\n\n* pear\n* plum\n", 3),
    ("1. apple\n2) pear\n\u2022 plum", 3),
    ("- apple\n- pear", 2),
    ("Here are three fruits:\n- apple\n- pear\n- plum", None),
    ("-apple\n-pear\n-plum", None),
    ("", 0),
])
def test_bullet_count(text, count):
    assert bullet_count(text) == count


@pytest.mark.parametrize("text, keys", [
    ('{"name": "Ann", "age": 31}', {"name", "age"}),
    ('```json\n{"name": "Ann", "age": 31}\n```', {"name", "age"}),
    ('  {"name": "Ann"}  ', {"name"}),
    ('Sure: {"name": "Ann", "age": 31}', None),
    ('[{"name": "Ann"}]', None),
    ('{"name": "Ann", "age": 31', None),
])
def test_json_object_keys(text, keys):
    assert json_object_keys(text) == keys


def test_mostly_chinese():
    assert mostly_chinese("北京是中国的首都。")
    assert mostly_chinese("北京 (Beijing) 是中国的首都")
    assert not mostly_chinese("Beijing is the capital, 北京")
    assert not mostly_chinese("12345")


def test_check_answer_per_prompt_kind():
    fact = ChatPrompt("f", "capital?", expect="Paris")
    assert check_answer(fact, "It is paris.") == {"mentions_answer": True}
    assert check_answer(fact, "It is Lyon.") == {"mentions_answer": False}
    bullets = ChatPrompt("b", "three", bullets=3)
    assert check_answer(bullets, "- a\n- b\n- c") == {"format_followed": True}
    keyed = ChatPrompt("j", "json", json_keys=("name", "age"))
    assert check_answer(keyed, '{"age": 3, "name": "x"}') == {"format_followed": True}
    assert check_answer(keyed, '{"name": "x"}') == {"format_followed": False}
    code = ChatPrompt("c", "add", code=ADD)
    assert check_answer(code, "```python\ndef add(a, b):\n    return a + b\n```") == {
        "code_found": True, "code_runs": True, "code_passes": True}
    assert check_answer(code, "def add(a, b):\n    return a * b") == {
        "code_found": True, "code_runs": True, "code_passes": False}
    assert check_answer(code, "def add(a, b):\n    return (a +") == {
        "code_found": True, "code_runs": False, "code_passes": False}
    assert check_answer(code, "I cannot do that.") == {
        "code_found": False, "code_runs": False, "code_passes": False}


def test_prompt_set_covers_the_kinds():
    assert len({p.id for p in PROMPTS}) == len(PROMPTS) >= 6
    assert any(p.chinese for p in PROMPTS) and any(p.expect for p in PROMPTS)
    assert any(p.bullets for p in PROMPTS) and any(p.json_keys for p in PROMPTS)
    for p in PROMPTS:
        if p.code is not None:  # every coding check passes on a correct answer
            reference = {"add": "def add(a, b):\n    return a + b\n",
                         "is_palindrome": "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]\n"}
            assert run_sandboxed(reference[p.code.function], p.code.test).passes, p.id


# -- sandbox --------------------------------------------------------------------------------------


def test_sandbox_passing_and_failing_asserts():
    ok = run_sandboxed("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5")
    assert (ok.runs, ok.passes, ok.timed_out, ok.returncode) == (True, True, False, 0)
    wrong = run_sandboxed("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5")
    assert (wrong.runs, wrong.passes) == (True, False) and "AssertionError" in wrong.message
    missing = run_sandboxed("x = 1\n", "assert add(2, 3) == 5")
    assert (missing.runs, missing.passes) == (True, False) and "NameError" in missing.message
    broken = run_sandboxed("raise ValueError('boom')\n", "")
    assert (broken.runs, broken.passes) == (False, False) and "boom" in broken.message


def test_sandbox_main_block_is_not_run():
    # The answer runs as a module named "answer": an example that reads input() is skipped.
    r = run_sandboxed("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    input()\n",
                      "assert add(1, 1) == 2")
    assert r.passes


def test_sandbox_endless_loop_times_out():
    r = run_sandboxed("while True:\n    pass\n", "", timeout=1.0)
    assert (r.runs, r.passes, r.timed_out, r.returncode) == (False, False, True, None)


def test_sandbox_exit_is_not_a_pass():
    assert not run_sandboxed("import sys\nsys.exit(0)\n", "").runs


def test_sandbox_refuses_writing_outside_its_folder(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
                 f"import pathlib\npathlib.Path({str(tmp_path / 'dir')!r}).mkdir()\n",
                 "open('../escaped.txt', 'w').write('x')\n"):
        r = run_sandboxed(code, "")
        assert not r.runs and "sandbox" in r.message, code
    assert not target.exists() and not (tmp_path / "dir").exists()


def test_sandbox_allows_its_own_folder():
    code = ("import os\nwith open('note.txt', 'w') as f:\n    f.write('hi')\n"
            "os.mkdir('d')\nos.rename('note.txt', 'd/n')\n")
    r = run_sandboxed(code, "assert open('d/n').read() == 'hi'")
    assert r.passes, r.message


def test_sandbox_sees_no_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_TEST_SECRET", "s3cret")
    r = run_sandboxed("import os\nseen = dict(os.environ)\n",
                      "assert 'LOWBIT_TEST_SECRET' not in seen and set(seen) <= {'PATH', 'LANG', 'HOME', 'LC_CTYPE'}")
    assert r.passes, r.message
    # nor the parent's through /proc
    r = run_sandboxed("import os\nopen(f'/proc/{os.getppid()}/environ').read()\n", "")
    assert not r.runs and "sandbox" in r.message


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.system('true')\n",
    "import os\nos.fork()\n",
    "import ctypes\n",
    "import socket\n",
    "open('/etc/hostname').read()\n",
])
def test_sandbox_refuses_processes_sockets_and_outside_reads(code):
    r = run_sandboxed(code, "")
    assert not r.runs and "sandbox" in r.message


def test_sandbox_memory_limit():
    r = run_sandboxed("x = bytearray(3 << 30)\n", "", memory_bytes=1 << 30)
    assert not r.runs and "MemoryError" in r.message


# -- answers of a tiny model ------------------------------------------------------------------------


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_prompt_ids_plain_and_templated():
    tok = byte_tokenizer()
    assert prompt_ids(tok, "hi").tolist() == [tok("hi").input_ids]
    templated = copy.deepcopy(tok)
    templated.chat_template = ("{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
                               "{% if add_generation_prompt %}:{% endif %}")
    assert prompt_ids(templated, "hi").tolist() == [tok("<hi>:", add_special_tokens=False).input_ids]


def test_tiny_model_answers_are_deterministic_and_compared():
    tok = byte_tokenizer()
    model = tiny_model(seed=0)
    prompts = PROMPTS[:3]
    a = generate_answers(model, tok, prompts, max_new_tokens=8, progress=False)
    b = generate_answers(model, tok, prompts, max_new_tokens=8, progress=False)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert all(0 < len(x.token_ids) <= 8 for x in a)
    assert all(x.text == tok.decode(x.token_ids, skip_special_tokens=True).strip() for x in a)
    same = compare_answers(a, b, prompts)
    assert [r.common_prefix_tokens for r in same] == [len(x.token_ids) for x in a]
    assert all(r.first16_match for r in same)
    other = generate_answers(tiny_model(seed=1), tok, prompts, max_new_tokens=8, progress=False)
    results = compare_answers(a, other, prompts)
    assert [r.common_prefix_tokens for r in results] == [common_prefix(x.token_ids, y.token_ids)
                                                         for x, y in zip(a, other)]
    assert results[0].checks == {"baseline": {"mentions_answer": False}, "model": {"mentions_answer": False}}
    assert set(results[0].to_dict()) >= {"id", "prompt", "baseline_answer", "answer", "common_prefix_tokens",
                                         "first16_match", "checks"}


def test_answers_end_at_the_models_end_tokens_too():
    tok = byte_tokenizer()
    model = tiny_model(seed=0)
    free = generate_answers(model, tok, PROMPTS[:1], max_new_tokens=8, progress=False)[0]
    assert end_tokens(model, tok) == [2]
    stop = free.token_ids[1]  # the answer's 2nd token (or an earlier equal one) ends it now
    model.generation_config.eos_token_id = [stop, 2]
    assert end_tokens(model, tok) == [2, stop]
    cut = generate_answers(model, tok, PROMPTS[:1], max_new_tokens=8, progress=False)[0]
    assert cut.token_ids == free.token_ids[: free.token_ids.index(stop) + 1]


def test_first16_match_compares_only_the_first_16():
    prompts = (ChatPrompt("x", "x"),)
    a = [Answer("a", list(range(20)))]
    b = [Answer("b", list(range(16)) + [99] * 4)]
    c = [Answer("c", list(range(15)) + [99])]
    assert compare_answers(a, b, prompts)[0].first16_match
    assert not compare_answers(a, c, prompts)[0].first16_match


def test_cli_chat_json(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model(seed=3).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    r = CliRunner().invoke(app, ["chat", str(folder), "--baseline", str(folder), "--max-new-tokens", "4",
                                 "--json", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "chat" and out["model"] == str(folder) and len(out["prompts"]) == len(PROMPTS)
    for p in out["prompts"]:  # the same model: every generated token agrees
        assert p["common_prefix_tokens"] == p["tokens"] == p["baseline_tokens"] and p["first16_match"]
        assert p["answer"] == p["baseline_answer"] and p["checks"]["baseline"] == p["checks"]["model"]
    r = CliRunner().invoke(app, ["chat", str(folder), "--baseline", str(folder), "--max-new-tokens", "0"])
    assert r.exit_code == 2 and "--max-new-tokens" in r.output


@pytest.mark.slow
def test_smollm2_w8_agrees_with_float_on_first_tokens():
    from lowbit.models.load import load_model
    from lowbit.nn import set_kernel
    from lowbit.quantize import quantize
    from lowbit.recipe import Recipe

    model, tok = load_model("smollm2-135m")
    base = generate_answers(model, tok, max_new_tokens=16, progress=False)
    quantize(model, Recipe(scheme="w8"), progress=False)
    set_kernel(model, "cached")  # the dequant kernel's numbers, at float speed
    answers = generate_answers(model, tok, max_new_tokens=16, progress=False)
    results = compare_answers(base, answers)
    agree = [r.common_prefix_tokens >= 8 for r in results]
    assert sum(agree) >= len(PROMPTS) - 2, [(r.id, r.common_prefix_tokens) for r in results]
