"""Find a model by name or path, convert GGUF once into a cached Hugging Face folder, load it.

``resolve_model(spec)`` tries, in order:

1. a bundled short name (``smollm2-135m``, ``gemma3-270m``; see ``lowbit.models.bundled``);
   write ``./smollm2-135m`` for a local folder of the same name;
2. an existing local path: a Hugging Face folder (``config.json`` + ``*.safetensors``), a
   ``.gguf`` file, or a folder holding exactly one ``.gguf`` file and no ``config.json``;
3. a hub id ``owner/name``, downloaded with ``huggingface_hub.snapshot_download`` (safetensors,
   config and tokenizer files only); offline, only what the local hub cache already holds.

GGUF weights are dequantized by transformers to float32, which is slow (about 35 s for SmolLM2,
a minute for Gemma 3 on 2 cores), so each GGUF file is converted once into a plain folder
under ``cache_root()`` (``$LOWBIT_CACHE/models``, default ``~/.cache/lowbit/models``):
``<bundled name>`` or ``<file stem>-<hash of path, size, mtime>``. The folder is built under a
temporary name and renamed into place when complete, with a marker file written last, so a
crash leaves nothing that looks finished; temporary folders of processes that died are removed
by the next conversion (``lowbit.outputs.sweep_stale``). The source folder or file is never
modified.

``load_model`` checks what it reads: the safetensors headers (a truncated or garbled file), that
every tensor is stored as floats (a header that relabels a tensor as integers), that the
checkpoint's tensors are exactly the model's (no weight silently left at its random
initialisation), and with ``check_finite`` that no weight holds NaN or Inf.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import ModelLoadError
from lowbit.models.arch import architecture_for
from lowbit.models.bundled import BundledModel, bundled_names, get_bundled
from lowbit.outputs import describe_os_error, signals_deferred, sweep_stale, temp_folder, temp_name

log = logging.getLogger(__name__)

MARKER = "lowbit-conversion.json"
"""Written last into a converted folder; its presence means the conversion finished."""
_CACHE_FORMAT = 1

HUB_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.model", "vocab.*",
    "merges.txt", "*.tiktoken", "chat_template.*",
)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a resolved model lives: a plain Hugging Face safetensors folder."""

    name: str
    folder: Path
    model_type: str
    note: str = ""
    """What a user should know about the weights (e.g. they came from a quantized GGUF file)."""


def cache_root() -> Path:
    base = os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit"
    return Path(base).expanduser() / "models"


# ---------------------------------------------------------------------------------------------
# Resolution


def resolve_model(spec: str | os.PathLike | ModelSource) -> ModelSource:
    """A bundled name, local folder, ``.gguf`` file or hub id -> a plain folder (see module doc)."""
    if isinstance(spec, ModelSource):
        return spec
    text = os.fspath(spec)
    bundled = get_bundled(text)
    if bundled is not None:
        return _resolve_bundled(bundled)
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file; pass a model folder, a .gguf file, "
                "a bundled name or a hub id"
            )
        return _resolve_gguf_file(path)
    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        return _resolve_hub(text)
    raise ModelLoadError(
        f"model {text!r} not found: no such file or folder, and not a bundled model "
        f"(bundled: {', '.join(bundled_names())}) or hub id (owner/name)"
    )


def needs_conversion_or_download(spec: str | os.PathLike) -> bool:
    """Whether ``resolve_model(spec)`` may convert a GGUF file or fetch from the hub (slow);
    otherwise it only reads a config file and can be called to check a request early."""
    text = os.fspath(spec)
    if get_bundled(text) is not None:
        return True
    path = Path(text).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    if path.is_dir():
        return not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(".gguf")


def _resolve_folder(folder: Path, name: str | None = None) -> ModelSource:
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_gguf_file(ggufs[0])
        raise ModelLoadError(
            f"{folder} is not a model folder: no config.json (expected a Hugging Face checkpoint "
            "with config.json and *.safetensors, or a single .gguf file)"
        )
    if not any(folder.glob("*.safetensors")):
        bins = any(folder.glob("pytorch_model*.bin"))
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights"
            + ("; it has PyTorch .bin weights: re-save it with save_pretrained()" if bins else "")
        )
    model_type = _read_model_type(folder / "config.json")
    architecture_for(model_type)  # raises UnsupportedArchitectureError with the supported list
    return ModelSource(name or folder.name, folder.resolve(), model_type)


def _read_model_type(config_file: Path) -> str:
    try:
        config = json.loads(config_file.read_text())
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"cannot read {config_file}: {_first_line(err)}") from err
    if not model_type:
        raise ModelLoadError(f"{config_file} has no model_type; is it a transformers config?")
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method:
        raise ModelLoadError(
            f"{config_file.parent} is already quantized ({method}); lowbit quantizes float "
            "checkpoints: point it at the original model"
            + (" (load this one with lowbit.io.load or `lowbit eval`)" if method == "lowbit" else "")
        )
    return model_type


