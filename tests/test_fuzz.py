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
