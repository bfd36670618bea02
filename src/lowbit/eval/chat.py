"""Chat and code checks: the float and the quantized model answer the same prompts, side by side.

Each prompt of ``PROMPTS`` goes through the tokenizer's chat template when it has one (plain text
otherwise) and is answered by greedy decoding (``do_sample=False``), one prompt at a time, so the
answers are deterministic and free of padding effects. Agreement of two answers a, b (generated
token ids, end-of-sequence token included when one was produced):

- ``common_prefix_tokens``: the largest n with a[:n] == b[:n];
- ``first16_match``: a[:16] == b[:16] (two identical answers shorter than 16 tokens match).

Each answer is checked on its own by what its prompt asks for (``check_answer``): the expected
word of a factual question, an answer in Chinese, exactly three bullet points, a JSON object with
given keys, and for coding requests, whether the extracted code runs and passes its asserts in
``run_sandboxed``. A tiny model's code failing is a measurement, not an error.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit import defaults

CHAT_FORMAT_VERSION = 1
"""Changes when a prompt, a check or the decoding changes (results of two versions differ)."""


@dataclass(frozen=True)
class CodeTask:
    """A coding request's check: the function the answer must define and asserts it must pass."""

    function: str
    test: str


@dataclass(frozen=True)
class ChatPrompt:
    """One prompt and what its answer is checked for (each check is optional)."""

    id: str
    text: str
    expect: str | None = None
    """A word a correct answer contains (factual questions), compared case-insensitively."""
    chinese: bool = False
    """The answer should be mostly Chinese."""
    bullets: int | None = None
    """The answer should be exactly this many bullet points and nothing else."""
    json_keys: tuple[str, ...] | None = None
    """The answer should be one JSON object with exactly these keys."""
    code: CodeTask | None = None


PROMPTS: tuple[ChatPrompt, ...] = (
    ChatPrompt("en_fact", "What is the capital of France?", expect="Paris"),
    ChatPrompt("zh_fact", "中国的首都是哪座城市？", expect="北京", chinese=True),
    ChatPrompt("en_explain", "Explain in two sentences why the sky is blue."),
    ChatPrompt("zh_explain", "请用中文简单介绍一下长城。", chinese=True),
    ChatPrompt("format_bullets", "Name three fruits. Answer with exactly three bullet points and nothing else.",
               bullets=3),
    ChatPrompt("format_json", 'Describe a fictional person. Reply only with a JSON object with exactly the keys '
                              '"name" and "age".', json_keys=("name", "age")),
    ChatPrompt("code_add", "Write a Python function add(a, b) that returns the sum of a and b.",
               code=CodeTask("add", "assert add(2, 3) == 5\nassert add(-4, 4) == 0\nassert add(0.5, 0.25) == 0.75\n")),
    ChatPrompt("code_palindrome", "Write a Python function is_palindrome(s) that returns True if the string s "
                                  "reads the same forwards and backwards, ignoring case, and False otherwise.",
               code=CodeTask("is_palindrome", "assert is_palindrome('Level') is True\n"
                                              "assert is_palindrome('abc') is False\n"
                                              "assert is_palindrome('') is True\n")),
)


@dataclass
class Answer:
    text: str
    token_ids: list[int]


@dataclass
class ChatResult:
    id: str
    prompt: str
    baseline_answer: str
    answer: str
    common_prefix_tokens: int
    first16_match: bool
    baseline_tokens: int
    tokens: int
    checks: dict = field(default_factory=dict)
    """``{"baseline": {...}, "model": {...}}``: ``check_answer`` of each answer."""

    def to_dict(self) -> dict:
        return asdict(self)