def _resolve_bundled(model: BundledModel) -> ModelSource:
    model.check_installed()
    folder = _cached_conversion(cache_root() / model.name, model.fingerprint(), model.gguf)
    return ModelSource(model.name, folder, _read_model_type(folder / "config.json"), model.note)


def _resolve_gguf_file(path: Path) -> ModelSource:
    path = path.resolve()
    stat = path.stat()
    fingerprint = {"gguf": str(path), "size": str(stat.st_size), "mtime_ns": str(stat.st_mtime_ns)}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    folder = _cached_conversion(cache_root() / f"{path.stem}-{key}", fingerprint, lambda _: path)
    note = (
        f"weights dequantized from the GGUF file {path.name}: they lie on its quantization grid, "
        "so re-quantizing to that grid is nearly free"
    )
    return ModelSource(path.stem, folder, _read_model_type(folder / "config.json"), note)


def _resolve_hub(repo_id: str) -> ModelSource:
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS))
    except Exception as err:  # offline, unreachable, unknown repo, gated: all mean "cannot fetch"
        offline = "the hub is offline (HF_HUB_OFFLINE=1) and the local hub cache lacks it" if (
            constants.HF_HUB_OFFLINE
        ) else f"{type(err).__name__}: {_first_line(err)}"
        raise ModelLoadError(
            f"{repo_id!r} is not a local path or bundled model ({', '.join(bundled_names())}), "
            f"and fetching it from the Hugging Face hub failed: {offline}"
        ) from err
    return _resolve_folder(Path(folder), name=repo_id)


# ---------------------------------------------------------------------------------------------
# GGUF conversion and the cache


def _cached_conversion(
    folder: Path, fingerprint: dict[str, str], gguf: Callable[[Path], Path]
) -> Path:
    """``folder`` holding the conversion of the GGUF file that ``gguf(scratch)`` returns.

    Reused when its marker records the same ``fingerprint``; otherwise built in a temporary
    sibling folder and renamed into place (replacing a stale conversion).
    """
    marker = folder / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("source") == fingerprint:
                return folder
        except ValueError:
            pass
        log.info("cached conversion %s is stale; converting again", folder)
    elif folder.exists():
        raise ModelLoadError(
            f"{folder} exists but is not a finished lowbit conversion; delete it and retry"
        )
    work = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(folder.parent)
        work = temp_folder(folder.parent, folder.name)
        out = work / "model"
        gguf_path = gguf(_mkdir(work / "scratch"))
        log.info("converting %s to a float32 Hugging Face folder (once)", gguf_path)
        convert_gguf(gguf_path, out)
        _write_marker(out, fingerprint)
        _publish(out, folder)
    except OSError as err:
        raise ModelLoadError(
            f"cannot build the converted model {folder}: {describe_os_error(err, folder.parent)}; "
            "set LOWBIT_CACHE to a writable folder with space"
        ) from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return folder


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as a plain float32 folder:
    safetensors, config.json (without the GGUF quantization_config), generation config and
    tokenizer files. The file's structure is checked first (``check_gguf``), and the result
    must fill every parameter of the model (a renamed tensor would leave one random)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)
    where, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name, local_files_only=True)
    except Exception as err:  # gguf-py and transformers raise many kinds for a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {_first_line(err)}") from None
    architecture_for(config.model_type)  # before the slow part
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
    except Exception as err:  # as above: a header that parses may still describe nonsense
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {_first_line(err)}") from None
    _check_loading_info(info, gguf_path)
    # The weights are now dense float32: drop the GGUF quantizer so the folder saves and
    # reloads as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_GGUF_KEYS = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv")
"""Header fields every GGUF causal LM of a supported architecture has (``ARCH.`` + key)."""


