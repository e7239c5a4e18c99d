"""The bundle writer (atomic, checksummed) and the reader/verifier (refuses anything unsafe)."""

import hashlib
import json
import os
import threading

import numpy as np
import pytest

import llmirc.artifact_format.writer as writer_mod
from llmirc.artifact_format import FORMAT, FORMAT_VERSION, BundleWriter, is_bundle, open_bundle
from llmirc.errors import BundleError

MANIFEST = {"producer": "llmirc test", "model": {"architecture": "Toy"}}


def build(out, files=None, manifest=MANIFEST):
    """Write a bundle with a few files (rel -> bytes) plus a safetensors file; return the manifest."""
    files = {"config.json": b'{"a": 1}', "kernels/cpu/lib.so": b"\x7fELF..."} if files is None else files
    with BundleWriter(out) as b:
        for rel, data in files.items():
            b.write_bytes(rel, data)
        with b.safetensors("weights/model.safetensors", {"k": "v"}, [("w", "F32", (2, 3))]) as w:
            w.write("w", np.arange(6, dtype=np.float32).reshape(2, 3))
        return b.commit(manifest)


def edit_manifest(root, fn):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def entry(root, rel):
    data = (root / rel).read_bytes()
    return {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def siblings(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


# -- writer ----------------------------------------------------------------------------------

def test_commit_writes_manifest_with_checksums(tmp_path):
    out = tmp_path / "out.llmir"
    written = build(out)
    m = json.loads((out / "manifest.json").read_text())
    assert m == written and m["format"] == FORMAT == "llmir-bundle"
    assert m["format_version"] == FORMAT_VERSION == "1.0"
    assert m["producer"] == "llmirc test"
    assert [f["path"] for f in m["files"]] == ["config.json", "kernels/cpu/lib.so", "weights/model.safetensors"]
    assert m["files"] == [entry(out, f["path"]) for f in m["files"]]
    assert siblings(tmp_path) == ["out.llmir"]  # no temp dir left
    b = open_bundle(out)
    assert b.root == out.resolve() and b.manifest == m and b.read_json("config.json") == {"a": 1}
    assert b.files == ("config.json", "kernels/cpu/lib.so", "weights/model.safetensors")
    with b.open_safetensors("weights/model.safetensors") as st:
        assert st.array("w").tolist() == [[0, 1, 2], [3, 4, 5]] and st.metadata == {"k": "v"}
    assert is_bundle(out) and not is_bundle(tmp_path)


def test_writer_helpers(tmp_path):
    src = tmp_path / "tok.json"
    src.write_text("{}")
    out = tmp_path / "sub" / "out.llmir"  # parent is created
    with BundleWriter(out) as b:
        b.write_text("ir/input.mlir", "module {}\n")
        b.write_json("generation_config.json", {"eos": [1, 2]})
        b.copy_file("tokenizer/tokenizer.json", src)
        assert b.path("a/b/c.bin").parent.is_dir()
        b.commit({"format_version": "1.3"})  # caller's version is kept
    bundle = open_bundle(out)
    assert bundle.manifest["format_version"] == "1.3"
    assert bundle.read_json("generation_config.json") == {"eos": [1, 2]}
    assert bundle.file("ir/input.mlir").read_text() == "module {}\n"


@pytest.mark.parametrize("rel", ["../x", "/abs", "a//b", "./a", "a/./b", "a\\b", "", "manifest.json", "a/../b",
                                 "nul\0"])
def test_writer_refuses_unsafe_paths(tmp_path, rel):
    with BundleWriter(tmp_path / "out") as b:
        with pytest.raises(BundleError, match=r"^bundle .*out: path "):
            b.path(rel)
        b.commit({})


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_in_block_leaves_nothing(tmp_path, exc):
    with pytest.raises(exc):
        with BundleWriter(tmp_path / "out.llmir") as b:
            b.write_bytes("a.bin", b"x")
            w = b.safetensors("weights/model.safetensors", None, [("w", "F32", (1,))])
            raise exc("compile failed")
    assert siblings(tmp_path) == []
    assert w.closed


def test_interrupted_temp_dir_is_not_a_bundle(tmp_path):
    b = BundleWriter(tmp_path / "out.llmir")
    b.write_bytes("kernels/x.so", b"half")
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith("out.llmir.tmp-")  # what a killed process would leave behind
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        open_bundle(tmp)
    assert not is_bundle(tmp)
    b.abort()
    assert siblings(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = writer_mod.host_tag()
    names = {"dead": f"out.llmir.tmp-{host}-{dead.pid}-0123456789ab",
             "alive": f"out.llmir.tmp-{host}-{os.getpid()}-0123456789ab",
             "other-host": f"out.llmir.tmp-elsewhere-{dead.pid}-0123456789ab",
             "old-format": "out.llmir.tmp-0123456789ab",
             "other-output": f"other.llmir.tmp-{host}-{dead.pid}-0123456789ab",
             "not-ours": f"out.llmir.tmp-{host}-{dead.pid}-notahexsuffix"}
    for name in names.values():
        (tmp_path / name).mkdir()
    removed, unknown = writer_mod.remove_stale_temporaries(tmp_path / "out.llmir")
    assert removed == [names["dead"]]
    assert sorted(unknown) == sorted([names["other-host"], names["old-format"]])
    assert sorted(siblings(tmp_path)) == sorted(n for k, n in names.items() if k != "dead")


def test_two_writers_racing_for_one_output_the_last_wins(tmp_path, monkeypatch):
    """A second compile that installs its bundle between the first's two moves (old bundle aside,
    new one in): the first then replaces it, and no `.old-` folder is left (it was, and the first
    compile failed with 'Directory not empty')."""
    out = tmp_path / "out"
    with BundleWriter(out) as w:
        w.path("x").write_text("old")
        w.commit({})
    real_rename, raced = os.rename, []

    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst) and not raced:
            raced.append(dst)
            with BundleWriter(out) as b:
                b.path("x").write_text("B")
                b.commit({})
    with BundleWriter(out) as a:
        a.path("x").write_text("A")
        monkeypatch.setattr(writer_mod.os, "rename", rename)
        a.commit({})
    monkeypatch.undo()
    assert raced and (out / "x").read_text() == "A" and siblings(tmp_path) == ["out"]
    assert open_bundle(out).files == ("x",)


def test_a_writer_killed_between_its_moves_leaves_the_bundles_to_the_user(tmp_path):
    """Killed after moving the old bundle aside, before moving the new one in: while the output is
    missing, both stay (mentioned); once it is back, the next writer removes them."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = writer_mod.host_tag()
    for kind in ("old", "tmp"):
        with BundleWriter(tmp_path / f"{kind}") as w:
            w.commit({})
        (tmp_path / kind).rename(tmp_path / f"out.llmir.{kind}-{host}-{dead.pid}-0123456789ab")
    removed, unknown = writer_mod.remove_stale_temporaries(tmp_path / "out.llmir")
    assert removed == [] and len(unknown) == 2
    (tmp_path / "out.llmir").mkdir()
    removed, unknown = writer_mod.remove_stale_temporaries(tmp_path / "out.llmir")
    assert len(removed) == 2 and unknown == [] and siblings(tmp_path) == ["out.llmir"]


@pytest.mark.parametrize("recreated", [False, True])
def test_a_vanished_temporary_directory_fails_the_compile(tmp_path, recreated):
    """Another process removes the temporary directory mid-write: the writer must not make it anew
    and install a bundle without the weights written before (it did, exit 0)."""
    import shutil

    out = tmp_path / "out"
    with BundleWriter(out) as w:
        w.write_bytes("weights", b"old")
        w.commit({})
    with pytest.raises(BundleError, match="disappeared"):
        with BundleWriter(out) as w:
            w.write_bytes("weights", b"new")
            shutil.rmtree(w._tmp)
            if recreated:  # as a link step's mkdir(parents=True) would
                (w._tmp / "kernels").mkdir(parents=True)
                w.commit({})
            w.write_bytes("later", b"x")
    assert (out / "weights").read_bytes() == b"old"


def test_commit_refuses_symlinks(tmp_path):
    with pytest.raises(BundleError, match=r"bundle .*out: link is not a regular file"):
        with BundleWriter(tmp_path / "out") as b:
            b.path("link").symlink_to("/etc/passwd")
            b.commit({})
    assert siblings(tmp_path) == []


def test_missing_commit_and_open_writer_are_bugs(tmp_path):
    with pytest.raises(RuntimeError, match="without commit"):
        with BundleWriter(tmp_path / "a"):
            pass
    with pytest.raises(RuntimeError, match="still open"):
        with BundleWriter(tmp_path / "b") as b:
            b.safetensors("w.safetensors", None, [])
            b.commit({})
    assert siblings(tmp_path) == []


def test_replacing_an_existing_bundle(tmp_path):
    out = tmp_path / "out.llmir"
    build(out, {"old.bin": b"old"})
    build(out, {"new.bin": b"new"})
    assert open_bundle(out).files == ("new.bin", "weights/model.safetensors")
    assert not (out / "old.bin").exists()
    assert siblings(tmp_path) == ["out.llmir"]
    (tmp_path / "empty").mkdir()  # an empty directory is replaced too
    build(tmp_path / "empty")
    assert open_bundle(tmp_path / "empty")


def test_failed_replacement_keeps_the_old_bundle(tmp_path, monkeypatch):
    out = tmp_path / "out.llmir"
    build(out, {"old.bin": b"old"})
    before = (out / "manifest.json").read_text()
    with pytest.raises(ValueError):
        with BundleWriter(out) as b:
            b.write_bytes("new.bin", b"new")
            raise ValueError("compile failed")
    with pytest.raises(TypeError):  # commit itself fails: manifest not serializable
        build(out, {"new.bin": b"new"}, {"bad": object()})
    # The final rename fails after the old bundle was moved aside: it must come back.
    real_rename = os.rename

    def flaky_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(writer_mod.os, "rename", flaky_rename)
    with pytest.raises(BundleError, match=r"^bundle .*out\.llmir: cannot write: No space left on device$"):
        build(out, {"new.bin": b"new"})
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == before
    assert open_bundle(out).files == ("old.bin", "weights/model.safetensors")
    assert siblings(tmp_path) == ["out.llmir"]


@pytest.mark.parametrize("kind", ["file", "dir", "foreign_manifest", "symlink", "symlink_to_bundle", "dangling"])
def test_refuses_to_overwrite_non_bundles(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("precious")
    elif kind.startswith("symlink"):
        with BundleWriter(tmp_path / "target") as w:  # a bundle or (symlink) an empty directory
            w.commit({})
        if kind == "symlink":
            (tmp_path / "target" / "manifest.json").unlink()
        out.symlink_to(tmp_path / "target")
    elif kind == "dangling":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.mkdir()
        (out / ("manifest.json" if kind == "foreign_manifest" else "data.txt")).write_text('{"format": "other"}')
    before = siblings(tmp_path)
    reason = "it is a symbolic link" if kind.startswith("symlink") or kind == "dangling" else \
        "it exists and is not an llmir bundle"
    with pytest.raises(BundleError, match=rf"^refusing to overwrite .*out: {reason}"):
        BundleWriter(out)
    assert siblings(tmp_path) == before


def test_refuses_a_name_too_long_for_its_temporary_sibling(tmp_path):
    with pytest.raises(BundleError, match=r"the name is too long: the compile writes '\.tmp-.*at most 255 bytes"):
        BundleWriter(tmp_path / ("b" * 240))
    assert siblings(tmp_path) == []


def test_refuses_at_commit_if_a_non_bundle_appeared(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BundleError, match="refusing to overwrite"):
        with BundleWriter(out) as b:
            b.write_bytes("a", b"a")
            out.write_text("someone else's file")
            b.commit({})
    assert out.read_text() == "someone else's file" and siblings(tmp_path) == ["out"]


# -- reader ----------------------------------------------------------------------------------

@pytest.fixture
def bundle(tmp_path):
    out = tmp_path / "out.llmir"
    build(out, {"config.json": b"{}", "kernels/x.so": b"\x7fELF-kernel"})
    return out


def expect(bundle, message, verify=True):
    with pytest.raises(BundleError) as e:
        open_bundle(bundle, verify=verify)
    assert "\n" not in str(e.value)
    assert message in str(e.value), str(e.value)


def test_tampered_file(bundle):
    (bundle / "kernels/x.so").write_bytes(b"\x7fELF-evil!!")  # same size
    expect(bundle, f"bundle {bundle}: file kernels/x.so: sha256 mismatch (tampered or corrupted)")
    assert open_bundle(bundle, verify=False)  # verify=False skips hashing, still checks sizes


def test_verification_is_remembered_until_anything_changes(bundle, tmp_path, monkeypatch):
    import llmirc.artifact_format.reader as reader

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed = []
    real = reader._sha256
    monkeypatch.setattr(reader, "_sha256", lambda path, *a: hashed.append(path.name) or real(path, *a))
    open_bundle(bundle, remember=True)
    assert len(hashed) == 3 and list((tmp_path / "cache" / "llmirc" / "verified").iterdir())
    hashed.clear()
    open_bundle(bundle, remember=True)
    assert hashed == []  # remembered
    open_bundle(bundle)
    assert len(hashed) == 3  # without remember: always hashed
    # Same size, and the modification time put back: the status-change time still moves.
    path = bundle / "kernels/x.so"
    st = path.stat()
    path.write_bytes(b"\x7fELF-evil!!")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    expect_remembered = pytest.raises(BundleError, match="kernels/x.so: sha256 mismatch")
    with expect_remembered:
        open_bundle(bundle, remember=True)
    assert hashed


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    """LLMIRC_CACHE_DIR, else XDG_CACHE_HOME/llmirc when it is an absolute path (the XDG Base Directory
    specification: a relative one is ignored; it made a cache in each current directory), else
    ~/.cache/llmirc."""
    from llmirc.cache import cache_dir

    monkeypatch.delenv("LLMIRC_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "llmirc" / "cpu"
    for xdg, expected in (("rel/cache", home_cache), ("", home_cache),
                          (str(tmp_path / "xdg"), tmp_path / "xdg" / "llmirc" / "cpu")):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert cache_dir("cpu") == expected, xdg
    monkeypatch.setenv("LLMIRC_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir("cpu") == tmp_path / "mine" / "cpu"


def test_a_record_that_cannot_be_written_leaves_no_temporary_file(bundle, tmp_path, monkeypatch):
    """A verification record whose write fails (a full disk) or is stopped (Ctrl-C): no `*.tmp` file
    stays in the cache's verified/ folder; the error is the caller's only for the signal."""
    import llmirc.artifact_format.reader as reader

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def fail(src, dst, error=error):
            raise error

        monkeypatch.setattr(reader.os, "replace", fail)
        if isinstance(error, OSError):
            assert open_bundle(bundle, remember=True)
        else:
            with pytest.raises(KeyboardInterrupt):
                open_bundle(bundle, remember=True)
        assert list((tmp_path / "cache" / "llmirc" / "verified").iterdir()) == []


def test_verification_without_a_writable_cache_still_verifies(bundle, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # not a directory
    assert open_bundle(bundle, remember=True) and open_bundle(bundle, remember=True)
    (bundle / "config.json").write_bytes(b"[]")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        open_bundle(bundle, remember=True)



@pytest.mark.parametrize("home", [None, "relative"])
def test_no_home_folder_keeps_no_cache(bundle, tmp_path, monkeypatch, home):
    """HOME unset for a uid without a passwd entry (`docker run -u N`) leaves expanduser("~") as "~" (as a
    relative HOME leaves it relative): no cache then, where a folder named "~" was made in the current
    directory."""
    from llmirc.cache import cache_dir

    monkeypatch.delenv("LLMIRC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    if home is None:
        monkeypatch.delenv("HOME")
        monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # (pwd has no entry for this uid)
    else:
        monkeypatch.setenv("HOME", home)
    monkeypatch.chdir(tmp_path)
    assert cache_dir("cpu") is None
    assert open_bundle(bundle, remember=True) and open_bundle(bundle, remember=True)
    (bundle / "config.json").write_bytes(b"[]")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        open_bundle(bundle, remember=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.llmir"]  # no "~" (nor "relative") folder

def test_size_mismatch_and_missing_file(bundle):
    (bundle / "config.json").write_bytes(b"{ }")
    expect(bundle, "file config.json: size 3 bytes, manifest says 2", verify=False)
    (bundle / "config.json").unlink()
    expect(bundle, "file config.json: missing", verify=False)


def test_a_file_that_is_there_but_cannot_be_reached_is_not_called_missing(bundle, monkeypatch):
    # a folder this user may not enter (root enters any: its EACCES is monkeypatched), a loop of links
    real_stat = os.stat

    def stat(p, *args, **kwargs):
        if str(p).endswith("x.so"):
            raise PermissionError(13, "Permission denied")
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    expect(bundle, "file kernels/x.so: cannot read: Permission denied", verify=False)
    monkeypatch.undo()
    (bundle / "loop.json").symlink_to("loop.json")
    edit_manifest(bundle, lambda m: m["files"].append({"path": "loop.json", "size": 1, "sha256": "0" * 64}))
    expect(bundle, "file loop.json: cannot read: Too many levels of symbolic links", verify=False)


@pytest.mark.parametrize("path, message", [
    ("../outside.bin", "path '../outside.bin' escapes the bundle ('..')"),
    ("a/../../outside.bin", "escapes the bundle"),
    ("/etc/passwd", "path '/etc/passwd' is absolute"),
    ("a\\b", "contains a backslash"),
    ("a//b", "is not normalized"),
    ("manifest.json", "is reserved"),
    ("config.json", "is listed twice"),
])
def test_unsafe_manifest_paths(bundle, path, message):
    (bundle.parent / "outside.bin").write_bytes(b"x")
    edit_manifest(bundle, lambda m: m["files"].append({"path": path, "size": 1, "sha256": "0" * 64}))
    expect(bundle, message)


def test_symlink_pointing_outside(bundle, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (bundle / "kernels/evil.so").symlink_to(secret)
    (bundle / "linkdir").symlink_to(tmp_path)
    for rel in ("kernels/evil.so", "linkdir/secret.txt"):
        e = {**entry(bundle, rel), "path": rel}
        edit_manifest(bundle, lambda m: m["files"].append(e))
        expect(bundle, f"file {rel}: resolves outside the bundle")
        edit_manifest(bundle, lambda m: m["files"].pop())


def test_symlink_inside_is_fine(bundle):
    (bundle / "alias.json").symlink_to("config.json")
    edit_manifest(bundle, lambda m: m["files"].append(entry(bundle, "alias.json")))
    assert open_bundle(bundle).read_json("alias.json") == {}


def test_versions(bundle):
    edit_manifest(bundle, lambda m: m.update(format_version="1.7"))
    assert open_bundle(bundle).manifest["format_version"] == "1.7"  # newer minor: accepted
    edit_manifest(bundle, lambda m: m.update(format_version="2.0"))
    with pytest.raises(BundleError) as e:
        open_bundle(bundle)
    assert str(e.value) == (f"bundle {bundle} has format version 2.0, newer than this llmirc "
                            "supports (1.x): upgrade llmirc")
    assert is_bundle(bundle)  # still an llmir bundle: a newer compile may replace it
    for bad in ["1", "1.0.0", "v1.0", 1.0, None]:
        edit_manifest(bundle, lambda m: m.update(format_version=bad))
        expect(bundle, f"format_version {bad!r} is not 'MAJOR.MINOR'")


@pytest.mark.parametrize("text, message", [
    (None, "no manifest.json"),
    ("{not json", "manifest.json is not valid JSON"),
    ("[1]", "manifest.json is not a JSON object"),
    ('{"format": "llmir-bundle", "format": "x"}', "duplicate key 'format'"),
    ('{"format": "onnx", "format_version": "1.0", "files": []}', "format is 'onnx', not 'llmir-bundle'"),
    ('{"format": "llmir-bundle", "format_version": "1.0"}', "'files' must be a list"),
    ('{"format": "llmir-bundle", "format_version": "1.0", "files": [{"path": "a", "size": -1, "sha256": ""}]}',
     "files[0]: needs path, size"),
])
def test_missing_or_invalid_manifest(bundle, text, message):
    if text is None:
        (bundle / "manifest.json").unlink()
    else:
        (bundle / "manifest.json").write_text(text)
    expect(bundle, message)


def test_oversized_manifest(bundle, monkeypatch):
    import llmirc.artifact_format.reader as reader_mod
    monkeypatch.setattr(reader_mod, "MAX_MANIFEST_BYTES", 64)
    expect(bundle, "manifest.json is")
    assert "over the limit of 64" in str(pytest.raises(BundleError, open_bundle, bundle).value)


def test_not_a_directory(tmp_path):
    (tmp_path / "file.llmir").write_text("x")
    expect(tmp_path / "file.llmir", "not an llmir bundle directory")
    expect(tmp_path / "nothing", "no such file or directory")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(20))  # llama.cpp's users run their files directly
    expect(tmp_path / "model.gguf", "a GGUF file, not an llmir bundle directory: compile it into one first (llmirc "
           f"compile {tmp_path / 'model.gguf'} -o model.llmir)")
    os.mkfifo(tmp_path / "fifo")  # not opened to look for GGUF's magic: open() of a FIFO waits for a writer
    errors = []
    checked = threading.Thread(target=lambda: errors.append(pytest.raises(BundleError, open_bundle, tmp_path / "fifo")),
                               daemon=True)
    checked.start()
    checked.join(30)
    assert not checked.is_alive(), "open_bundle of a FIFO blocked"
    assert "fifo: not an llmir bundle directory" in str(errors[0].value)


def test_a_checkpoint_or_onnx_model_given_as_a_bundle_says_to_compile_it(tmp_path, bundle):
    """`llmirc run CHECKPOINT_DIR` said "no manifest.json (not an llmir bundle, or an unfinished
    compile)", and `run model.onnx` "not an llmir bundle directory", where a GGUF file is told the
    compile command: each now names what it is and the command."""
    ckpt = tmp_path / "smollm2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors.index.json").write_text("{}")
    expect(ckpt, "a Hugging Face checkpoint, not an llmir bundle: compile it into one first (llmirc "
           f"compile {ckpt} -o smollm2.llmir)")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    expect(tmp_path / "model.onnx", "an ONNX model, not an llmir bundle directory: compile it into one first "
           f"(llmirc compile {tmp_path / 'model.onnx'} -o model.llmir)")
    (bundle / "manifest.json").unlink()  # a bundle keeps config.json, its weights under weights/: still damage
    expect(bundle, "no manifest.json (not an llmir bundle, or an unfinished compile)")


def test_bundle_accessors_only_serve_listed_files(bundle):
    (bundle / "extra.json").write_text("{}")  # present on disk, not in the manifest
    b = open_bundle(bundle)
    with pytest.raises(BundleError, match=r"no file 'extra\.json' listed in manifest\.json"):
        b.file("extra.json")
    for rel in (["weights/model.safetensors"], None):  # a manifest value of another type (a list: TypeError)
        with pytest.raises(BundleError, match=r"no file .* listed in manifest\.json"):
            b.file(rel)
    with pytest.raises(BundleError, match=r"file kernels/x\.so: invalid JSON"):
        b.read_json("kernels/x.so")
    with pytest.raises(BundleError, match=r"^bundle .*: file config\.json: file is 2 bytes, too short"):
        b.open_safetensors("config.json")
    with b.open_safetensors("weights/model.safetensors") as st:
        with pytest.raises(BundleError, match="no tensor named 'x'"):
            st.array("x")
