"""Strict safetensors I/O: round trips, cross-checks with the official package, malformed files."""

import json
import re
import struct

import numpy as np
import pytest

from llmirc.artifact_format.safetensors import SafetensorsWriter, open_safetensors, save_safetensors
from llmirc.errors import BundleError, CheckpointError

NATIVE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
          "U8": np.uint8, "BOOL": np.bool_}


def sample(dtype, shape=(3, 5), seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def raw_file(path, header, data=b"", n=None):
    """Write a hand-made safetensors file; header is a dict or raw bytes, n overrides its length."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns by truncation (exactly representable inputs only)."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


# -- round trips -----------------------------------------------------------------------------

def test_round_trip_every_native_dtype(tmp_path):
    arrays = {st: sample(dt) for st, dt in NATIVE.items()}
    arrays["scalar"] = np.array(3.5, np.float32)
    p = tmp_path / "all.safetensors"
    save_safetensors(p, arrays, {"producer": "test", "ünï": "cödé"})
    with open_safetensors(p) as f:
        assert f.names() == list(arrays)
        assert f.metadata == {"producer": "test", "ünï": "cödé"}
        assert f.nbytes == sum(a.nbytes for a in arrays.values())
        for name, a in arrays.items():
            got = f.array(name)
            assert got.dtype == a.dtype and got.shape == a.shape
            np.testing.assert_array_equal(got, a)
            assert not got.flags.writeable and not got.flags.owndata  # zero-copy view of the map
        assert f.info("F16") == ("F16", (3, 5))
        assert "I8" in f and "nope" not in f
    # The data section starts 8-byte aligned.
    assert (8 + struct.unpack("<Q", p.read_bytes()[:8])[0]) % 8 == 0


def test_zero_size_tensors_and_empty_file(tmp_path):
    p = tmp_path / "z.safetensors"
    save_safetensors(p, {"e0": np.zeros((0,), np.float32), "e1": np.zeros((4, 0, 2), np.int64)})
    with open_safetensors(p) as f:
        assert f.array("e1").shape == (4, 0, 2) and f.array("e1").dtype == np.int64
        assert f.as_float32("e0").shape == (0,) and f.nbytes == 0
    save_safetensors(p, {})  # header only, 0-byte data section: mmap must still work
    with open_safetensors(p) as f:
        assert f.names() == [] and f.metadata == {}


def test_as_float32_conversions_are_exact(tmp_path):
    f32 = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 5.96e-8, np.inf, -np.inf, np.nan], np.float32)
    bf = bf16_bits(np.array([0.0, -1.0, 3.140625, 1e30, -1e-30, np.inf, np.nan], np.float32))
    p = tmp_path / "f.safetensors"
    with SafetensorsWriter(p, None, [("h", "F16", (10,)), ("b", "BF16", (7,)), ("f", "F32", (10,)),
                                     ("i", "I32", (1,))]) as w:
        w.write("h", f32.astype(np.float16))
        w.write("b", bf)
        w.write("f", f32)
        w.write("i", np.array([1], np.int32))
    with open_safetensors(p) as f:
        np.testing.assert_array_equal(f.as_float32("h"), f32.astype(np.float16).astype(np.float32))
        b = f.as_float32("b")
        assert b.dtype == np.float32
        assert np.array_equal(b.view(np.uint32), bf.astype(np.uint32) << 16)  # bit-exact, NaN too
        assert f.info("b") == ("BF16", (7,)) and f.array("b").dtype == np.uint16
        assert not f.as_float32("f").flags.owndata  # F32 is a view, not a copy
        with pytest.raises(CheckpointError, match=r"f\.safetensors: tensor 'i' has dtype I32, not a floating"):
            f.as_float32("i")


def test_arrays_survive_close(tmp_path):
    p = tmp_path / "c.safetensors"
    save_safetensors(p, {"a": np.arange(4, dtype=np.float32)})
    f = open_safetensors(p)
    a = f.array("a")
    f.close()
    f.close()
    assert a.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="closed"):
        f.array("a")


def test_arrays_survive_drop_pages(tmp_path):
    """drop_pages unmaps what was read (the compiler streams weights through); views read the file again."""
    p = tmp_path / "d.safetensors"
    values = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
    save_safetensors(p, {"a": values})
    f = open_safetensors(p)
    a = f.array("a")
    before = a.copy()
    f.drop_pages()
    np.testing.assert_array_equal(a, before)
    np.testing.assert_array_equal(f.array("a"), values)
    f.close()
    f.drop_pages()  # closed: nothing to drop


def test_unknown_tensor_and_unsupported_dtype(tmp_path):
    p = raw_file(tmp_path / "f8.safetensors",
                 {"q": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02")
    with open_safetensors(p) as f:
        assert f.info("q") == ("F8_E4M3", (2,))
        with pytest.raises(CheckpointError, match=r"f8\.safetensors: tensor 'q' has dtype F8_E4M3, which llmirc"):
            f.array("q")
        with pytest.raises(CheckpointError, match=r"f8\.safetensors: no tensor named 'missing'"):
            f.info("missing")


def test_error_class_and_label_are_the_callers(tmp_path):
    p = raw_file(tmp_path / "w.safetensors", b"[]")
    with pytest.raises(BundleError, match=r"^bundle b: file w: header is a JSON list"):
        open_safetensors(p, error_cls=BundleError, label="bundle b: file w")
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors: cannot read: No such file"):
        open_safetensors(tmp_path / "nothing.safetensors")


# -- writer misuse ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["order", "shape", "dtype", "missing", "raise"])
def test_writer_checks_and_cleans_up(tmp_path, bad):
    p = tmp_path / "w.safetensors"
    a, b = np.ones((2, 2), np.float32), np.ones(3, np.int8)
    with pytest.raises((ValueError, KeyError)):
        with SafetensorsWriter(p, {"k": "v"}) as w:
            w.declare("a", "F32", (2, 2))
            w.declare("b", np.int8, [3])
            if bad == "order":
                w.write("b", b)
            w.write("a", a.reshape(4) if bad == "shape" else a.astype(np.float64) if bad == "dtype" else a)
            if bad == "raise":
                raise KeyError("boom")
            # "missing": b is never written, close() complains
    assert not p.exists()


def test_writer_rejects_bad_declarations(tmp_path):
    with SafetensorsWriter(tmp_path / "d.safetensors") as w:
        w.declare("a", "F32", (1,))
        for name, dtype, shape in [("a", "F32", (1,)), ("__metadata__", "F32", (1,)), ("c", "X9", (1,)),
                                   ("d", "F32", (-1,)), ("e", "F8_E4M3", (1,)), ("f", object, (1,))]:
            with pytest.raises(ValueError):
                w.declare(name, dtype, shape)
        w.write("a", np.zeros(1, np.float32))
        with pytest.raises(ValueError, match="after writing started"):
            w.declare("g", "F32", (1,))
    with pytest.raises(ValueError, match="metadata"):
        SafetensorsWriter(tmp_path / "m.safetensors", {"k": 1})
    with pytest.raises(ValueError, match="duplicate"):
        SafetensorsWriter(tmp_path / "dup.safetensors", None, [("a", "F32", ()), ("a", "F32", ())])
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "dup.safetensors").exists()


def test_writer_handles_strided_and_big_endian_input(tmp_path):
    p = tmp_path / "s.safetensors"
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    save_safetensors(p, {"t": base[:, ::2].T, "be": np.arange(3, dtype=">i4")})
    with open_safetensors(p) as f:
        np.testing.assert_array_equal(f.array("t"), base[:, ::2].T)
        assert f.array("be").tolist() == [0, 1, 2]


# -- the official package, both directions ---------------------------------------------------

def test_official_package_reads_our_files(tmp_path):
    import safetensors.numpy as st_numpy
    arrays = {st: sample(dt, seed=1) for st, dt in NATIVE.items()}
    arrays["empty"] = np.zeros((0, 3), np.float32)
    p = tmp_path / "ours.safetensors"
    save_safetensors(p, arrays, {"format": "np"})
    loaded = st_numpy.load_file(p)
    assert loaded.keys() == arrays.keys()
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype
        np.testing.assert_array_equal(loaded[name], a)


def test_official_torch_reads_our_bf16(tmp_path):
    import safetensors.torch as st_torch
    import torch
    x = np.array([1.0, -0.5, 3.140625, 2.0**60], np.float32)  # exact in bf16
    p = tmp_path / "bf.safetensors"
    with SafetensorsWriter(p, None, [("b", "BF16", (2, 2))]) as w:
        w.write("b", bf16_bits(x).reshape(2, 2))
    t = st_torch.load_file(p)["b"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), x.reshape(2, 2))


def test_we_read_official_numpy_files(tmp_path):
    import safetensors.numpy as st_numpy
    arrays = {st: sample(dt, (2, 3, 4), seed=2) for st, dt in NATIVE.items()}
    p = tmp_path / "theirs.safetensors"
    st_numpy.save_file(arrays, p, metadata={"a": "b"})
    with open_safetensors(p) as f:
        assert f.metadata == {"a": "b"}
        for name, a in arrays.items():
            np.testing.assert_array_equal(f.array(name), a)


def test_we_read_torch_files(tmp_path):
    import safetensors.torch as st_torch
    import torch
    g = torch.Generator().manual_seed(0)
    tensors = {"w.bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
               "w.f16": torch.randn(3, 2, generator=g).to(torch.float16),
               "w.f32": torch.randn(4, generator=g), "ids": torch.arange(6, dtype=torch.int64),
               "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 8)}
    p = tmp_path / "torch.safetensors"
    st_torch.save_file(tensors, p, metadata={"format": "pt"})
    with open_safetensors(p) as f:
        for name, t in tensors.items():
            if t.is_floating_point():
                # torch's own widening is the reference: bf16/f16 -> f32 is exact.
                np.testing.assert_array_equal(f.as_float32(name), t.float().numpy())
            else:
                np.testing.assert_array_equal(f.array(name), t.numpy())
        assert f.info("w.bf16") == ("BF16", (5, 7))


# -- malformed files -------------------------------------------------------------------------

T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "truncated_header": (b"\x10\x00\x00", None, None, r"file is 3 bytes, too short"),
    "length_past_end": (b"{}", b"", 9999999, r"header length 9999999 exceeds file size 10"),
    "huge_length": (b"{}", b"", 2**64 - 1, r"header length 18446744073709551615 exceeds file size"),
    "not_json": (b"{nope", b"", None, r"header is not valid JSON"),
    "not_utf8": (b'{"\xff": 1}', b"", None, r"header is not valid JSON: not UTF-8"),
    "not_object": (b"[1, 2]", b"", None, r"header is a JSON list, not an object"),
    "duplicate_key": (b'{"a": {}, "a": {}}', b"", None, r"duplicate key 'a'"),
    "nan": (b'{"a": NaN}', b"", None, r"NaN is not valid JSON"),
    "unknown_dtype": ({"t": {**T, "dtype": "F7"}}, bytes(8), None, r"tensor 't': unknown dtype 'F7'"),
    "missing_field": ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), None, r"tensor 't': entry must be"),
    "negative_dim": ({"t": {**T, "shape": [-2]}}, bytes(8), None, r"tensor 't': shape \[-2\] is not a list"),
    "bool_dim": ({"t": {**T, "shape": [True]}}, bytes(8), None, r"shape \[True\] is not a list"),
    "huge_zero_size": ({"t": {**T, "shape": [0, 2**62], "data_offsets": [0, 0]}}, b"", None, r"is too large"),
    "size_mismatch": ({"t": {**T, "shape": [3]}}, bytes(8), None, r"span 8 bytes but F32\[3\] needs 12"),
    "offsets_past_end": ({"t": {**T, "shape": [4], "data_offsets": [0, 16]}}, bytes(8), None,
                         r"data_offsets \[0, 16\] outside the data section of 8 bytes"),
    "offsets_reversed": ({"t": {**T, "data_offsets": [8, 0]}}, bytes(8), None, r"outside the data section"),
    "offsets_not_pair": ({"t": {**T, "data_offsets": [0]}}, bytes(8), None, r"is not a pair of integers"),
    "overlap": ({"a": T, "b": {**T, "data_offsets": [4, 12]}}, bytes(12), None,
                r"tensor 'b' .* overlaps tensor 'a'"),
    "gap": ({"a": {**T, "data_offsets": [4, 12]}}, bytes(12), None, r"gap of 4 bytes before tensor 'a'"),
    "trailing": ({"a": T}, bytes(12), None, r"4 bytes after the last tensor"),
    "truncated_data": ({"a": T, "b": {**T, "data_offsets": [8, 16]}}, bytes(12), None,
                       r"tensor 'b': data_offsets \[8, 16\] outside the data section of 12 bytes"),
    "bad_metadata": ({"__metadata__": {"k": 1}}, b"", None, r"__metadata__ must be an object of string values"),
    "metadata_not_object": ({"__metadata__": []}, b"", None, r"__metadata__ must be an object"),
    "entry_not_object": ({"t": [1]}, b"", None, r"tensor 't': entry must be an object"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_are_rejected(tmp_path, case):
    header, data, n, message = MALFORMED[case]
    p = tmp_path / f"{case}.safetensors"
    if data is None:
        p.write_bytes(header)
    else:
        raw_file(p, header, data, n)
    with pytest.raises(CheckpointError) as e:
        open_safetensors(p)
    msg = str(e.value)
    assert msg.startswith(str(p) + ": ") and "\n" not in msg
    assert re.search(message, msg), msg


def test_header_cap(tmp_path, monkeypatch):
    import llmirc.artifact_format.safetensors as st
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", 16)
    p = raw_file(tmp_path / "big.safetensors", b"{}" + b" " * 30)
    with pytest.raises(CheckpointError, match=r"header length 32 exceeds the limit of 16 bytes"):
        open_safetensors(p)


def test_tensor_names_with_newlines_stay_one_line(tmp_path):
    p = raw_file(tmp_path / "nl.safetensors", {"a\nb": {**T, "dtype": "??"}}, bytes(8))
    with pytest.raises(CheckpointError) as e:
        open_safetensors(p)
    assert "\n" not in str(e.value) and "'a\\nb'" in str(e.value)


@pytest.mark.parametrize("text,strict,reason", [
    ("[" * 100_000 + "]" * 100_000, False, "nested too deeply"),  # valid, past Python's parser (RecursionError)
    (b'{"a": "\xff"}', False, "not UTF-8"),
    ('{"a": 1,}', False, r"Expecting property name enclosed in double quotes \(line 1, column 9\)"),
    ('{"a": 1, "a": 2}', True, "duplicate key 'a'"),
    ('{"a": NaN}', True, "NaN is not valid JSON"),
])
def test_parse_json_fails_with_one_value_error(text, strict, reason):
    """Every untrusted JSON file (config.json, an index, a manifest, a header) is read by small_files.parse_json,
    whose failures are all ValueErrors with a one-line reason."""
    from llmirc.small_files import parse_json

    with pytest.raises(ValueError, match=reason):
        parse_json(text, strict)
    if strict:  # (not strict: json's own rules)
        assert parse_json(text) is not None


def test_a_checkpoint_parses_its_weights_header_once(tmp_path, monkeypatch):
    """A checkpoint's model.safetensors is opened (its header parsed and checked) once, not again for
    the tensors after listing them: a 96 MB header of 1.5M tensors took a compile 89 s (30 s a parse;
    the rest looking each tensor up in a new list of every name)."""
    from helpers import make_checkpoint

    from llmirc.frontend import checkpoint, open_source

    make_checkpoint(tmp_path, "llama")
    opened = []
    monkeypatch.setattr(checkpoint, "open_safetensors", lambda path, **kw: opened.append(path) or
                        open_safetensors(path, **kw))
    source = open_source(tmp_path)
    source.module()
    assert source.read("model.embed_tokens.weight").shape == (384, 64)
    source.close()
    assert opened == [tmp_path / "model.safetensors"]
