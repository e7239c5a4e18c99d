"""The small files a checkpoint or bundle brings beside its weights: config.json,
generation_config.json, a safetensors index, tokenizer files, chat templates.

They are untrusted input: a FIFO, a device or a huge file is refused by name before anything
is read (a config.json linked to /dev/zero was read until the kernel's OOM killer stopped the
compiler at 23 GB).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

from llmirc.errors import LlmircError

def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, strict: bool = False):
    """The value of the JSON `text` (bytes: UTF-8). Raises ValueError with a one-line reason: json's
    own (its message, line and column), "not UTF-8", or "nested too deeply" where json.loads raises
    RecursionError (a valid text nesting deeper than Python's parser goes, "[[[[...", which would
    otherwise escape every `except ValueError`). strict: duplicate keys and NaN/Infinity are refused
    too (a bundle's manifest, safetensors headers: smuggled or non-portable JSON)."""
    hooks = {"object_pairs_hook": _no_duplicates, "parse_constant": _reject_constant} if strict else {}
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text, **hooks)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


LIMIT = 256 * 2**20  # bytes; the largest of these files in common checkpoints, tokenizer.json, is tens of MB


def present(path: Path) -> bool:
    """Whether `path` is there, as a file or anything else (a FIFO, a device, a dangling link):
    what is there by a file's name is read or refused, not passed over as missing."""
    return path.exists() or path.is_symlink()


def present_small_files(paths, error: type[LlmircError] = LlmircError) -> list[Path]:
    """Those of `paths` that are there (`present`), each checked by `check_small_file`."""
    found = [p for p in paths if present(p)]
    for path in found:
        check_small_file(path, error)
    return found


def check_small_file(path: Path, error: type[LlmircError] = LlmircError) -> None:
    """Raises `error` naming `path` when it is not a regular file (symlinks followed), is larger
    than LIMIT or cannot be looked at (a dangling link: FileNotFoundError's words)."""
    try:
        st = path.stat()
    except OSError as e:
        raise error(f"{path}: cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file")
    if st.st_size > LIMIT:
        raise error(f"{path}: {st.st_size / 2**20:.0f} MiB, larger than such a file may be ({LIMIT >> 20} MiB)")


def read_small_text(path: Path, error: type[LlmircError] = LlmircError) -> str:
    """The UTF-8 text of `path` after `check_small_file`. Raises `error` naming the file, also for
    text that is not UTF-8 and a file that cannot be read."""
    check_small_file(path, error)
    try:
        with open(path, "rb") as f:
            data = f.read(LIMIT + 1)
    except OSError as e:
        raise error(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(data) > LIMIT:
        raise error(f"{path}: larger than such a file may be ({LIMIT >> 20} MiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def is_gguf(path) -> bool:
    """Whether `path` is a regular file named .gguf or beginning with GGUF's magic, as llama.cpp
    reads it whatever its name (Ollama keeps its models as `blobs/sha256-...`). Never opens
    anything but a regular file (a FIFO would block)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
