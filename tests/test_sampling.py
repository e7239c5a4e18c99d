import warnings
from fractions import Fraction

import numpy as np
import pytest

from llmirc.errors import LlmircError
from llmirc.runtime.sampling import bias_arrays, penalize, sample, warp

import torch
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def hf_warp(logits, temperature, top_k, top_p, min_p=0.0):
    """What generate() applies, in its order (it adds each warper only when it changes something)."""
    scores = torch.from_numpy(logits)
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores.numpy()


SETTINGS = [(1.0, 5, None), (0.7, None, 0.9), (1.3, 10, 0.5), (0.5, 1, None), (1.0, None, 0.05),
            (2.0, 40, 0.95), (1.0, 64, 1.0), (0.8, 100, 0.3)]
MIN_P = [(1.0, None, None, 0.05), (0.7, None, 0.9, 0.1), (1.3, 10, None, 0.3), (1.0, None, None, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [s + (0.0,) for s in SETTINGS] + MIN_P)
def test_kept_tokens_match_hf_warpers(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((64, 64)) * 3).astype(np.float32)
    ours, ref = warp(logits, temperature, top_k, top_p, min_p), hf_warp(logits, temperature, top_k, top_p, min_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_kept_tokens_match_hf_warpers_with_ties(temperature, top_k, top_p):
    rng = np.random.default_rng(2)
    logits = rng.integers(-3, 4, (64, 64)).astype(np.float32)  # few distinct values: ties everywhere
    ours, ref = warp(logits, temperature, top_k, top_p), hf_warp(logits, temperature, top_k, top_p)
    if top_p is None or top_p == 1.0:  # top-k keeps every tie at its boundary: exact sets
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    # top-p cuts inside a group of equal logits wherever the sort puts them (torch's sort is not
    # stable), so compare which values survive, and how many of each.
    for row_ours, row_ref in zip(ours, ref):
        np.testing.assert_allclose(np.sort(row_ours[np.isfinite(row_ours)]), np.sort(row_ref[np.isfinite(row_ref)]),
                                   rtol=1e-6)


def test_greedy_is_first_argmax():
    logits = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0], [-2.0, -1.0, -3.0, -1.0]], dtype=np.float32)
    for t in (0.0, 1e-6):
        np.testing.assert_array_equal(sample(logits, t, top_k=2, top_p=0.5), [1, 0, 1])
    assert sample(logits, 0.0).dtype == np.int64


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(3).standard_normal((16, 100)).astype(np.float32)
    draw = lambda seed: sample(logits, 0.9, 20, 0.9, np.random.default_rng(seed))  # noqa: E731
    np.testing.assert_array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))


def test_any_real_number_is_a_temperature():
    """validate_sampling takes a real number (numbers.Real): a Fraction samples as its float (it raised in
    the exp, and in the engine's step that failed every request and the engine)."""
    logits = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    for exact, near in ((Fraction(1, 2), 0.5), (np.float16(0.75), 0.75), (2, 2.0)):
        np.testing.assert_array_equal(sample(logits, exact, 10, Fraction(9, 10), np.random.default_rng(1)),
                                      sample(logits, near, 10, 0.9, np.random.default_rng(1)))
        np.testing.assert_array_equal(warp(logits, exact, None, None), warp(logits, near, None, None))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, None, None, 0.0), (0.6, None, None, 0.0),
                                                           (1.5, 4, None, 0.0), (1.0, None, 0.8, 0.0),
                                                           (0.9, 5, 0.7, 0.0), (1.0, None, None, 0.2),
                                                           (0.8, None, 0.95, 0.1)])
def test_empirical_distribution_matches_softmax(temperature, top_k, top_p, min_p):
    row = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0], dtype=np.float32)
    n = 40_000
    tokens = sample(np.tile(row, (n, 1)), temperature, top_k, top_p, np.random.default_rng(0), min_p)
    scores = hf_warp(row[None], temperature, top_k, top_p, min_p)[0].astype(np.float64)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=len(row))
    assert counts[probs == 0].sum() == 0  # masked tokens are never drawn
    expected = probs[probs > 0] * n
    chi2 = ((counts[probs > 0] - expected) ** 2 / expected).sum()
    assert chi2 < 30, (counts, expected)  # dof <= 7: p < 1e-3 for a correct sampler


def test_sampling_never_draws_masked_tokens():
    logits = np.random.default_rng(4).standard_normal((2000, 50)).astype(np.float32)
    tokens = sample(logits, 1.0, 3, None, np.random.default_rng(5))
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    assert (top3 == tokens[:, None]).any(axis=-1).all()


@pytest.mark.parametrize("kwargs,option", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=True), "temperature"), (dict(temperature=1.0, top_p=True), "top_p"),  # (they acted as 1)
    (dict(temperature=1.0, min_p=1.5), "min_p"), (dict(temperature=1.0, min_p=float("nan")), "min_p"),
])
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(LlmircError, match=option):
        sample(np.zeros((1, 4), dtype=np.float32), **kwargs)


