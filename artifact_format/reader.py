"""Open and verify an llmir bundle directory (generic: knows files, not model sections).

Every problem raises BundleError with one line naming the bundle and the file at fault.

Verification hashes every file listed in the manifest. With `remember=True` a successful
verification is recorded outside the bundle (llmirc/cache.py's `verified/`, by default
~/.cache/llmirc/verified/) under a key a changed bundle cannot keep: the manifest's sha256
and, for every file, its size, inode, modification and status-change times (st_ctime cannot
be set back by the user: any write or utime updates it). An unchanged bundle then opens
without rehashing; any change, a copy or a move makes it hash again.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from llmirc.cache import cache_dir, store
from llmirc.dtypes import SAFETENSORS_CODES
from llmirc.errors import BundleError
from llmirc.small_files import is_gguf, parse_json

from .safetensors import SafetensorsFile, open_safetensors

FORMAT = "llmir-bundle"
FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # the plan lists every kernel call; still far below this

_SUPPORTED_MAJOR = int(FORMAT_VERSION.split(".")[0])
_SHA256 = re.compile(r"[0-9a-f]{64}")


def rel_path_problem(rel) -> str | None:
    """Why `rel` is not a safe, normalized, relative POSIX path inside a bundle (None if it is)."""
    if not isinstance(rel, str) or not rel:
        return "is empty or not a string"
    if any(c == "\\" or ord(c) < 32 for c in rel):
        return "contains a backslash or control character"
    if rel.startswith("/"):
        return "is absolute"
    parts = rel.split("/")
    if ".." in parts:
        return "escapes the bundle ('..')"
    if any(p in ("", ".") for p in parts):
        return "is not normalized"
    return None


# What `llmirc compile` reads in a checkpoint folder, beside config.json (a bundle keeps its weights under weights/).
_CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _load_manifest(root: Path, name: str) -> dict:
    """manifest.json of `root` as a JSON object (format not checked yet)."""
    path = root / MANIFEST
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"bundle {name}: {MANIFEST} is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"bundle {name}: {MANIFEST} is {st.st_size} bytes, "
                              f"over the limit of {MAX_MANIFEST_BYTES}")
        raw = path.read_bytes()
    except FileNotFoundError:
        if (root / "config.json").is_file() and any((root / f).is_file() for f in _CHECKPOINT_WEIGHTS):
            raise BundleError(f"bundle {name}: a Hugging Face checkpoint, not an llmir bundle: compile it into one "
                              f"first (llmirc compile {name} -o {root.resolve().name}.llmir)") from None
        raise BundleError(f"bundle {name}: no {MANIFEST} (not an llmir bundle, or an unfinished compile)") \
            from None
    except OSError as e:
        raise BundleError(f"bundle {name}: {MANIFEST}: cannot read: {e.strerror or e}") from None
    try:
        manifest = parse_json(raw, strict=True)
    except ValueError as e:
        raise BundleError(f"bundle {name}: {MANIFEST} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {name}: {MANIFEST} is not a JSON object")
    return manifest


def read_manifest(root: Path, name: str) -> dict:
    """manifest.json of `root` as a dict, with format and version checked."""
    manifest = _load_manifest(root, name)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"bundle {name}: {MANIFEST} format is {manifest.get('format')!r}, not {FORMAT!r}")
    version = manifest.get("format_version")
    m = re.fullmatch(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if not m:
        raise BundleError(f"bundle {name}: {MANIFEST} format_version {version!r} is not 'MAJOR.MINOR'")
    if int(m[1]) > _SUPPORTED_MAJOR:
        raise BundleError(f"bundle {name} has format version {version}, newer than this llmirc "
                          f"supports ({_SUPPORTED_MAJOR}.x): upgrade llmirc")
    return manifest


def is_bundle(path) -> bool:
    """True if `path` is a real directory whose manifest names the llmir bundle format (any version)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        return _load_manifest(p, str(path)).get("format") == FORMAT
    except BundleError:
        return False


