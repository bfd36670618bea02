"""Where lowbit may write, and how it leaves no partial output behind.

Rules (README, "Safety"):

- The model being read is never written: an output equal to, inside or containing a source
  (or lowbit's model cache) is refused.
- An existing output is replaced only with ``overwrite`` and only when it is an empty folder or
  a folder lowbit wrote (its config.json says ``quant_method: lowbit``) holding nothing but the
  files lowbit writes; anything else is refused with the reason, before any work starts.
- Every folder is built under a temporary name beside its target and renamed into place when
  complete. Temporary names carry a host tag and the owning process id
  (``.NAME.tmp-HOST-PID-XXXXXXXX``), so a later run removes those of processes that died
  without cleaning up (``sweep_stale``); those of live processes are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from lowbit.errors import OutputError

log = logging.getLogger(__name__)

LOWBIT_FILES = (
    "config.json", "generation_config.json", "lowbit_report.json", "*.safetensors",
    "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*", "lowbit_export.json",
)
"""Names of the files lowbit writes into an output folder (``lowbit.io.save``, ``lowbit.export``)."""

EXPORT_MARKER = "lowbit_export.json"
"""Written into every folder ``lowbit export`` makes (its report): the folder is lowbit's."""

GGUF_MARKER_KEY = "lowbit.export"
"""A key every GGUF file lowbit writes carries in its header: the file is lowbit's."""

PARTIAL_MARKER = ".lowbit-partial"
"""Written first into every temporary folder: it marks the folder as lowbit's, unfinished."""

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[a-z0-9_]{8}$")


# ---------------------------------------------------------------------------------------------
# Checks before any work


def is_lowbit_output(folder: Path) -> bool:
    """Whether ``folder``'s config.json says lowbit wrote it, or it holds lowbit's export report."""
    try:
        json.loads((folder / EXPORT_MARKER).read_text())
        return True
    except (OSError, ValueError):
        pass
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "lowbit"


def is_lowbit_file(path: Path) -> bool:
    """Whether ``path`` is a GGUF file lowbit wrote (its header carries ``GGUF_MARKER_KEY``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
    except OSError:
        return False
    return head[:4] == b"GGUF" and GGUF_MARKER_KEY.encode() in head


def check_output(out: str | os.PathLike, *, overwrite: bool = False,
                 sources: Iterable[str | os.PathLike] = (), need_bytes: int = 0,
                 kind: str = "folder") -> Path:
    """The absolute output path, after checking that writing it can destroy nothing and can
    succeed; raises OutputError naming the reason otherwise (see the module docstring).

    sources: paths being read (a model folder or file, the cache folder of its conversion).
    need_bytes: a lower bound on the size of the output, checked against the free space.
    kind: "folder", or "file" for a single-file output (a GGUF file), which ``overwrite``
    replaces only when lowbit wrote it.
    """
    out = Path(out).expanduser().absolute()
    real = out.resolve()
    for source in sources:
        src = Path(source).expanduser().resolve()
        if real == src:
            raise OutputError(f"output {out} is the model being read; choose another --out")
        if src in real.parents:
            raise OutputError(f"output {out} lies inside {src}, which is being read; choose another --out")
        if real in src.parents:
            raise OutputError(f"output {out} contains {src}, which is being read; choose another --out")
    if out.is_symlink() or out.exists():
        if kind == "file":
            _check_file_replaceable(out, overwrite)
        else:
            _check_replaceable(out, overwrite)
    _check_writable(out, need_bytes)
    return out


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not overwrite:
        raise OutputError(f"output {out} already exists; choose another path or pass --overwrite "
                          "(which replaces only a folder lowbit wrote)")
    if out.is_symlink():
        raise OutputError(f"output {out} is a symbolic link; --overwrite replaces only a folder "
                          "lowbit wrote: choose another --out")
    if not out.is_dir():
        raise OutputError(f"output {out} is a file, not a folder lowbit wrote; --overwrite does "
                          "not replace it: choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not is_lowbit_output(out):
        raise OutputError(
            f"output {out} is not a lowbit output (its config.json has no lowbit "
            "quantization_config), so --overwrite will not delete it: choose another --out")
    foreign = [n for n in entries if n != PARTIAL_MARKER and ((out / n).is_dir() or (out / n).is_symlink()
               or not any(fnmatch.fnmatch(n, p) for p in LOWBIT_FILES))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"output {out} holds entries lowbit did not write ({shown}); --overwrite "
                          "would delete them: move them or choose another --out")


def _check_file_replaceable(out: Path, overwrite: bool) -> None:
    if not overwrite:
        raise OutputError(f"output {out} already exists; choose another path or pass --overwrite "
                          "(which replaces only a file lowbit wrote)")
    if out.is_symlink() or not out.is_file() or not is_lowbit_file(out):
        raise OutputError(f"output {out} is not a GGUF file lowbit wrote, so --overwrite will not "
                          "replace it: choose another --out")


def _check_writable(out: Path, need_bytes: int) -> None:
    """The nearest existing ancestor of ``out`` must be a folder where a folder can be made."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create output {out}: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lowbit-probe-", dir=ancestor))
    except OSError as err:
        raise OutputError(f"cannot write output {out}: {describe_os_error(err, ancestor)}") from None
    if need_bytes:
        free = shutil.disk_usage(ancestor).free
        if free < need_bytes:
            raise OutputError(f"cannot write output {out}: it needs at least {need_bytes / 1e6:.1f} MB "
                              f"and {ancestor} has {free / 1e6:.1f} MB free; free space or choose another --out")