def check_gguf(path: Path) -> None:
    """Check a GGUF file's structure before its weights are read: it parses (gguf-py), its
    tensors follow each other in the data section as GGUF writers place them (so no header
    offset, shape or type was changed to point at other bytes), lie inside the file, hold
    floats or a quantized format (not integers), and not both F16 and BF16. ModelLoadError."""
    from gguf import GGMLQuantizationType as T, GGUFReader

    try:
        reader = GGUFReader(path)
        tensors = sorted(reader.tensors, key=lambda t: t.data_offset)
        align, position = int(reader.alignment), int(reader.data_offset)
        arch = reader.fields["general.architecture"].contents()
    except Exception as err:  # gguf-py raises many kinds (ValueError, IndexError, KeyError...)
        raise ModelLoadError(
            f"cannot read GGUF file {path}: {_first_line(err)}; it is truncated or corrupt"
        ) from None
    # transformers silently skips un-permuting q/k (or guesses sizes) without these.
    missing = [k for k in _GGUF_KEYS if f"{arch}.{k}" not in reader.fields]
    if missing:
        raise ModelLoadError(f"{path} lacks {', '.join(f'{arch}.{k}' for k in missing)}; it is "
                             "corrupt or not a complete model")
    size = path.stat().st_size
    integer = {T.I8, T.I16, T.I32, T.I64}
    types = {}
    for t in tensors:
        if t.tensor_type in integer:
            raise ModelLoadError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, not as "
                                 "floats or a quantized format; its header is wrong or the file is corrupt")
        if int(t.data_offset) != position:
            raise ModelLoadError(f"{path} is corrupt: tensor {t.name} starts at byte {int(t.data_offset)}, "
                                 f"where {position} was expected (a header field was changed)")
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise ModelLoadError(f"{path} is truncated: tensor {t.name} ends at byte {end}, the file has {size}")
        position = -(-end // align) * align
        types.setdefault(t.tensor_type, t.name)
    if tensors and size - end >= align:
        raise ModelLoadError(f"{path} is corrupt: {size - end} bytes follow its last tensor")
    if T.F16 in types and T.BF16 in types:
        raise ModelLoadError(f"{path}: tensors are stored both as F16 ({types[T.F16]}) and BF16 "
                             f"({types[T.BF16]}); a header relabels a dtype or the file is corrupt")


def _check_loading_info(info: dict, where) -> None:
    """Refuse a checkpoint whose tensors are not exactly the model's parameters."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            raise ModelLoadError(
                f"{where}: the checkpoint does not fit its config ({kind.replace('_', ' ')}: "
                f"{', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}); it is corrupt or incomplete"
            )


def _write_marker(out: Path, fingerprint: dict[str, str]) -> None:
    import transformers

    import lowbit

    record = {
        "format": _CACHE_FORMAT, "source": fingerprint,
        "lowbit": lowbit.__version__, "transformers": transformers.__version__,
    }
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _publish(built: Path, folder: Path) -> None:
    """Rename ``built`` to ``folder``; a stale ``folder`` is moved aside first and deleted."""
    stale = None
    try:
        with signals_deferred():
            if folder.exists():
                stale = temp_name(folder.parent, folder.name, "old")
                os.replace(folder, stale)
            try:
                os.replace(built, folder)
            except OSError:
                # Another process published the same conversion first: keep theirs.
                if not (folder / MARKER).is_file():
                    raise
    finally:  # also when a held-back signal is delivered at the end of the block
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(spec: str | os.PathLike | ModelSource):
    """The transformers config of a model (see ``resolve_model`` for ``spec``)."""
    from transformers import AutoConfig

    source = resolve_model(spec)
    return _guarded(
        source, lambda: AutoConfig.from_pretrained(source.folder, local_files_only=True)
    )


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    return any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(spec: str | os.PathLike | ModelSource):
    """The tokenizer saved with a model (see ``resolve_model`` for ``spec``)."""
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    if not has_tokenizer(source.folder):
        raise ModelLoadError(
            f"{source.folder} has no tokenizer files; save one there with "
            "tokenizer.save_pretrained(folder)"
        )
    return _guarded(
        source, lambda: AutoTokenizer.from_pretrained(source.folder, local_files_only=True)
    )


def load_model(
    spec: str | os.PathLike | ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    check_finite: bool = False,
):
    """``(model, tokenizer)`` for ``spec`` (see ``resolve_model``); the model in eval mode.

    check_finite: refuse weights holding NaN or Inf (NonFiniteError naming the tensor)."""
    from transformers import AutoModelForCausalLM

    from lowbit.pipeline.lazy import check_finite as refuse_nonfinite

    source = resolve_model(spec)
    if source.note:
        log.info("%s: %s", source.name, source.note)
    tokenizer = load_tokenizer(source)  # cheap; fail on a missing tokenizer before the weights
    check_float_checkpoint(source.folder)
    model, info = _guarded(
        source,
        lambda: AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=dtype, local_files_only=True, output_loading_info=True
        ),
    )
    _check_loading_info(info, source.folder)
    if check_finite:
        for name, t in model.state_dict().items():
            refuse_nonfinite(t, name, source.folder)
    return model.to(device).eval(), tokenizer


def check_float_checkpoint(folder: Path) -> None:
    """Check the safetensors files of a float checkpoint without reading its weights (see
    ``lowbit.pipeline.lazy.check_float_tensors``). Raises ModelLoadError."""
    from lowbit.pipeline.lazy import Checkpoint, check_float_tensors

    check_float_tensors(Checkpoint(folder))


def _guarded(source: ModelSource, load: Callable):
    """Run a transformers loader; turn its errors into one-line ModelLoadErrors."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(
            f"cannot load {source.name} from {source.folder}: {_first_line(err)}"
        ) from err


def source_gguf(spec: str | os.PathLike, scratch: Path) -> Path | None:
    """The GGUF file a model spec comes from (a bundled model, a .gguf file, or a folder holding
    one and no config.json), put on disk under ``scratch`` when it must be assembled; None for a
    Hugging Face folder or hub id."""
    text = os.fspath(spec)
    bundled = get_bundled(text)
    if bundled is not None:
        return bundled.gguf(scratch)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None