class Bundle:
    """A bundle whose manifest and listed files were checked. Open with `open_bundle`."""

    def __init__(self, root: Path, name: str, manifest: dict, files: dict[str, dict]):
        self.root = root          # absolute, symlinks resolved
        self.name = name          # the path as the user gave it, for messages
        self.manifest = manifest
        self._files = files       # rel path -> manifest entry

    @property
    def files(self) -> tuple[str, ...]:
        """Paths listed in the manifest, sorted."""
        return tuple(sorted(self._files))

    def file(self, rel: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        if not isinstance(rel, str) or rel not in self._files:  # (a manifest's value: a list is unhashable)
            raise BundleError(f"bundle {self.name}: no file {rel!r:.80} listed in {MANIFEST}")
        return self.root / rel

    def read_json(self, rel: str):
        path = self.file(rel)
        try:
            return parse_json(path.read_bytes())
        except ValueError as e:
            raise BundleError(f"bundle {self.name}: file {rel}: invalid JSON: {_one_line(e)}") from None
        except OSError as e:
            raise BundleError(f"bundle {self.name}: file {rel}: cannot read: {e.strerror or e}") from None

    def open_safetensors(self, rel: str) -> SafetensorsFile:
        """The file as a SafetensorsFile whose errors (also later ones) are BundleErrors. A tensor of a
        dtype llmirc has no type for (F8_E4M3: the safetensors reader knows it, llmirc never writes it)
        is refused here, before the loader or inspect looks its type up."""
        tensors = open_safetensors(self.file(rel), error_cls=BundleError, label=f"bundle {self.name}: file {rel}")
        for name in tensors.names():
            if (dtype := tensors.info(name)[0]) not in SAFETENSORS_CODES:
                tensors.close()
                raise BundleError(f"bundle {self.name}: file {rel}: tensor {name!r} has dtype {dtype}, which llmirc "
                                  "does not read")
        return tensors


def open_bundle(path, verify: bool = True, remember: bool = False) -> Bundle:
    """Check a bundle's manifest, paths and file sizes, and with verify=True every sha256.

    `remember`: skip the hashing when this unchanged bundle was verified before, and record a
    successful verification (see the module docstring)."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise BundleError(f"bundle {name}: no such file or directory")
    if not p.is_dir():
        if is_gguf(p):  # what llama.cpp runs directly
            raise BundleError(f"bundle {name}: a GGUF file, not an llmir bundle directory: compile it into one "
                              f"first (llmirc compile {name} -o {p.stem}.llmir)")
        if p.suffix.lower() == ".onnx":
            raise BundleError(f"bundle {name}: an ONNX model, not an llmir bundle directory: compile it into one "
                              f"first (llmirc compile {name} -o {p.stem}.llmir)")
        raise BundleError(f"bundle {name}: not an llmir bundle directory")
    root = Path(os.path.realpath(p))
    manifest = read_manifest(root, name)
    files = _check_files(root, name, manifest.get("files"))
    if verify:
        key = _state_key(root, files) if remember else None
        if key is None or _recorded(root) != key:
            for rel, entry in files.items():
                if _sha256(root / rel, name, rel) != entry["sha256"]:
                    raise BundleError(f"bundle {name}: file {rel}: sha256 mismatch (tampered or corrupted)")
            if key is not None and _state_key(root, files) == key:  # unchanged while it was hashed
                _record(root, key)
    return Bundle(root, name, manifest, files)


def _state_key(root: Path, files: dict[str, dict]) -> str | None:
    """sha256 over the manifest's bytes and the identity and times of every file (None: unreadable)."""
    h = hashlib.sha256()
    try:
        h.update((root / MANIFEST).read_bytes())
        for rel in [MANIFEST, *sorted(files)]:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_ino}\0{st.st_dev}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    except OSError:
        return None
    return h.hexdigest()


def _record_path(root: Path) -> Path | None:
    folder = cache_dir("verified")
    return folder / hashlib.sha256(os.fsencode(root)).hexdigest() if folder else None


def _recorded(root: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii") if (path := _record_path(root)) else None
    except (OSError, UnicodeDecodeError):
        return None


def _record(root: Path, key: str) -> None:
    if path := _record_path(root):  # (where there is none or it cannot be written: verified every time)
        store(path, key.encode("ascii"))


def _check_files(root: Path, name: str, entries) -> dict[str, dict]:
    if not isinstance(entries, list):
        raise BundleError(f"bundle {name}: {MANIFEST} 'files' must be a list")
    files = {}
    for i, e in enumerate(entries):
        where = f"bundle {name}: {MANIFEST} files[{i}]"
        if not (isinstance(e, dict) and isinstance(e.get("size"), int) and not isinstance(e["size"], bool)
                and e["size"] >= 0 and isinstance(e.get("sha256"), str) and _SHA256.fullmatch(e["sha256"])):
            raise BundleError(f"{where}: needs path, size (integer >= 0) and sha256 (64 lowercase hex digits)")
        rel = e.get("path")
        problem = rel_path_problem(rel)
        if problem:
            raise BundleError(f"{where}: path {rel!r} {problem}")
        if rel == MANIFEST or rel in files:
            raise BundleError(f"{where}: path {rel!r} is {'reserved' if rel == MANIFEST else 'listed twice'}")
        real = os.path.realpath(root / rel)
        if os.path.commonpath([real, str(root)]) != str(root) or real == str(root):
            raise BundleError(f"bundle {name}: file {rel}: resolves outside the bundle (symlink?)")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise BundleError(f"bundle {name}: file {rel}: missing") from None
        except OSError as e:  # there, but not to this user (a folder of mode 0700 unpacked from another's archive)
            raise BundleError(f"bundle {name}: file {rel}: cannot read: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"bundle {name}: file {rel}: not a regular file")
        if st.st_size != e["size"]:
            raise BundleError(f"bundle {name}: file {rel}: size {st.st_size} bytes, manifest says {e['size']}")
        files[rel] = e
    return files


def _sha256(path: Path, name: str, rel: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()  # streams in chunks
    except OSError as e:
        raise BundleError(f"bundle {name}: file {rel}: cannot read: {e.strerror or e}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
