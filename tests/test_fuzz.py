"""A few fuzz cases per reader of untrusted input (tests/fuzz_readers.py runs 10,000 on demand):
each mutated or truncated input gives a result or a one-line LlmircError, in time, writing nothing."""

from __future__ import annotations

import dataclasses

import pytest

from fuzz_readers import READERS, fuzz, setup_manifest

CASES = 15


@pytest.mark.parametrize("name", READERS)
def test_reader_survives_mutated_inputs(tmp_path, name):
    reader = READERS[name]
    if name == "manifest":  # a bundle that compiles in a second (the script fuzzes a Llama's)
        reader = dataclasses.replace(reader, setup=lambda folder: setup_manifest(folder, "onnx"))
    reader.prepare(tmp_path)
    counts = fuzz(reader, CASES)  # derandomized: the same cases every run
    assert sum(counts.values()) == CASES and counts["error"] > 0, counts


def test_json_nested_deeper_than_the_parser_goes_is_a_user_error(tmp_path):
    """Python's json raises RecursionError (not a ValueError) past about 1,000 levels: each reader of a
    small JSON file, or JSON option, must name the file or flag, not fail with an internal error."""
    import types

    from fuzz_readers import setup_tokenizer

    from llmirc import cli
    from llmirc.errors import BundleError, LlmircError, UsageError
    from llmirc.runtime.bench import check_same_model
    from llmirc.runtime.chat_template import ChatTemplate
    from llmirc.runtime.model import Model
    from llmirc.runtime.tokenizer import Tokenizer

    deep = "[" * 100_000
    (tmp_path / "tokenizer.json").write_bytes(setup_tokenizer(tmp_path)[0])
    (tmp_path / "tokenizer_config.json").write_text(deep)
    with pytest.raises(LlmircError, match="tokenizer_config.json: cannot read it"):
        Tokenizer.from_bundle_dir(tmp_path)
    with pytest.raises(LlmircError, match="tokenizer_config.json: cannot read it"):
        ChatTemplate.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(LlmircError, match="config.json is not JSON"):
        check_same_model({}, tmp_path)
    (tmp_path / "generation_config.json").write_text(deep)
    bundle = types.SimpleNamespace(name="b", files=("generation_config.json",), file=lambda rel: tmp_path / rel)
    with pytest.raises(BundleError, match="generation_config.json is not valid JSON"):
        Model.generation_config.fget(types.SimpleNamespace(bundle=bundle))
    with pytest.raises(UsageError, match="--allowed-origins"):
        cli._origins(deep)
    with pytest.raises(UsageError, match="--chat-template-kwargs: not JSON"):
        cli._template_kwargs("{\"a\": " + deep)