@pytest.mark.parametrize("scale,top_k,top_p", [(0.05, None, 0.95), (0.3, None, 0.5), (4.0, None, 0.9),
                                               (0.05, 3000, 0.99), (1.0, 1000, None)])
def test_partial_selection_matches_hf_on_a_real_sized_vocabulary(scale, top_k, top_p):
    # Flat rows (scale 0.05) make top-p keep thousands of tokens: the candidate set must grow.
    logits = (np.random.default_rng(6).standard_normal((8, 32000)) * scale).astype(np.float32)
    ours, ref = warp(logits, 0.8, top_k, top_p), hf_warp(logits, 0.8, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    if scale == 0.05 and top_k is None:
        assert np.isfinite(ref).sum(axis=-1).min() > 8 * 64


def test_one_generator_per_row():
    logits = np.random.default_rng(7).standard_normal((3, 40)).astype(np.float32)
    rngs = lambda: [np.random.default_rng(s) for s in (1, 2, 3)]  # noqa: E731
    together = sample(logits, 1.0, None, 0.9, rngs())
    for r in range(3):  # a row's draw depends only on its own generator
        assert sample(logits[r:r + 1], 1.0, None, 0.9, [rngs()[r]])[0] == together[r]
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample(logits, 1.0, rng=rngs()[:2])


def test_repetition_penalty_matches_hf():
    """The repetition penalty over the prompt and the output as transformers' processor applies it over
    generate()'s input_ids (the prompt and what it generated): repeated ids count once."""
    rng = np.random.default_rng(8)
    for penalty in (1.3, 0.7):
        logits = (rng.standard_normal(200) * 4).astype(np.float32)
        prompt, output = rng.integers(0, 200, 30), rng.integers(0, 200, 12)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(np.concatenate([prompt, output]))[None],
                                                        torch.from_numpy(logits[None].copy()))[0].numpy()
        np.testing.assert_array_equal(penalize(logits, prompt, output, repetition_penalty=penalty), ref)


def test_penalties_and_bias_match_their_definitions():
    """Against float64: the bias added first, then the repetition penalty over the prompt and output,
    then frequency * count + presence subtracted for each token the output holds (not the prompt's);
    a token twice in logit_bias gets both biases; the input row is left as it was."""
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal(50) * 3).astype(np.float32)
    before = logits.copy()
    prompt, output = [1, 2, 2, 3], [3, 4, 4, 4, 5]
    bias = ((4, 2.5), (7, -1.0), (7, 0.5))
    got = penalize(logits, prompt, output, 1.5, 0.25, 0.5, bias)
    ref = logits.astype(np.float64)
    for t, b in bias:
        ref[t] += b
    for t in set(prompt) | set(output):
        ref[t] = ref[t] / 1.5 if ref[t] > 0 else ref[t] * 1.5
    for t in set(output):
        ref[t] -= 0.5 * output.count(t) + 0.25
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(logits, before)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(penalize(logits, prompt, []), logits)  # nothing asked: nothing changed
    # what the engine passes, made once per request: the prompt as an array, the bias as BiasArrays
    np.testing.assert_array_equal(penalize(logits, np.array(prompt), output, 1.5, 0.25, 0.5, bias_arrays(bias)), got)
    np.testing.assert_array_equal(penalize(logits, prompt, [], logit_bias=bias_arrays(())), logits)


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1e-50), dict(repetition_penalty=1e-30),
                                dict(repetition_penalty=1e300), dict(repetition_penalty=1e39),
                                dict(logit_bias=((2, 1e39), (5, -1e39))),
                                dict(logit_bias=((2, 3e38), (2, 3e38)), repetition_penalty=1e-20)])
def test_penalize_outside_float32s_range_keeps_the_limits_meaning(kw):
    """A repetition penalty or a bias past float32's range (taken, as vLLM takes any penalty > 0) gives
    no RuntimeWarning, no +inf (sampling's softmax of it is NaN) and no NaN (0 * inf: a zero logit seen
    under a penalty that is inf in float32): a tiny penalty or a huge bias makes the token the most likely
    (at most float32's largest), a huge penalty sends a negative seen logit to -inf, a positive one to 0."""
    logits = np.array([-3.0, 0.0, 2.0, 5.0, 1.0, -1.0, 4.0], dtype=np.float32)
    prompt = [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = penalize(logits, prompt, [], **kw)
    assert not np.isnan(row).any() and not np.isposinf(row).any()
    assert row.dtype == np.float32
    rp = kw.get("repetition_penalty", 1.0)
    if rp < 1:  # the seen positive logit leads; the seen negative one goes to (nearly) 0
        assert int(np.argmax(row)) == 2 and row[2] >= 2e30 and -1e-19 < row[0] <= 0
    elif rp > 1:
        assert row[0] == -np.inf and row[1] == 0 and 0 <= row[2] < 1e-30
        np.testing.assert_array_equal(row[3:], logits[3:])
    else:
        assert int(np.argmax(row)) == 2 and row[5] == -np.inf
    assert sample(row[None], 1.0, rng=np.random.default_rng(0))[0] == np.argmax(row) or rp > 1