# -- generation -----------------------------------------------------------------------------------


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """``(1, n)`` token ids of one user turn: through the chat template (with the assistant's
    generation prompt) when the tokenizer has one, else the plain text with its special tokens."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(text).input_ids
    return torch.tensor([ids], dtype=torch.long)


def greedy_generate(model, ids: torch.Tensor, max_new_tokens: int, *, eos_token_id=None,
                    min_new_tokens: int = 0) -> torch.Tensor:
    """Greedy continuation of ``ids`` (batch, n): the new tokens only, ``(batch, <= max_new_tokens)``.

    A fresh ``GenerationConfig`` is used, so a model's sampling defaults (temperature, top-p)
    play no part. Stops at ``eos_token_id`` (default: the model's) once ``min_new_tokens`` exist."""
    from transformers import GenerationConfig

    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos_token_id, list) and not eos_token_id:
        eos_token_id = None
    pad = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              eos_token_id=eos_token_id, pad_token_id=pad)
    device = next(model.parameters()).device
    ids = ids.to(device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.shape[1]:].cpu()


def generate_answers(model, tokenizer, prompts=PROMPTS, *, max_new_tokens: int = defaults.CHAT_MAX_NEW_TOKENS,
                     progress: bool = True) -> list[Answer]:
    """Each prompt's greedy answer (one prompt at a time), cut after its first end token: the
    tokenizer's end-of-sequence token or one of the model's generation config (Gemma's
    ``<end_of_turn>``)."""
    from tqdm.auto import tqdm

    stops = end_tokens(model, tokenizer)
    answers = []
    for prompt in tqdm(prompts, desc="chat prompts", disable=not progress, leave=False):
        new = greedy_generate(model, prompt_ids(tokenizer, prompt.text), max_new_tokens,
                              eos_token_id=stops)[0].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), None)
        if end is not None:
            new = new[: end + 1]
        answers.append(Answer(tokenizer.decode(new, skip_special_tokens=True).strip(), new))
    return answers


def end_tokens(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's end-of-sequence token, then the model's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(t for t in [tokenizer.eos_token_id, *configured] if t is not None))


def common_prefix(a: list[int], b: list[int]) -> int:
    """The largest n with a[:n] == b[:n]."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_answers(baseline: list[Answer], answers: list[Answer], prompts=PROMPTS, *,
                    timeout: float = defaults.CHAT_CODE_TIMEOUT) -> list[ChatResult]:
    """Side-by-side results of the baseline's and the model's answers to ``prompts``."""
    results = []
    for prompt, a, b in zip(prompts, baseline, answers, strict=True):
        results.append(ChatResult(
            id=prompt.id, prompt=prompt.text, baseline_answer=a.text, answer=b.text,
            common_prefix_tokens=common_prefix(a.token_ids, b.token_ids),
            first16_match=a.token_ids[:16] == b.token_ids[:16],
            baseline_tokens=len(a.token_ids), tokens=len(b.token_ids),
            checks={"baseline": check_answer(prompt, a.text, timeout=timeout),
                    "model": check_answer(prompt, b.text, timeout=timeout)},
        ))
    return results


# -- checks ---------------------------------------------------------------------------------------


def check_answer(prompt: ChatPrompt, answer: str, *, timeout: float = defaults.CHAT_CODE_TIMEOUT) -> dict[str, bool]:
    """What ``prompt`` asks of an answer, each as a bool: ``mentions_answer``, ``in_chinese``,
    ``format_followed``, ``code_found`` / ``code_runs`` / ``code_passes``."""
    checks = {}
    if prompt.expect is not None:
        checks["mentions_answer"] = prompt.expect.lower() in answer.lower()
    if prompt.chinese:
        checks["in_chinese"] = mostly_chinese(answer)
    if prompt.bullets is not None:
        checks["format_followed"] = bullet_count(answer) == prompt.bullets
    if prompt.json_keys is not None:
        checks["format_followed"] = json_object_keys(answer) == set(prompt.json_keys)
    if prompt.code is not None:
        code = extract_code(answer, prompt.code.function)
        result = None if code is None else run_sandboxed(code, prompt.code.test, timeout=timeout)
        checks["code_found"] = code is not None
        checks["code_runs"] = result is not None and result.runs
        checks["code_passes"] = result is not None and result.passes
    return checks


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def mostly_chinese(text: str) -> bool:
    """More CJK ideographs than Latin letters, and at least one."""
    cjk = len(_CJK.findall(text))
    return cjk > 0 and cjk > len(_LATIN.findall(text))


_BULLET = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+\S")


def bullet_count(text: str) -> int | None:
    """The number of bullet points (``-``, ``*``, ``+``, ``•`` or ``1.`` / ``1)`` lines), or None
    when a non-empty line is not a bullet point (the answer says something else as well)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not all(_BULLET.match(line) for line in lines):
        return None
    return len(lines)


