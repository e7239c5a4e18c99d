"""Atomic bundle writer: build in a temporary sibling directory, then rename into place.

    with BundleWriter("out.llmir") as b:
        b.write_text("ir/input.mlir", text)
        with b.safetensors("weights/model.safetensors", tensors=[...]) as w:
            w.write(name, array)
        b.commit(manifest)

manifest.json is written last, so an interrupted build's `<out>.tmp-<host>-<pid>-<random>`
directory has none and is never taken for a bundle. If the block raises (KeyboardInterrupt
included, and SIGTERM, which the CLI raises as an exception) or commit fails, the temporary
directory is removed and out_path is as it was; one left by a killed process (kill -9, power
loss) is removed by the next writer to the same path once its owner (that pid on this host) is
gone (`remove_stale_temporaries`).
Errors the user can cause (unsafe path, disk full, out_path not replaceable) are
BundleErrors; misuse by the calling code is ValueError/RuntimeError.
"""

from __future__ import annotations

import datetime
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path

from llmirc.errors import BundleError, UsageError

from .reader import FORMAT, FORMAT_VERSION, MANIFEST, is_bundle, rel_path_problem
from .safetensors import SafetensorsWriter, reraise_os_error


def created_utc() -> str:
    """A bundle's creation time (ISO 8601, UTC, seconds): SOURCE_DATE_EPOCH (whole seconds since
    1970, the reproducible-builds convention) when set, so that compiling a checkpoint again gives
    the same bytes; else now. Raises UsageError for a SOURCE_DATE_EPOCH that is not such a number."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        if not epoch.isascii() or not epoch.isdigit():
            raise ValueError
        return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r}: not a time (whole seconds since 1970)") from None


def check_replaceable(out: Path) -> None:
    """BundleError unless `out` is absent, an empty directory or an llmir bundle (which a new
    bundle may replace), and a directory can be made beside it (tried in its nearest existing
    ancestor, and removed)."""
    out = Path(out)
    if out.name in ("", "..") or os.path.ismount(out):  # ".", "/": no folder to write beside and move in place
        why = "a mount point" if os.path.ismount(out) else "not a name"
        raise BundleError(f"refusing to write a bundle as {out}: it is {why}; the bundle is written beside its path "
                          "and moved in place (give a new folder's name, as OUT.llmir)")
    if out.is_symlink():  # the link itself would be replaced, not what it points to
        raise BundleError(f"refusing to overwrite {out}: it is a symbolic link (give the path it points to)")
    if os.path.lexists(out) and not (out.is_dir() and (is_bundle(out) or not any(out.iterdir()))):
        raise BundleError(f"refusing to overwrite {out}: it exists and is not an llmir bundle")
    folder = next(p for p in out.absolute().parents if os.path.lexists(p))
    if not folder.is_dir():  # else mkdir fails with a bare "File exists"
        raise BundleError(f"bundle {out}: cannot create it there: {folder} is not a directory")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    sibling = f"{out.name}.tmp-{host_tag()}-{os.getpid()}-{secrets.token_hex(6)}"  # (.old- names as long)
    if len(os.fsencode(sibling)) > name_max:
        raise BundleError(f"bundle {out}: the name is too long: the compile writes {sibling[len(out.name):]!r} "
                          f"beside it, and names here are at most {name_max} bytes")
    probe = folder / f".llmirc-probe-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise BundleError(f"bundle {out}: cannot write in {folder}: {e.strerror}") from None


class BundleWriter:
    def __init__(self, out_path):
        self.out = Path(out_path)
        self.name = str(out_path)
        self._check_replaceable()  # fail before a long compile, not after
        self._tmp = self._make_tmp_dir()
        self._open_writers: list[SafetensorsWriter] = []
        self._written: set[str] = set()  # files this writer wrote: commit checks they are all there

    # -- writing files -------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        """A path inside the temporary directory for `rel` (parents created)."""
        if self._tmp is None:
            raise RuntimeError(f"bundle {self.name}: already committed or aborted")
        problem = rel_path_problem(rel)
        if problem or rel == MANIFEST:
            raise BundleError(f"bundle {self.name}: path {rel!r} {problem or 'is reserved'}")
        p = self._tmp / rel
        self._check_tmp()
        with self._io():
            p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _check_tmp(self) -> None:
        """BundleError if the temporary directory vanished (another process removed it): making it
        anew would install a bundle without what was written before."""
        if not self._tmp.is_dir() or self._tmp.is_symlink():
            raise BundleError(f"bundle {self.name}: its temporary directory {self._tmp.name} disappeared while it was "
                              "written (removed by another process?)")

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        with self._io(f"cannot write {rel}"):
            p.write_bytes(data)
        self._written.add(rel)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    def copy_file(self, rel: str, src_path) -> None:
        """Copy the contents of `src_path` (symlinks followed) to `rel`."""
        p = self.path(rel)
        with self._io(f"cannot copy {src_path}"):
            shutil.copyfile(src_path, p)
        self._written.add(rel)

    def safetensors(self, rel: str, metadata: dict[str, str] | None = None, tensors=None,
                    align: int = 64) -> SafetensorsWriter:
        """A streaming SafetensorsWriter for `rel`, every tensor `align`-byte aligned in the file (so
        in memory once mapped: vector loads, AMX tiles and GPU uploads want it); it must be closed
        before commit."""
        w = SafetensorsWriter(self.path(rel), metadata, tensors, error_cls=BundleError,
                              label=f"bundle {self.name}: file {rel}", align=align)
        self._open_writers.append(w)
        self._written.add(rel)
        return w

    # -- finishing -----------------------------------------------------------------------

    def commit(self, manifest: dict) -> dict:
        """Record every file's size and sha256, write manifest.json, move the bundle into place.

        Returns the manifest as written (a copy of `manifest` with format, format_version and
        files filled in).
        """
        if self._tmp is None:
            raise RuntimeError(f"bundle {self.name}: already committed or aborted")
        try:
            if not all(w.closed for w in self._open_writers):
                raise RuntimeError(f"bundle {self.name}: commit() with a safetensors writer still open")
            manifest = dict(manifest)
            manifest.setdefault("format", FORMAT)
            manifest.setdefault("format_version", FORMAT_VERSION)
            self._check_tmp()
            with self._io():
                manifest["files"] = self._file_entries()
            if missing := sorted(self._written - {e["path"] for e in manifest["files"]}):
                raise BundleError(f"bundle {self.name}: {missing[0]} disappeared from its temporary directory while "
                                  "it was written (removed by another process?)")
            text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
            with self._io(f"cannot write {MANIFEST}"), open(self._tmp / MANIFEST, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            with self._io():
                _fsync_dirs(self._tmp)
                self._check_replaceable()
                self._install()
                _fsync_dir(self.out.parent)
        except BaseException:
            self.abort()
            raise
        return manifest

    def abort(self) -> None:
        """Discard everything written; out_path is left as it was."""
        for w in self._open_writers:
            w.abort()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
            finally:  # a signal's exception (Ctrl-C, SIGTERM) raised part way: the rest still goes
                if os.path.lexists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._tmp is None:
            return
        self.abort()
        if exc_type is None:
            raise RuntimeError(f"bundle {self.name}: the with block ended without commit()")

    # -- internals -----------------------------------------------------------------------

    def _io(self, action: str = "cannot write"):
        return reraise_os_error(BundleError, f"bundle {self.name}", action)

    def _make_tmp_dir(self) -> Path:
        # Same parent, so the final rename is atomic. os.mkdir (unlike mkdtemp's 0700) keeps
        # the user's umask for the finished bundle.
        with self._io():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(100):
                tmp = self.out.with_name(f"{self.out.name}.tmp-{host_tag()}-{os.getpid()}-{secrets.token_hex(6)}")
                try:
                    tmp.mkdir()
                    return tmp
                except FileExistsError:
                    continue
        raise BundleError(f"bundle {self.name}: cannot create a temporary directory next to it")

    def _check_replaceable(self) -> None:
        check_replaceable(self.out)

    def _file_entries(self) -> list[dict]:
        entries = []
        for dirpath, dirnames, filenames in os.walk(self._tmp, onerror=_reraise):
            for fn in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                full = os.path.join(dirpath, fn)
                rel = Path(full).relative_to(self._tmp).as_posix()
                if rel == MANIFEST:
                    continue
                if not stat.S_ISREG(os.lstat(full).st_mode):
                    raise BundleError(f"bundle {self.name}: {rel} is not a regular file")
                with open(full, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                    os.fsync(f.fileno())  # hashing read it back anyway; make it durable
                    entries.append({"path": rel, "size": os.fstat(f.fileno()).st_size, "sha256": digest})
        return sorted(entries, key=lambda e: e["path"])

    def _install(self) -> None:
        """Moves the old bundle aside, the new one in, and deletes the old one; on any failure
        (KeyboardInterrupt too) puts the old one back. Another compile to the same output that
        installs its bundle between the two moves makes the second fail (not empty): then its
        bundle is the old one, and the last to install wins."""
        tmp, out = self._tmp, self.out
        for _ in range(100):
            aside = None
            try:
                if os.path.lexists(out):
                    aside = out.with_name(f"{out.name}.old-{host_tag()}-{os.getpid()}-{secrets.token_hex(6)}")
                    os.rename(out, aside)
                os.rename(tmp, out)
            except BaseException as e:
                if aside is not None and os.path.lexists(aside) and not os.path.lexists(out):
                    os.rename(aside, out)
                    aside = None
                if not (isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.lexists(out)):
                    raise
                continue  # another compile's bundle arrived meanwhile
            finally:  # what was moved aside and not put back is an old bundle: out holds one
                if aside is not None and os.path.lexists(aside):
                    shutil.rmtree(aside, ignore_errors=True)
            self._tmp = None
            return
        raise BundleError(f"bundle {self.name}: other compiles kept replacing it")


@functools.cache
def host_tag() -> str:
    """This host's name as it may appear in a file name (owner tags of temporary folders), with
    the process-ID namespace where Linux tells it: containers sharing a host name and a folder
    (host networking) cannot see each other's processes, and would each take the other's running
    compile for a dead one."""
    tag = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
    try:
        return f"{tag}.ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return tag


def remove_stale_temporaries(out_path) -> tuple[list[str], list[str]]:
    """Removes the temporary directories of writers to `out_path` whose process has died: a
    new bundle being written (`.tmp-`) or an old one moved aside to be replaced (`.old-`). While
    `out_path` itself is missing (a writer killed between moving the old bundle aside and the new
    one in), finished ones (with a manifest) are left for the user.

    Returns (removed, unknown): the names removed, and those of other hosts or older llmirc
    versions (no owner in the name), or kept as above, for the caller to mention."""
    out = Path(out_path)
    removed, unknown = [], []
    try:
        siblings = list(out.absolute().parent.iterdir())
        finished_is_garbage = os.path.lexists(out)
    except OSError:
        return removed, unknown
    pattern = re.compile(re.escape(out.name) + r"\.(?:tmp|old)-(?:(.+)-(\d+)-)?[0-9a-f]{12}")
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        host, pid = m[1], int(m[2]) if m[2] else None
        if pid is None or host != host_tag():
            unknown.append(p.name)
        elif process_alive(pid):
            continue
        elif not finished_is_garbage and (p / MANIFEST).exists():
            unknown.append(p.name)
        else:
            shutil.rmtree(p, ignore_errors=True)
            (unknown if os.path.lexists(p) else removed).append(p.name)  # (another user's, in a shared folder)
    return removed, unknown


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # not a pid
        return False
    return True


def _reraise(e: OSError):
    raise e  # os.walk would silently skip an unreadable directory


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        _fsync_dir(dirpath)
