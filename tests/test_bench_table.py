"""`llmirc bench`'s table (runtime/bench.format_table) from a result dict."""

from __future__ import annotations

from llmirc.runtime.bench import format_table


def result(fraction: float) -> dict:
    timing = dict(prefill_tok_s=1000.0, decode_tok_s=100.0, decode_ms_per_step=10.0)
    return {"bundle": "b.llmir", "model": {"architecture": "LlamaForCausalLM"}, "prompt_len": 8, "new_tokens": 16,
            "batch": 1, "repeat": 2, "threads": 2, "target": "cpu-x86_64-native", "bandwidth_gb_s": 10.0,
            "decode_floor_ms_per_step": 10.0 * fraction, "sgemm_gflop_s": None,
            "llmirc": {**timing, "params": 5e6, "bytes_per_step": 2e7, "bytes_per_step_by_dtype": {"f32": 2e7},
                       "fraction_of_floor": fraction, "prefill_gflop_s": 10.0}}


def test_a_rate_past_the_floor_says_the_probe_was_slowed():
    """A decode faster than the bandwidth floor means the probe was slowed (multithreaded BLAS stalls beside
    other work: 0.4 GB/s and "3786% of it" were printed on a busy host); the table says the floor is not
    reliable rather than leaving the figure unexplained."""
    assert "reaches 70% of it" in format_table(result(0.7)) and "warning" not in format_table(result(0.7))
    table = format_table(result(37.86))
    assert "reaches 3786% of it" in table and table.splitlines()[-2].startswith("warning: above the floor")