def describe_os_error(err: OSError, where: str | os.PathLike | None = None) -> str:
    """One line for a file-system error, with the fix for the common ones."""
    text = str(err).strip()
    reason = err.strerror or (text.splitlines()[0] if text else type(err).__name__)
    if err.errno == errno.ENOSPC:
        return f"{reason} (free space or choose another location)"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{err.filename or where}: {reason} (choose a writable location)"
    return f"{err.filename}: {reason}" if err.filename else reason


# ---------------------------------------------------------------------------------------------
# Temporary folders


def temp_folder(parent: Path, name: str, kind: str = "tmp", marked: bool = True) -> Path:
    """A new folder ``parent/.NAME.KIND-HOST-PID-XXXXXXXX``, holding the partial marker."""
    folder = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{_HOST}-{os.getpid()}-", dir=parent))
    if marked:
        (folder / PARTIAL_MARKER).touch()
    return folder


def temp_name(parent: Path, name: str, kind: str = "old") -> Path:
    """A free path with a temporary name, for renaming a folder aside."""
    folder = temp_folder(parent, name, kind, marked=False)
    os.rmdir(folder)
    return folder


def sweep_stale(parent: Path) -> list[Path]:
    """Remove lowbit temporary folders in ``parent`` whose process has died; returns them."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        if entry.is_symlink() or not entry.is_dir() or not _looks_like_ours(entry):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            log.info("removed %s, left by an interrupted lowbit run (process %s)", entry, m["pid"])
            removed.append(entry)
    return removed


def _looks_like_ours(folder: Path) -> bool:
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    return (not names or PARTIAL_MARKER in names or "lowbit-conversion.json" in names
            or is_lowbit_output(folder))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM (in the main thread) while a short sequence of renames must
    not be cut in two; a signal that arrived is delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in pending[:1]:
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is renamed aside first and deleted after.
    Signals wait until both renames are done, so an interrupt never leaves ``out`` missing."""
    old = None
    try:
        with signals_deferred():
            if out.exists():
                old = temp_name(out.parent, out.name, "old")
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                if old is not None:
                    os.replace(old, out)
                raise
    finally:  # also when a held-back signal is delivered at the end of the block
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def fsync_files(folder: Path) -> None:
    """Flush every file directly in ``folder`` to disk (before the final rename)."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