def json_object_keys(text: str) -> set[str] | None:
    """The keys of the JSON object the whole answer is (optionally in one fenced block), else None."""
    body = text.strip()
    fenced = re.fullmatch(r"```[\w-]*\s*\n(.*?)\n?\s*```", body, re.S)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return set(value) if isinstance(value, dict) else None


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_IMPORT = re.compile(r"^(?:import\s+\w|from\s+\w[\w.]*\s+import\s)")


def extract_code(answer: str, function: str) -> str | None:
    """The code in ``answer`` that defines ``function``, or None.

    First a fenced block (```python ... ```, an unclosed one running to the end) whose text has
    ``def function(``, python-tagged blocks first; else, in unfenced text, the ``def function(``
    line and the lines after it that are blank or indented deeper, after the answer's import lines.
    """
    definition = re.compile(rf"^[ \t]*def\s+{re.escape(function)}\s*\(", re.M)
    blocks = _FENCE.findall(answer)
    tagged = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    for body in tagged + [body for lang, body in blocks if lang.lower() not in ("python", "py", "python3")]:
        if definition.search(body):
            return textwrap.dedent(body).strip() + "\n"
    lines = answer.splitlines()
    start = next((i for i, line in enumerate(lines) if definition.match(line)), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    imports = [line.strip() for line in lines[:start] if _IMPORT.match(line.strip())]
    body = textwrap.dedent("\n".join(lines[start:end]))
    return "\n".join(imports + [body]).strip() + "\n"


# -- sandbox --------------------------------------------------------------------------------------


@dataclass
class SandboxResult:
    runs: bool
    """The code was executed to its end without an error."""
    passes: bool
    """... and the test's asserts passed."""
    timed_out: bool
    returncode: int | None
    message: str
    """The last line of the process's error output (the exception), empty when it passed."""


# Exit statuses of the driver: 0 passed, 1 an assert of the test failed, 3 the code raised,
# 4 the test raised something else (e.g. the function is missing).
_DRIVER = r'''
import os, resource, sys, traceback

for name, value in (("RLIMIT_CPU", {cpu_seconds}), ("RLIMIT_AS", {memory_bytes}),
                    ("RLIMIT_FSIZE", {file_bytes}), ("RLIMIT_NOFILE", 64), ("RLIMIT_NPROC", 0),
                    ("RLIMIT_CORE", 0)):
    if hasattr(resource, name):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass

ROOT = os.path.realpath(os.getcwd())
READABLE = (ROOT,) + tuple({{os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                          sys.base_exec_prefix)}})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = frozenset(("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link",
                     "os.symlink", "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree",
                     "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move", "shutil.chown",
                     "shutil.make_archive", "shutil.unpack_archive"))
LISTS = frozenset(("os.listdir", "os.scandir", "os.listxattr", "glob.glob"))
DENIED = ("subprocess.", "socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.system",
          "os.kill", "os.chdir", "os.chroot", "pty.", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.")
DENIED_IMPORTS = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket"))


def inside(path, roots):
    if path is None or isinstance(path, int):
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def paths(args):
    return [a for a in args if isinstance(a, (str, bytes, os.PathLike))]


def guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = bool((flags or 0) & WRITE_FLAGS) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if not inside(path, (ROOT,) if writing else READABLE):
            raise PermissionError(f"sandbox: {{'writing' if writing else 'reading'}} {{path!r}} is not allowed")
    elif event in CHANGES or event in LISTS:
        roots = (ROOT,) if event in CHANGES else READABLE
        for path in paths(args):
            if not inside(path, roots):
                raise PermissionError(f"sandbox: {{event}} on {{path!r}} is not allowed")
    elif event == "import" and args[0] in DENIED_IMPORTS:
        raise PermissionError(f"sandbox: importing {{args[0]}} is not allowed")
    elif event.startswith(DENIED):
        raise PermissionError(f"sandbox: {{event}} is not allowed")


sys.addaudithook(guard)
namespace = {{"__name__": "answer"}}
try:
    with open("answer.py", encoding="utf-8") as f:
        exec(compile(f.read(), "answer.py", "exec"), namespace)
except BaseException:
    traceback.print_exc()
    sys.exit(3)
try:
    exec(compile({test!r}, "test.py", "exec"), namespace)
except AssertionError:
    traceback.print_exc()
    sys.exit(1)
except BaseException:
    traceback.print_exc()
    sys.exit(4)
'''

_NOBODY = 65534


def run_sandboxed(code: str, test: str, *, timeout: float = defaults.CHAT_CODE_TIMEOUT, memory_bytes: int = 1 << 30,
                  file_bytes: int = 1 << 20) -> SandboxResult:
    """Run ``code`` (as module ``answer``), then ``test`` (asserts) in its namespace, in a
    sandboxed subprocess; whether the code ran and whether the test passed.

    The process: ``python -I -S`` (no user site, no site-packages, no PYTHON* variables), an
    empty temporary folder as its working directory, an environment of PATH, LANG and HOME only,
    stdin empty, killed after ``timeout`` seconds. Inside, before the code runs: resource limits
    (CPU seconds, ``memory_bytes`` of address space, ``file_bytes`` per file written, 64 open
    files, no new processes, no core file) and an audit hook (``sys.addaudithook``, which cannot
    be removed) that refuses writing, deleting or renaming outside the working folder, reading
    outside it and Python's own library, starting processes, sockets and ctypes. Run by root, the
    process also drops to user and group ``nobody`` where that user can run this interpreter.

    This guards against a model's careless code (a file written in the wrong place, an endless
    loop, a fork), not against code written to escape: that needs an OS sandbox (a container, a
    seccomp filter, a user namespace).
    """
    drop = hasattr(os, "geteuid") and os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="lowbit-sandbox-") as outer:
        work = Path(outer) / "work"
        work.mkdir()
        (work / "answer.py").write_text(code, encoding="utf-8")
        if drop:
            os.chmod(outer, 0o711)
            os.chown(work, _NOBODY, _NOBODY)
            os.chown(work / "answer.py", _NOBODY, _NOBODY)
        driver = _DRIVER.format(cpu_seconds=math.ceil(timeout) + 1, memory_bytes=memory_bytes,
                                file_bytes=file_bytes, test=test)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work)}
        owner = {"user": _NOBODY, "group": _NOBODY, "extra_groups": []}
        with open(Path(outer) / "stdout", "wb") as out, open(Path(outer) / "stderr", "wb+") as err:
            run = functools.partial(subprocess.run, [sys.executable, "-I", "-S", "-c", driver], cwd=work,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout)
            try:
                try:
                    proc = run(**owner) if drop else run()
                except PermissionError:  # nobody cannot reach this interpreter (e.g. under /root)
                    proc = run()
            except subprocess.TimeoutExpired:
                return SandboxResult(False, False, True, None, f"timed out after {timeout:g} s")
            err.seek(max(0, err.tell() - (1 << 16)))  # the end: the exception's line
            lines = err.read().decode("utf-8", "replace").strip().splitlines()
    code_ran = proc.returncode in (0, 1, 4)
    return SandboxResult(code_ran, proc.returncode == 0, False, proc.returncode,
                         "" if proc.returncode == 0 or not lines else lines[-1])
