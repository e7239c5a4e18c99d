"""`llmirc serve` as clients see it: the real server on a loopback port, driven by the `openai`
package, plain HTTP (httpx) and SGLang's frontend language.

One checkpoint (random Llama with a byte-level BPE tokenizer and a ChatML chat template) and one
bundle per module; references come from the same bundle loaded in this process (`Model`), from
`llmirc run`, and from numpy over `Model.score` logits for logprobs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

from helpers import CHATML, CORPUS, RunningServer, generated_text, make_checkpoint
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.runtime import load

pytestmark = pytest.mark.slow

LONG = " ".join(CORPUS[:4])  # ~40 tokens: more than two KV blocks of 16
CONTEXT = 16384
# Requests that must outlive a disconnect or a second request: seconds of decoding even on a fast
# host (the tiny model decodes about 8,500 tokens/s on a Sapphire Rapids core; 2000 tokens were
# over before a 0.2 s client timeout there).
LONG_RUN = CONTEXT - 256


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_checkpoint(root / "ckpt", "llama", tokenizer=True, max_position_embeddings=CONTEXT)
    config = json.loads((root / "ckpt" / "tokenizer_config.json").read_text())
    (root / "ckpt" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    compile_model(root / "ckpt", root / "m.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    return root / "m.llmir"


@pytest.fixture(scope="module")
def model(bundle):
    return load(bundle, kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def server(bundle):
    with RunningServer(bundle, "--served-model-name", "tiny", "--kv-cache-tokens", CONTEXT, "--max-num-seqs", 8,
                       "--max-num-batched-tokens", 256) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")] = float(value)
    return out


def sse(response: httpx.Response) -> list:
    """The data events of a server-sent event stream; the last must be [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - logits.max(-1, keepdims=True) - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True))


# -- OpenAI API ----------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == CONTEXT


def test_greedy_completion_equals_llmirc_run(client, bundle, model):
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "run", str(bundle), "--prompt", "the quick brown fox",
                        "--max-new-tokens", "12", "--ignore-eos", "--json", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ran = json.loads(r.stdout)
    out = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == ran["text"] and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(ran["prompt_token_ids"])
    ids = httpx.post(client.base_url.join("/generate").__str__(), json={
        "text": "the quick brown fox", "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                          "ignore_eos": True}}).json()["output_ids"]
    assert ids == ran["token_ids"] == model.generate(["the quick brown fox"], 12, ignore_eos=True)[0]


def test_streaming_completion_matches_and_reports_usage(server, client):
    full = client.completions.create(model="tiny", prompt=LONG, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="tiny", prompt=LONG, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 20
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": "tiny", "prompt": "the lazy dog", "max_tokens": 3, "stream": True}) as response:
        events = sse(response)
    assert all(e["object"] == "text_completion" for e in events)


def test_the_clients_request_id_names_the_response_as_vllm(server):
    """X-Request-Id becomes the response's id (cmpl-ID / chatcmpl-ID, streamed or not), as vLLM's
    _base_request_id; without it the body's request_id (vLLM's field), and without both a random id."""
    headers = {"x-request-id": "trace-42"}
    body = {"model": "tiny", "prompt": "the lazy dog", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", headers=headers, json=body).json()["id"] == "cmpl-trace-42"
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=headers, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "stream": True}) as response:
        assert {e["id"] for e in sse(response)} == {"chatcmpl-trace-42"}
    ids = {httpx.post(server.url + "/v1/completions", json=body).json()["id"] for _ in range(2)}
    assert len(ids) == 2 and all(i.startswith("cmpl-") and "trace" not in i for i in ids)
    assert httpx.post(server.url + "/v1/completions", json={**body, "request_id": "mine"}).json()["id"] == "cmpl-mine"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "request_id": "mine"}
    assert httpx.post(server.url + "/v1/chat/completions", json=chat).json()["id"] == "chatcmpl-mine"
    assert httpx.post(server.url + "/v1/chat/completions", headers=headers, json=chat).json()["id"] == \
        "chatcmpl-trace-42"  # (the header wins, as in vLLM)


def test_return_token_ids_accounts_for_every_streamed_token(server, model):
    body = {"model": "tiny", "prompt": "héllo wörld ✓ 日本", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    full = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    expected = model.generate(["héllo wörld ✓ 日本"], 24, ignore_eos=True)[0]
    assert full["token_ids"] == expected and full["prompt_token_ids"] == model.encode("héllo wörld ✓ 日本")
    chat = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
    chat_prompt = model.apply_chat_template(chat["messages"])
    assert httpx.post(server.url + "/v1/chat/completions", json=chat).json()["prompt_token_ids"] == chat_prompt
    for path, payload, prompt in (("/v1/completions", body, full["prompt_token_ids"]),
                                  ("/v1/chat/completions", chat, chat_prompt)):
        with httpx.stream("POST", server.url + path, json={**payload, "stream": True}) as response:
            events = sse(response)
        # vLLM's places: the first chunk's choice (completions), the first chunk (chat)
        firsts = [e.get("prompt_token_ids", e["choices"][0].get("prompt_token_ids")) for e in events]
        assert firsts[0] == prompt and not any(firsts[1:]), firsts
        ids = [t for e in events for t in e["choices"][0].get("token_ids", [])]
        text = "".join(e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content") or ""
                       for e in events)
        assert len(ids) == 24 and generated_text(model.tokenizer, ids) == text
        # one id per step, as generated: not held back with text waiting on a partial character
        assert max(len(e["choices"][0].get("token_ids", [])) for e in events) == 1, events
    assert ids == model.generate([model.apply_chat_template([{"role": "user", "content": "hi"}])], 24,
                                 ignore_eos=True)[0]


def test_repeated_long_prompt_is_served_from_the_prefix_cache(server, client):
    prompt = LONG + " and then some more words"
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    before = metrics(server)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    after = metrics(server)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0 or first.usage.prompt_tokens > 32
    assert cached >= 32 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert second.choices[0].text == first.choices[0].text
    # The prefill was skipped: the model ran only the uncached prompt tokens and the decode steps.
    computed = after["llmirc:computed_tokens_total"] - before["llmirc:computed_tokens_total"]
    assert computed == second.usage.prompt_tokens - cached + second.usage.completion_tokens - 1
    assert after["llmirc:prefix_cache_hits_total"] - before["llmirc:prefix_cache_hits_total"] == cached


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_usage_with_n_agrees_with_the_whole_response(server, path):
    """With n: 2 the prompt counts once, its cached tokens as its first choice found them: a stream's
    final usage says what the whole response says. Its continuous usage is, as vLLM's, each chunk's
    own choice (prompt and tokens so far) without cached tokens, which chunks sent before the prefill
    cannot know (they said 0, and later ones the real number; completion_tokens mixed the choices)."""
    text = LONG + " and the n of two"
    body = {"model": "tiny", "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 5, "ignore_eos": True,
            **({"prompt": text} if "chat" not in path else {"messages": [{"role": "user", "content": text}]})}
    httpx.post(server.url + path, json={**body, "n": 1})  # the prompt in the prefix cache: each run alike
    whole = httpx.post(server.url + path, json=body).json()["usage"]
    with httpx.stream("POST", server.url + path, json={**body, "stream": True, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}}) as response:
        events = sse(response)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole, (events[-1], whole)
    assert whole["prompt_tokens_details"]["cached_tokens"] >= 32 and whole["completion_tokens"] == 10
    for e in events[:-1]:
        assert len(e["choices"]) == 1 and set(e["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}, e
        assert e["usage"]["prompt_tokens"] == whole["prompt_tokens"], e
    last = {e["choices"][0]["index"]: e["usage"]["completion_tokens"] for e in events[:-1]}
    assert last == {0: 5, 1: 5}, last


def test_chat_completion_uses_the_chat_template(client, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    ids = model.apply_chat_template(messages)
    assert model.tokenizer.decode(ids) == model.tokenizer.decode(model.tokenizer.encode(
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False))
    expected = generated_text(model.tokenizer, model.generate([ids], 10, ignore_eos=True)[0])
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_stop_token_ids(client, model):
    full = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[5:8]
    at = full.find(stop)
    out = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:at] and out.choices[0].finish_reason == "stop"
    assert out.model_extra is not None and out.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the quick", max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == full[:at]
    tokens = model.generate(["the quick"], 16, ignore_eos=True)[0]
    out = client.completions.create(model="tiny", prompt="the quick", max_tokens=16, temperature=0,
                                    extra_body={"stop_token_ids": [tokens[3]], "ignore_eos": True})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == tokens[3]
    assert out.usage.completion_tokens == tokens.index(tokens[3]) + 1


def test_stop_token_text_is_left_out_unless_asked_for_as_vllm(client, model):
    """vLLM leaves the text of the stop token id that ended the request out of the output, unless
    include_stop_str_in_output (SGLang: no_stop_trim, on both its APIs), streamed or not."""
    prompt = "the lazy dog"
    tokens = model.generate([prompt], 16, ignore_eos=True)[0]

    def text(max_tokens, **extra):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_body={"ignore_eos": True, **extra}).choices[0].text

    # a stop token whose text shows (not one that ends mid-character), first generated where it stops
    at = next(i for i in range(1, 16) if tokens.index(tokens[i]) == i and text(i + 1) != text(i))
    stop = {"stop_token_ids": [tokens[at]]}
    assert text(16, **stop) == text(at) and text(16, **stop, include_stop_str_in_output=True) == text(at + 1)
    assert text(16, **stop, no_stop_trim=True) == text(at + 1)  # (SGLang's name on its OpenAI API)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True,
        extra_body={"ignore_eos": True, **stop}))
    assert streamed == text(at)
    for trim, want in ((False, text(at)), (True, text(at + 1))):
        sglang = httpx.post(str(client.base_url.join("/generate")), json={"text": prompt, "sampling_params": {
            "max_new_tokens": 16, "temperature": 0, "ignore_eos": True, **stop, "no_stop_trim": trim}}).json()
        assert sglang["text"] == want and sglang["output_ids"] == tokens[:at + 1]


def test_tokens_cut_mid_character_end_the_text_before_it_as_vllm(server, model):
    """Generation that stops in the middle of a character (max_tokens here) ends the text before
    it, as vLLM's detokenizer leaves such a tail out (it ended in U+FFFD); streamed or not, OpenAI
    or SGLang API. A stop string "\ufffd" is not met by what is left out."""
    tokens = model.generate(["the quick"], 24, ignore_eos=True)[0]
    ends = [model.tokenizer.decode(tokens[:k]).endswith("\ufffd") for k in range(25)]
    k = next(k for k in range(2, 25) if ends[k] and not ends[k - 1])  # text, then a token mid-character
    expected = model.tokenizer.decode(tokens[:k - 1])
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": k, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    streamed = "".join(e["choices"][0]["text"] for e in sse(httpx.post(server.url + "/v1/completions",
                                                                       json={**body, "stream": True})))
    sglang = httpx.post(server.url + "/generate", json={"text": "the quick", "sampling_params": {
        "max_new_tokens": k, "temperature": 0, "ignore_eos": True}}).json()
    assert whole["text"] == streamed == sglang["text"] == expected and whole["finish_reason"] == "length", \
        (whole, streamed, sglang["text"], expected)
    first = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 1, "stop": ["\ufffd"]}).json()
    assert ends[1] and first["choices"][0]["text"] == "" and first["choices"][0]["finish_reason"] == "length"


def test_n_seed_and_sampling_parameters(client):
    kwargs = dict(model="tiny", prompt="the quick", max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=11,
                  extra_body={"top_k": 50, "ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # each choice has its own generator (seed + i)
    assert first.usage.completion_tokens == 36
    batch = client.completions.create(model="tiny", prompt=["the quick", "the lazy"], max_tokens=3, n=2,
                                      temperature=0)
    assert len(batch.choices) == 4 and batch.choices[0].text == batch.choices[1].text


def test_integer_fields_take_integral_numbers_as_vllm(server):
    """JSON has one number type: 5.0 is taken for an integer field, as vLLM's (lax) models and SGLang
    take it (5.5 is a 400: BAD); a seed of -1 is no seed, as in vLLM's SamplingParams."""
    url = server.url
    body = {"prompt": [1, 2, 3], "max_tokens": 5, "n": 2, "top_k": 3, "seed": 7, "logprobs": 1, "temperature": 1.0,
            "stop_token_ids": [383], "ignore_eos": True}
    ints = httpx.post(url + "/v1/completions", json=body).json()
    floats = httpx.post(url + "/v1/completions", json={
        **body, "prompt": [1.0, 2.0, 3.0], "max_tokens": 5.0, "n": 2.0, "top_k": 3.0, "seed": 7.0, "logprobs": 1.0,
        "stop_token_ids": [383.0]}).json()
    assert [(c["text"], c["logprobs"]["tokens"]) for c in floats["choices"]] == \
        [(c["text"], c["logprobs"]["tokens"]) for c in ints["choices"]] and ints["usage"]["completion_tokens"] == 10
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3.0, "logprobs": True,
            "top_logprobs": 2.0}
    r = httpx.post(url + "/v1/chat/completions", json=chat)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2, r.text
    r = httpx.post(url + "/generate", json={"input_ids": [1.0, 2.0], "sampling_params": {
        "max_new_tokens": 3.0, "top_k": 1.0, "ignore_eos": True}, "return_logprob": True, "top_logprobs_num": 1.0})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 3, r.text
    unseeded = {"prompt": "the quick", "max_tokens": 12, "temperature": 1.0, "seed": -1, "ignore_eos": True}
    texts = {httpx.post(url + "/v1/completions", json=unseeded).json()["choices"][0]["text"] for _ in range(3)}
    assert len(texts) > 1, texts  # (-1 was the seed 2**64 - 1: the same text every time)


def test_unknown_fields_are_ignored_with_vllms_warning(server):
    """A field neither API knows (a misspelt parameter) is ignored, as in vLLM, and named in the server's log as
    vLLM's warning names it: "temprature" was ignored without a trace."""
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 2, "temprature": 0, "zz_extra": 1})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while "ignored: temprature, zz_extra" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "WARNING" in server.log.read_text() and "ignored: temprature, zz_extra" in server.log.read_text()


def test_logprobs_are_the_models_log_softmax(client, model):
    out = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=5, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    prompt = model.encode("the quick brown")
    tokens = model.generate([prompt], 5, ignore_eos=True)[0]
    ref = log_softmax(model.score(prompt + tokens))[len(prompt) - 1:-1]
    np.testing.assert_allclose(lp.token_logprobs, ref[np.arange(5), tokens], rtol=1e-4, atol=1e-4)
    for row, top in zip(ref, lp.top_logprobs):  # keyed by token text: tokens decoding alike (U+FFFD) merge
        best = np.sort(row)[::-1][:3]
        assert 1 <= len(top) <= 3 and all(np.isclose(best, v, atol=1e-4).any() for v in top.values())
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content or content[0].bytes


def test_top_logprobs_lead_with_the_sampled_token(server, model):
    """As vLLM: each position's top list starts with the sampled token, among the top-k or not,
    then the most likely others (completions: up to k + 1 entries; chat: the first k), streamed
    or not; completions' logprobs=0 still lists the sampled token."""
    text = model.tokenizer.token_text
    messages = [{"role": "user", "content": "the quick brown"}]
    for path, extra, prompt, k in (
            ("/v1/completions", {"prompt": "the quick brown", "logprobs": 2}, model.encode("the quick brown"), 2),
            ("/v1/completions", {"prompt": "the quick brown", "logprobs": 0}, model.encode("the quick brown"), 0),
            ("/v1/chat/completions", {"messages": messages, "logprobs": True, "top_logprobs": 2},
             model.apply_chat_template(messages), 2)):
        body = {"model": "tiny", "max_tokens": 12, "temperature": 1.0, "seed": 3, "ignore_eos": True,
                "return_token_ids": True, **extra}
        chat = "messages" in body
        choice = httpx.post(server.url + path, json=body).json()["choices"][0]
        tokens = choice["token_ids"]
        ref = log_softmax(model.score(prompt + tokens))[len(prompt) - 1:-1]
        expected = []  # (text, logprob) per position: the sampled token, then the k most likely without it
        for row, t in zip(ref, tokens):
            ids = [t, *(i for i in np.argsort(-row, kind="stable")[:k].tolist() if i != t)]
            pairs = [(text(i), row[i]) for i in ids]
            expected.append(pairs[:k] if chat else list(dict(pairs).items()))  # completions: keyed by text
        assert any(t != int(np.argmax(row)) for row, t in zip(ref, tokens))  # sampled outside the top: the case
        with httpx.stream("POST", server.url + path, json={**body, "stream": True}) as response:
            events = [e["choices"][0]["logprobs"] for e in sse(response) if e["choices"][0]["logprobs"]]
        key = "content" if chat else "top_logprobs"
        for positions in (choice["logprobs"][key], [x for e in events for x in e[key]]):  # whole, then streamed
            got = [[(c["token"], c["logprob"]) for c in p["top_logprobs"]] if chat else list(p.items())
                   for p in positions]
            assert len(got) == len(tokens)
            for g, e in zip(got, expected):
                assert [t for t, _ in g] == [t for t, _ in e] and np.allclose([v for _, v in g], [v for _, v in e],
                                                                               atol=1e-4), (g, e)


def test_echo_with_logprobs_scores_the_prompt(server, client, model):
    out = client.completions.create(model="tiny", prompt=LONG, max_tokens=0, echo=True, logprobs=1)
    prompt = model.encode(LONG)
    ref = log_softmax(model.score(prompt))
    lp = out.choices[0].logprobs
    assert out.choices[0].text == model.tokenizer.decode(prompt) and out.usage.completion_tokens == 0
    # as vLLM and OpenAI: the first prompt token is listed, without a logprob; each offset follows the
    # tokens before it (their text: "<s>" and partial UTF-8 included)
    assert lp.tokens[0] == model.tokenizer.token_text(prompt[0]) and len(lp.tokens) == len(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], ref[np.arange(len(prompt) - 1), prompt[1:]], rtol=1e-4,
                               atol=1e-4)
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(prompt))]
    events = sse(httpx.post(server.url + "/v1/completions", json={
        "model": "tiny", "prompt": LONG, "max_tokens": 2, "echo": True, "logprobs": 0, "stream": True,
        "temperature": 0, "ignore_eos": True}))
    first = events[0]["choices"][0]["logprobs"]
    assert first["tokens"][0] == lp.tokens[0] and first["token_logprobs"][0] is None
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events if e["choices"][0]["logprobs"]) == \
        len(prompt) + 2


def test_prompt_logprobs_truncation_and_token_ids_as_vllm(server, model):
    """vLLM's prompt_logprobs (each prompt position's {id: {logprob, rank, decoded_token}}, the prompt's
    token first with its rank among all, then the k most likely: the model's log-softmax), per choice in
    completions and once in chat; with echo's own logprobs beside them; truncate_prompt_tokens keeps the
    prompt's last k tokens; return_tokens_as_token_ids writes logprobs' tokens as token_id:ID."""
    prompt = model.encode(LONG)
    ref = log_softmax(model.score(prompt))
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 3,
                                                         "echo": True, "logprobs": 1}).json()
    got = r["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(prompt)
    for pos, (position, token) in enumerate(zip(got[1:], prompt[1:])):
        row = ref[pos]
        first = position[str(token)]
        assert list(position)[0] == str(token) and first["rank"] == int((row >= row[token]).sum())
        assert first["decoded_token"] == model.tokenizer.token_text(token)
        best = np.argsort(-row, kind="stable")[:3]
        assert {int(t) for t in position} == {token, *best.tolist()}
        for t in best:
            np.testing.assert_allclose(position[str(t)]["logprob"], row[t], atol=1e-4)
    assert all(len(top) <= 2 for top in r["choices"][0]["logprobs"]["top_logprobs"][1:len(prompt)])
    chat = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and all(len(p) == 1 for p in chat["prompt_logprobs"][1:])
    short = httpx.post(server.url + "/v1/completions", json={
        "prompt": prompt, "max_tokens": 1, "truncate_prompt_tokens": 5, "echo": True, "return_token_ids": True,
        "logprobs": 0, "return_tokens_as_token_ids": True}).json()
    assert short["usage"]["prompt_tokens"] == 5 and short["choices"][0]["prompt_token_ids"] == prompt[-5:]
    assert short["choices"][0]["logprobs"]["tokens"][0] == f"token_id:{prompt[-5]}"
    assert short["choices"][0]["text"].startswith(model.tokenizer.decode(prompt[-5:]))


def test_echo_repeats_a_text_prompt_as_given_as_vllm(server, client, model):
    """vLLM echoes a text prompt as the request gave it (special tokens written in it included),
    a prompt of token ids as their text."""
    text, ids = "the quick</s> brown", model.encode("the lazy dog")
    assert model.tokenizer.decode(model.encode(text)) != text  # (</s> is a special token: decoding drops it)
    for prompt, echo in (([text, text], text), ([ids, ids], model.tokenizer.decode(ids))):
        choices = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, n=2, echo=True,
                                            temperature=0, extra_body={"ignore_eos": True}).choices
        assert len(choices) == 4 and all(c.text.startswith(echo) for c in choices)
    out = client.completions.create(model="tiny", prompt=text, max_tokens=2, echo=True, temperature=0,
                                    extra_body={"ignore_eos": True})
    events = sse(httpx.post(server.url + "/v1/completions", json={
        "model": "tiny", "prompt": text, "max_tokens": 2, "echo": True, "stream": True, "temperature": 0,
        "ignore_eos": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == out.choices[0].text
    out = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True)
    assert out.choices[0].text == text


def assert_aborted(server, before: dict) -> None:
    """One request aborted since `before` (metrics), not finished (finish reason "length"), and its
    blocks freed. How many tokens it made first depends on the load: not checked."""
    deadline = time.monotonic() + 15
    while metrics(server)["llmirc:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = metrics(server)
    assert after["llmirc:num_requests_running"] == 0 and after["llmirc:kv_cache_usage_perc"] == 0
    for reason, more in (("abort", 1), ("length", 0)):
        key = f'llmirc:request_success_total{{finished_reason="{reason}"}}'
        assert after[key] == before[key] + more, reason


def test_disconnect_mid_stream_frees_the_blocks(server):
    before = metrics(server)
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": "tiny", "prompt": LONG, "max_tokens": LONG_RUN, "stream": True, "temperature": 0,
            "ignore_eos": True}) as response:
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(s.startswith("data: ") for s in seen)
        assert metrics(server)["llmirc:num_requests_running"] == 1
    assert_aborted(server, before)


def test_stream_headers_go_out_once_the_request_is_admitted(server):
    """A stream's 200 and headers go out as soon as its requests are admitted, as vLLM's do, not
    with the first token (a long prefill, or a wait for a free slot, left the client with nothing,
    not even a status); refusals found before that keep their status."""
    busy = {"prompt": "hi", "n": 8, "max_tokens": LONG_RUN, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=busy) as running:
        lines = running.iter_lines()  # (kept: a dropped iterator closes the stream)
        next(lines)  # 8 sequences run: every slot of --max-num-seqs 8 is taken
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=10) as waiting:
            assert waiting.status_code == 200 and waiting.headers["content-type"].startswith("text/event-stream")
            deadline = time.monotonic() + 5  # (the engine takes it in at its next step)
            while not metrics(server)["llmirc:num_requests_waiting"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metrics(server)["llmirc:num_requests_waiting"] >= 1  # it waits: not one token yet
            running.close()  # the 8 are aborted: the waiting request runs
            events = sse(waiting)
    assert events[-1]["choices"][0]["finish_reason"] == "length", events
    r = httpx.post(server.url + "/v1/chat/completions", json={**chat, "max_tokens": 10**6})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("which", ["server", "guarded"])
def test_disconnect_before_the_answer_frees_the_blocks(request, which):
    """A non-streaming request whose client gives up is aborted too (with and without an API key)."""
    server = request.getfixturevalue(which)
    before = metrics(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers={"authorization": "Bearer sekret"}, timeout=0.2, json={
            "prompt": LONG, "max_tokens": LONG_RUN, "temperature": 0, "ignore_eos": True})
    assert_aborted(server, before)


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").status_code == 200
    m = metrics(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "prefix_cache_hit_rate", "num_preemptions_total"):
        assert f"llmirc:{name}" in m
    assert m['llmirc:time_to_first_token_seconds_bucket{le="+Inf"}'] == m["llmirc:time_to_first_token_seconds_count"]


# -- bad requests ----------------------------------------------------------------------------------

BAD = {
    "malformed-json": ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    "nested-too-deeply": ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
                          "nested too deeply"),  # (valid JSON, past Python's parser depth)
    "invalid-utf8": ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "JSON"),
    "not-an-object": ("/v1/completions", b'[1, 2]', 400, "JSON object"),
    "max-tokens-wrong-type": ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    "temperature-wrong-type": ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    "prompt-wrong-type": ("/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    "messages-wrong-type": ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    "messages-empty": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "negative-max-tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    # vLLM's SamplingParams: at least one token (completions' echo with max_tokens 0 is the prompt alone)
    "max-tokens-zero": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400,
                        "max_tokens must be at least 1, got 0", "max_tokens"),
    "chat-max-tokens-zero": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 0}, 400, "max_tokens must be at least 1",
                             "max_tokens"),
    "chat-max-completion-tokens-zero": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                 "max_completion_tokens": 0}, 400,
                                        "max_completion_tokens must be at least 1", "max_completion_tokens"),
    # an integral float is an integer (vLLM's lax models); a fraction is not
    "max-tokens-fraction": ("/v1/completions", {"prompt": "hi", "max_tokens": 5.5}, 400,
                            "max_tokens: Input should be a valid integer, got a number with a fractional part",
                            "max_tokens"),
    "n-fraction": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1.5}, 400,
                   "n: Input should be a valid integer", "n"),
    "max-tokens-string": ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "valid integer", "max_tokens"),
    "sglang-max-new-tokens-fraction": ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2.5}}, 400,
                                       "max_new_tokens: Input should be a valid integer, got a number with a "
                                       "fractional part", "sampling_params"),
    "sglang-negative-max-new-tokens": ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400,
                                       "max_new_tokens must be at least 0", "sampling_params"),
    "huge-max-tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400,
                        f"maximum context length is {CONTEXT}"),
    "unknown-model": ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "gpt-9"),
    "prompt-over-context": ("/v1/completions", {"prompt": "the quick brown fox " * (CONTEXT // 3)}, 400,
                            f"maximum context length is {CONTEXT}"),
    "chat-over-context": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * (CONTEXT + 50)}]},
                          400,
                          f"maximum context length is {CONTEXT}"),
    "token-id-outside-vocab": ("/v1/completions", {"prompt": [1, 2, 5000]}, 400, "vocabulary of 384", "prompt"),
    "sglang-token-id-outside-vocab": ("/generate", {"input_ids": [1, 384]}, 400, "vocabulary of 384", "input_ids"),
    "temperature-nan": ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400,
                        "temperature", "temperature"),
    "temperature-infinite": ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": Infinity}', 400,
                             "temperature", "temperature"),
    "chat-template-per-request": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                           "chat_template": "{{ 1 }}"}, 400, "chat_template",
                                  "chat_template"),
    "sglang-over-context": ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": CONTEXT}}, 400,
                            f"maximum context length is {CONTEXT}", "sampling_params"),
    "top-p-zero": ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    "logprobs-too-many": ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    "stop-empty-string": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                   "stop": ["\n", ""]}, 400, "stop cannot contain an empty string",
                          "stop"),
    "stop-token-id-outside-vocab": ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2, 384]}, 400,
                                    "stop_token_ids: token id 384 is outside the model's vocabulary of 384",
                                    "stop_token_ids"),
    "min-tokens-past-max-tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400,
                                   "min_tokens must be an integer from 0 to max_tokens (2), got 3", "min_tokens"),
    "sglang-min-new-tokens-past-max": ("/generate", {"text": "hi", "sampling_params": {
        "max_new_tokens": 2, "min_new_tokens": 3}}, 400, "min_new_tokens must be in [0, max_new_tokens]",
                                       "sampling_params"),
    "presence-penalty-out-of-range": ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400,
                                      "presence_penalty must be in [-2, 2]", "presence_penalty"),
    "repetition-penalty-zero": ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400,
                                "repetition_penalty must be a finite number > 0", "repetition_penalty"),
    "min-p-above-one": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "min_p": 1.5},
                        400, "min_p must be in [0, 1]", "min_p"),
    "logit-bias-outside-vocab": ("/v1/completions", {"prompt": "hi", "logit_bias": {"384": 5}}, 400,
                                 "logit_bias: token id 384 is outside the model's vocabulary of 384", "logit_bias"),
    "logit-bias-not-an-id": ("/v1/completions", {"prompt": "hi", "logit_bias": {"the": 5}}, 400,
                             "logit_bias: 'the' is not a token id", "logit_bias"),
    "two-structured-outputs": ("/v1/completions", {"prompt": "hi", "guided_regex": "a+", "guided_choice": ["a"]}, 400,
                               "only one structured output may be given, got guided_regex and guided_choice",
                               "guided_choice"),
    "bad-guided-regex": ("/v1/completions", {"prompt": "hi", "guided_regex": "(a"}, 400,
                         "guided_regex: the regex format is not valid", "guided_regex"),
    # a grammar that matches no text: one line naming the field (was llguidance's parser state, and no param)
    "guided-regex-matching-nothing": ("/v1/completions", {"prompt": "hi", "guided_regex": "[^\\s\\S]"}, 400,
                                      "guided_regex: the grammar matches no text (no token can start it)",
                                      "guided_regex"),
    "guided-grammar-matching-nothing": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                 "guided_grammar": "root ::= root", "stream": True},
                                        400, "guided_grammar: the grammar matches no text (no token can start it)",
                                        "guided_grammar"),
    "structured-outputs-matching-nothing": ("/v1/completions", {"prompt": "hi", "structured_outputs": {
        "grammar": "start: start"}}, 400, "structured_outputs: the grammar matches no text", "structured_outputs"),
    "sglang-ebnf-matching-nothing": ("/generate", {"text": "hi", "sampling_params": {"ebnf": "root ::= root"}}, 400,
                                     "sampling_params: the grammar matches no text", "sampling_params"),
    "allowed-token-ids-the-grammar-does-not-allow": ("/v1/completions", {
        "prompt": "hi", "guided_choice": ["a"], "allowed_token_ids": [0]}, 400,
        "allowed_token_ids: the structured output allows none of these tokens at the start", "allowed_token_ids"),
    "allowed-token-ids-empty": ("/v1/completions", {"prompt": "hi", "allowed_token_ids": []}, 400,
                                "allowed_token_ids must be a non-empty list of token ids", "allowed_token_ids"),
    "bad-words-blank": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "bad_words": ["ok", " "]}, 400, "bad_words must be non-empty strings",
                        "bad_words"),
    "response-format-xml": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "response_format": {"type": "xml"}}, 400,
                            "response_format must be", "response_format"),
    "bad-guided-grammar": ("/v1/completions", {"prompt": "hi", "guided_grammar": "root ::= a"}, 400,
                           "guided_grammar: the grammar format is not valid: Failed to convert the grammar from "
                           "GBNF to Lark: Rule 'a' not found",
                           "guided_grammar"),
    "bad-response-format-structural-tag": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "structural_tag"}}, 400,
        "response_format: a structural tag must be", "response_format"),
    "unknown-structured-outputs-field": ("/v1/completions", {"prompt": "hi", "structured_outputs": {
        "regex": "a", "backend": "xgrammar"}}, 400, "structured_outputs has no field 'backend'", "structured_outputs"),
    "sglang-regex-and-json-schema": ("/generate", {"text": "hi",
                                                   "sampling_params": {"regex": "a", "json_schema": "{}"}},
                                     400, "only one of json_schema, regex may be given", "sampling_params"),
    "sglang-bad-ebnf": ("/generate", {"text": "hi", "sampling_params": {"ebnf": "root ::= ("}}, 400,
                        "sampling_params.ebnf: the grammar format is not valid", "sampling_params"),
    "sglang-penalty-out-of-range": ("/generate", {"text": "hi", "sampling_params": {"frequency_penalty": -3}}, 400,
                                    "frequency_penalty and presence_penalty in [-2, 2]", "sampling_params"),
    "special-tokens-kept": ("/v1/completions", {"prompt": "hi", "skip_special_tokens": False}, 400,
                            "skip_special_tokens"),
    "n-zero": ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n must be"),
    "image-content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "only text"),
    "text-part-without-text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "txt": "hi"}]}]}, 400, "a text part needs a string 'text', got None", "messages"),
    "audio-modality": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                "modalities": ["text", "audio"]}, 400, "modalities", "modalities"),
    "sglang-image": ("/generate", {"text": "hi", "image_data": "http://x/cat.png"}, 400,
                     "image_data is not supported", "image_data"),
    "sglang-lora": ("/generate", {"text": "hi", "lora_path": "my-lora"}, 400, "lora_path", "lora_path"),
    "sglang-hidden-states": ("/generate", {"text": "hi", "return_hidden_states": True}, 400,
                             "return_hidden_states is not supported by llmirc", "return_hidden_states"),
    "sglang-image-in-a-batch": ("/generate", {"text": ["hi", "yo"], "image_data": [None, "http://x/cat.png"]}, 400,
                                "image_data", "image_data"),
    "sglang-no-prompt": ("/generate", {"sampling_params": {}}, 400, "text and input_ids"),
    "sglang-bad-param": ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "many"}}, 400,
                         "max_new_tokens"),
    "sglang-bad-regex": ("/generate", {"text": "hi", "sampling_params": {"regex": "(a"}}, 400,
                         "sampling_params.regex: the regex format is not valid", "sampling_params"),
    "sglang-stop-empty-string": ("/generate", {"text": "hi", "sampling_params": {"stop": [""]}}, 400, "empty string",
                                 "sampling_params"),
    "sglang-stop-token-id-outside-vocab": ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [384]}},
                                           400, "outside the model's vocabulary", "sampling_params"),
    "sglang-stop-empty-string-in-a-list": ("/generate", {"text": "hi", "sampling_params": {"stop": ["\n", ""]}}, 400,
                                           "stop cannot contain an empty string", "sampling_params"),
    "sglang-logprob-start-past-prompt": ("/generate", {"input_ids": [1, 2, 3], "return_logprob": True,
                                                       "logprob_start_len": 3}, 400,
                                         "logprob_start_len must be -1 or a prompt position (0 to 2)",
                                         "logprob_start_len"),
    # vLLM fields that change the output and that llmirc does not implement: refused, not ignored
    "guided-json-not-json": ("/v1/completions", {"prompt": "hi", "guided_json": "{not json"}, 400,
                             "guided_json: the JSON schema is not JSON", "guided_json"),
    "prompt-logprobs-streamed": ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400,
                                 "prompt_logprobs are not available with stream: true", "prompt_logprobs"),
    "prompt-logprobs-whole-vocabulary": ("/v1/completions", {"prompt": "hi", "prompt_logprobs": -1}, 400,
                                         "prompt_logprobs must be between 0 and 20, got -1", "prompt_logprobs"),
    "truncate-prompt-tokens-past-the-context": ("/v1/completions", {"prompt": "hi",
                                                                    "truncate_prompt_tokens": 10**6}, 400,
                                                "truncate_prompt_tokens (1000000) is greater than the context",
                                                "truncate_prompt_tokens"),
    "bad-guided-whitespace-pattern": ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "object"},
                                                          "guided_whitespace_pattern": "[ ]("}, 400,
                                      "guided_json: the json format is not valid", "guided_json"),
    "beam-search": ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    "sglang-lora-on-openai": ("/v1/completions", {"prompt": "hi", "lora_path": "my-lora"}, 400,
                             "lora_path is not supported by llmirc", "lora_path"),
    "sglang-regex-and-guided-json": ("/v1/completions", {"prompt": "hi", "regex": "a", "guided_json": {}}, 400,
                                     "only one structured output may be given, got guided_json and regex", "regex"),
    "sglang-openai-stop-regex": ("/v1/completions", {"prompt": "hi", "stop_regex": "[0-9]"}, 400,
                                 "stop_regex is not supported", "stop_regex"),
    "prompt-embeds": ("/v1/completions", {"prompt": "hi", "prompt_embeds": "AAAA"}, 400,
                      "prompt_embeds is not supported", "prompt_embeds"),
    "bad-structural-tag": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                    "structural_tag": '{"structures": [], "triggers": []}'}, 400,
                           "structural_tag: a structural tag must be", "structural_tag"),
    "priority": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "priority": 3}, 400,
                 "priority is not supported by llmirc (only 0)", "priority"),
    "allowed-token-ids-outside-vocab": ("/v1/completions", {"prompt": "hi", "allowed_token_ids": [1, 384]}, 400,
                                        "allowed_token_ids: token id 384 is outside the model's vocabulary of 384",
                                        "allowed_token_ids"),
    "tools-auto": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400,
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set', "tool_choice"),
    "tool-choice-names-no-tool": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, "tool_choice names 'g', which is not one of the tools", "tool_choice"),
    "tool-parameters-not-a-schema": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "tools": [{"type": "function", "function": {
                                                                  "name": "f", "parameters": {"type": "nope"}}}],
                                                              "tool_choice": "required"}, 400,
                                     "tools: the json format is not valid", "tools"),
    "named-tool-parameters-bad-pattern": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tools: the json format is not valid",
        "tools"),
    "named-tool-choice-and-guided-regex": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "guided_regex": "a"}, 400,
        "guided_regex: a regex structured output cannot be given with a named tool_choice", "guided_regex"),
    "stream-options-without-stream": ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
                                      400, "stream: true", "stream_options"),
    "seed-beyond-64-bits": ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed: Input should be a 64-bit "
                            "integer", "seed"),
    "sglang-seed-beyond-64-bits": ("/generate", {"text": "hi", "sampling_params": {"sampling_seed": -2**63 - 1}}, 400,
                                   "sampling_seed: Input should be a 64-bit integer", "sampling_params"),
    # an integral float too large for any integer field: refused in a few words, not written out in 301 digits
    "n-1e300": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1e300}, 400,
                "n: Input should be a 64-bit integer, got 1e+300", "n"),
    # the same for an integer written out (top_k was accepted; others echoed all its digits)
    "top-k-beyond-64-bits": ("/v1/completions", {"prompt": "hi", "top_k": 10**19}, 400,
                             "top_k: Input should be a 64-bit integer, got an integer of 20 digits", "top_k"),
    "n-301-digits": ("/v1/completions", {"prompt": "hi", "n": 10**300}, 400,
                     "n: Input should be a 64-bit integer, got an integer of 301 digits", "n"),
    "more-sequences-than-the-server-takes": ("/v1/completions", {"prompt": [[1, 2]] * 9, "n": 128}, 400,
                                             "1152 sequences"),
    # text that is not Unicode (JSON's escape of a lone surrogate): a 400, not a 500
    "surrogate-prompt": ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800 abc"}',
                         400, "lone surrogate", "prompt"),
    "surrogate-chat": ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": '
                       b'"a \\udfff"}]}', 400, "lone surrogate", "messages"),
    "surrogate-sglang": ("/generate", b'{"text": "\\ud800"}', 400, "lone surrogate",
                         "text"),
    "surrogate-model-name": ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}',
                             404, "\\ud800"),
    # more prompts than the server takes at once: refused before any is tokenized (the last would fail to)
    "too-many-prompts": ("/v1/completions", b'{"prompt": [' + b'"hi", ' * 1100 + b'"\\ud800"]}', 400,
                         "the request asks for 1101 sequences"),
    "too-many-prompts-sglang": ("/generate", b'{"text": [' + b'"hi", ' * 1100 + b'"\\ud800"]}', 400,
                                "the request asks for 1101 sequences"),
    "empty-body": ("/v1/completions", b"", 400, "the request body is empty: a JSON object is expected"),
    "unknown-route": ("/v1/embeddings", {"input": "hi"}, 404, "Not Found"),
    "wrong-method": ("/health", {}, 405, "Method Not Allowed"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, client, case):
    path, body, status, needle, *param = BAD[case]  # param: the field the error names, where a case gives it
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server.url + path, json={"model": "tiny", **body} if path.startswith("/v1") else body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle.lower() in error["message"].lower() and error["code"] == status, error
    assert error["type"].endswith("Error") and error["type"] != "APIError", error  # a kind, as OpenAI's types
    assert error.get("param") is None or not error["param"].isdigit(), error  # a field, not a character offset
    assert not param or error["param"] == param[0], error
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=1).choices[0].finish_reason


def test_huge_prompt_is_refused_before_it_is_tokenized(server, model):
    """More characters than the context's tokens can stand for: a 400 at once (tokenizing 20 MB
    held every stream up for seconds and took a gigabyte)."""
    text = "a" * (4 * CONTEXT * model.tokenizer.max_token_chars + 1)
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and f"{len(text)} characters" in r.json()["error"]["message"], r.text
    assert model.tokenizer.max_token_chars == max(map(len, model.tokenizer.backend.get_vocab()))


def test_chat_echo_and_tools_as_vllm(server, model):
    """echo puts the last message's content first when it is the assistant's (being continued), as
    vLLM does, and nothing else of the prompt; tools with tool_choice "none" reach the template."""
    url = server.url + "/v1/chat/completions"
    continued = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two"}]
    r = httpx.post(url, json={"messages": continued, "max_tokens": 2, "echo": True, "continue_final_message": True,
                              "add_generation_prompt": False, "temperature": 0})
    plain = httpx.post(url, json={"messages": continued, "max_tokens": 2, "continue_final_message": True,
                                  "add_generation_prompt": False, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == "one two" + plain.json()["choices"][0]["message"]["content"]
    asked = [{"role": "user", "content": "count"}]
    r = httpx.post(url, json={"messages": asked, "max_tokens": 2, "echo": True, "temperature": 0})
    plain = httpx.post(url, json={"messages": asked, "max_tokens": 2, "temperature": 0})
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    r = httpx.post(url, json={"messages": asked, "max_tokens": 1, "tools": tools, "tool_choice": "none"})
    assert r.status_code == 200, r.text


def test_tool_calls_as_vllm(bundle, model):
    """tool_choice named and required hold the text to the tools' schemas and answer tool calls (openai's
    client, streamed and not: the same calls); auto, with --enable-auto-tool-choice --tool-call-parser
    hermes, finds the model's <tool_call> blocks (here forced by a guided regex: a random model writes
    none); one of the two flags alone is a usage error."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]}}}]  # (closed by llmirc)
    # (whitespace biased away: JSON allows it anywhere, and a random model writes it to max_tokens)
    spaces = {str(t): -100 for t in range(model.vocab_size) if model.tokenizer.token_text(t).isspace()}
    asked = dict(model="tiny", messages=[{"role": "user", "content": "add"}], tools=tools, max_tokens=64,
                 temperature=0, logit_bias=spaces)

    def streamed(client, **kw):
        content, calls, reason = "", {}, None
        for chunk in client.chat.completions.create(**asked, **kw, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for t in delta.tool_calls or ():
                if t.id:
                    calls[t.index] = [t.function.name, ""]
                calls[t.index][1] += t.function.arguments or ""
            reason = chunk.choices[0].finish_reason or reason
        return content, [tuple(c) for c in calls.values()], reason

    def plain(client, **kw):
        choice = client.chat.completions.create(**asked, **kw).choices[0]
        calls = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or ()]
        return choice.message.content, calls, choice.finish_reason

    with RunningServer(bundle, "--served-model-name", "tiny", "--kv-cache-tokens", 2048, "--enable-auto-tool-choice",
                       "--tool-call-parser", "hermes") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        named = plain(client, tool_choice={"type": "function", "function": {"name": "add"}})
        assert named[0] == "" and named[1][0][0] == "add" and json.loads(named[1][0][1])["x"] in (1, 2), named
        assert set(json.loads(named[1][0][1])) == {"x"}  # (a tool's objects take no keys it does not list)
        assert named[2] == "stop" and streamed(client, tool_choice={"type": "function", "function": {
            "name": "add"}}) == ("", named[1], "stop")
        required = plain(client, tool_choice="required")
        assert required[2] == "tool_calls" and all(n == "add" and json.loads(a) in ({"x": 1}, {"x": 2}) for n, a in
                                                   required[1]), required
        assert streamed(client, tool_choice="required") == ("", required[1], "tool_calls")
        call = '<tool_call>{"name": "add", "arguments": {"x": 2}}</tool_call>'
        forced = dict(extra_body={"guided_regex": "Sure[.]" + re.escape(call)})
        auto = plain(client, **forced)
        assert auto == ("Sure.", [("add", '{"x": 2}')], "tool_calls") == streamed(client, **forced), auto
        assert plain(client, extra_body={"guided_regex": "nocall"}) == ("nocall", [], "stop")
        # the next turn of an agent's loop: the call as the client got it, the tool's answer
        called = client.chat.completions.create(**asked, tool_choice="required").choices[0].message
        turn = asked["messages"] + [called.model_dump(exclude_none=True), {
            "role": "tool", "tool_call_id": called.tool_calls[0].id, "content": "3"}]
        assert client.chat.completions.create(**{**asked, "messages": turn}).choices[0].message.content is not None
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "serve", str(bundle), "--enable-auto-tool-choice"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--enable-auto-tool-choice and --tool-call-parser go together" in r.stderr, r.stderr


def test_reasoning_parser_as_vllm(bundle):
    """serve --reasoning-parser qwen3: the <think> text is message.reasoning_content (and reasoning), streamed
    as delta.reasoning_content, apart from the content, where the tool calls are found; a structured output
    (here a regex) holds only after </think> when the prompt leaves the reasoning open (the CHATML template:
    the model may think first), from the start when the prompt closed it (here a continued assistant
    message ending in </think>; the guided text then writes the model's own think block)."""
    call = '<tool_call>{"name": "add", "arguments": {"x": 2}}</tool_call>'
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    asked = dict(model="tiny", messages=[{"role": "user", "content": "add"}], max_tokens=200, temperature=0)
    closed = dict(messages=[*asked["messages"], {"role": "assistant", "content": "<think>done</think>"}])
    continued = {"continue_final_message": True, "add_generation_prompt": False}
    with RunningServer(bundle, "--served-model-name", "tiny", "--kv-cache-tokens", 2048, "--enable-auto-tool-choice",
                       "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        thought = {**asked, **closed, "tools": tools, "extra_body": {
            **continued, "guided_regex": "<think>hmm</think>" + re.escape(call)}}
        message = client.chat.completions.create(**thought).choices[0].message
        assert message.reasoning_content == message.reasoning == "hmm" and message.content is None
        assert message.tool_calls[0].function.arguments == '{"x": 2}', message
        chunks = list(client.chat.completions.create(**thought, stream=True))
        assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == "hmm"
        assert [t.function.name for c in chunks for t in c.choices[0].delta.tool_calls or ()] == ["add"]
        free = client.chat.completions.create(**{**asked, "max_tokens": 8}, extra_body={"guided_regex": "yes|no"})
        assert free.choices[0].message.content not in ("yes", "no") and free.choices[0].finish_reason == "length"
        answer = client.chat.completions.create(**{**asked, **closed},
                                                extra_body={**continued, "guided_regex": "yes|no"})
        assert answer.choices[0].message.content in ("yes", "no"), answer
        # a named tool choice whose text is still thinking at max_tokens: no content and no call, streamed too (the
        # stream answered a call of the function with empty arguments)
        still = {**asked, "max_tokens": 4, "tools": tools,
                 "tool_choice": {"type": "function", "function": {"name": "add"}},
                 "messages": [*asked["messages"], {"role": "assistant", "content": "<think>let me"}],
                 "extra_body": continued}
        message = client.chat.completions.create(**still).choices[0].message
        assert message.content is None and not message.tool_calls and message.reasoning_content, message
        chunks = list(client.chat.completions.create(**still, stream=True))
        assert not any(c.choices[0].delta.tool_calls or c.choices[0].delta.content for c in chunks), chunks
        assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == \
            message.reasoning_content


def test_responses_api_as_vllm(server, client):
    """OpenAI's Responses API through the openai client: a string input with instructions answers what the chat
    API answers for a system and a user message (output_text), cut at max_output_tokens as status incomplete;
    streamed, the events (numbered from 0) add up to the same text and end with the final response; function
    tools with a named tool choice give a function_call item (its arguments streamed as deltas), and an
    agent's next turn (the call and its output as input items) is answered; text.format json_schema holds the
    text; what llmirc cannot do is a 400 naming it, and no response is stored (GET is a 404)."""
    chat = client.chat.completions.create(model="tiny", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    asked = dict(model="tiny", input="hello", instructions="be brief", max_output_tokens=8, temperature=0)
    r = client.responses.create(**asked)
    assert r.output_text == chat.choices[0].message.content and r.status == "incomplete", r
    assert r.incomplete_details.reason == "max_output_tokens" and r.id.startswith("resp_")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
    events = list(client.responses.create(**asked, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.content_part.added"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == r.output_text
    # (no whitespace in the arguments: JSON allows it anywhere, and a random model writes it to max_output_tokens)
    tools = [{"type": "function", "name": "add", "parameters": {
        "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False}}}]
    called = client.responses.create(model="tiny", input="add", tools=tools, max_output_tokens=64, temperature=0,
                                     tool_choice={"type": "function", "name": "add"})
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "add" and json.loads(calls[0].arguments)["x"] in (1, 2), called.output
    streamed = list(client.responses.create(model="tiny", input="add", tools=tools, max_output_tokens=64,
                                            temperature=0, tool_choice={"type": "function", "name": "add"},
                                            stream=True))
    assert "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta") == \
        calls[0].arguments and streamed[-1].response.output[0].arguments == calls[0].arguments
    turn = [{"role": "user", "content": "add"}, {"type": "function_call", "call_id": calls[0].call_id, "name": "add",
                                                 "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "3"}]
    assert client.responses.create(model="tiny", input=turn, max_output_tokens=4).status == "incomplete"
    schema = {"type": "json_schema", "name": "n", "schema": {"enum": ["yes", "no"]}}
    answer = client.responses.create(model="tiny", input="hi", max_output_tokens=20, temperature=0,
                                     text={"format": schema})
    assert json.loads(answer.output_text) in ("yes", "no"), answer
    for body, needle in (({"tools": [{"type": "web_search"}]}, "tools of type 'web_search' are not supported"),
                         ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                          "only text parts are supported, got 'input_image'"),
                         ({"previous_response_id": "resp_1"}, "previous_response_id is not supported")):
        r = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "hi", **body})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = httpx.get(server.url + "/v1/responses/resp_1")
    assert r.status_code == 404 and "llmirc keeps no responses" in r.json()["error"]["message"], r.text


def test_a_forced_tool_call_replaces_the_response_format_as_vllm(server, model):
    """A named or required tool choice with a response_format (chat) or text.format (Responses) answers the call,
    held to the tool's schema, as vLLM's tool parsers' adjust_request drops the format (was a 400): instructor's
    RESPONSES_TOOLS mode sends its model as both, and the OpenAI Agents SDK an output_type beside tool_choice."""
    params = {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}
    schema = {"type": "json_schema", "json_schema": {"name": "Out", "schema": {"enum": ["yes", "no"]}}}
    # (whitespace biased away: required's array takes it anywhere, and a random model writes it to max_tokens)
    spaces = {str(t): -100 for t in range(model.vocab_size) if model.tokenizer.token_text(t).isspace()}
    for choice, response_format in (({"type": "function", "function": {"name": "add"}}, schema),
                                    ("required", {"type": "json_object"})):
        r = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "add"}], "max_tokens": 64, "temperature": 0,
            "logit_bias": spaces, "tools": [{"type": "function", "function": {"name": "add", "parameters": params}}],
            "tool_choice": choice, "response_format": response_format})
        assert r.status_code == 200, r.text
        calls = r.json()["choices"][0]["message"].get("tool_calls")
        assert calls and all(c["function"]["name"] == "add" and json.loads(c["function"]["arguments"])["x"] in (1, 2)
                             for c in calls), r.json()
    # instructor 1.17's RESPONSES_TOOLS request, as it sent it
    person = {"properties": {"name": {"title": "Name", "type": "string", "maxLength": 8}, "age": {
        "title": "Age", "type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "age"],
        "title": "Person", "type": "object", "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False}}
    r = httpx.post(server.url + "/v1/responses", json={
        "input": [{"role": "user", "content": "Alice is 30 years old. Extract the person."}], "max_output_tokens": 100,
        "model": "tiny", "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "Person", "strict": True, "schema": person}},
        "tool_choice": {"type": "function", "name": "Person"},
        "tools": [{"type": "function", "name": "Person", "parameters": person, "description": "Correctly extracted"}]})
    assert r.status_code == 200, r.text
    calls = [item for item in r.json()["output"] if item["type"] == "function_call"]
    assert calls and calls[0]["name"] == "Person", r.json()
    assert set(json.loads(calls[0]["arguments"])) == {"name", "age"}, r.json()
    # vLLM's own structured_outputs (guided_*) of kind json, regex or choice beside a named tool stay a 400, as
    # vLLM's validator has it (test_a_forced_tool_call_replaces_vllms_structured_outputs: the others)
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "add"}], "guided_regex": "a",
        "tools": [{"type": "function", "function": {"name": "add", "parameters": params}}],
        "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert r.status_code == 400 and "cannot be given with a named tool_choice" in r.text, r.text


@pytest.mark.parametrize("choice,given", [
    ("required", {"guided_regex": "a+"}),
    ("required", {"structured_outputs": {"choice": ["yes", "no"]}}),
    ("required", {"guided_json": {"type": "string"}, "response_format": {"type": "json_object"}}),
    ({"type": "function", "function": {"name": "add"}}, {"guided_grammar": 'root ::= "a"'}),
    ({"type": "function", "function": {"name": "add"}}, {"structured_outputs": {"grammar": 'root ::= "a"'}}),
    ({"type": "function", "function": {"name": "add"}}, {"ebnf": 'root ::= "a"'}),
])
def test_a_forced_tool_call_replaces_vllms_structured_outputs(server, model, choice, given):
    """tool_choice required beside any of vLLM's structured outputs (structured_outputs, guided_*, and SGLang's
    names for them), and a named tool beside a grammar or structural tag, answer the call held to the tool's
    schema, as vLLM's tool parsers' adjust_request replaces structured_outputs with it (they were 400s)."""
    params = {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}
    spaces = {str(t): -100 for t in range(model.vocab_size) if model.tokenizer.token_text(t).isspace()}
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "add"}], "max_tokens": 64, "temperature": 0,
        "logit_bias": spaces, "tools": [{"type": "function", "function": {"name": "add", "parameters": params}}],
        "tool_choice": choice, **given})
    assert r.status_code == 200, r.text
    calls = r.json()["choices"][0]["message"].get("tool_calls")
    assert calls and all(c["function"]["name"] == "add" and json.loads(c["function"]["arguments"])["x"] in (1, 2)
                         for c in calls), r.json()


def test_the_servers_connections_send_without_nagles_delay():
    """serve's accepted connections have TCP_NODELAY: a response is two writes (headers, body), and with
    Nagle's algorithm the body waited for the client's delayed ACK, 40 ms on Linux, on every request after
    a connection's first (a keep-alive client's 1-token completion took 60 ms, 17 without;
    benchmarks/serve_latency.py). asyncio sets it only on sockets made with proto IPPROTO_TCP."""
    import socket

    from llmirc.cli import listen

    with listen("127.0.0.1", 0) as sock, socket.create_connection(sock.getsockname()):
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_tokenize_detokenize_version_and_model_card(server, model):
    """vLLM's /tokenize (a prompt, or chat messages as the chat endpoint sees them), /detokenize,
    /version, GET /v1/models/{id} (OpenAI's retrieve) and HEAD /health, /ping."""
    url = server.url
    r = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": "the quick brown fox", "return_token_strs": True})
    ids = model.encode("the quick brown fox")
    assert r.json() == {"count": len(ids), "max_model_len": CONTEXT, "tokens": ids,
                        "token_strs": [model.tokenizer.backend.id_to_token(t) for t in ids]}
    messages = [{"role": "user", "content": "hello there"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages})
    assert r.json()["tokens"] == model.apply_chat_template(messages)
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == r.json()["count"]
    r = httpx.post(url + "/detokenize", json={"tokens": ids})  # special tokens kept, as vLLM's tokenizer.decode(ids)
    assert r.json() == {"prompt": "<s>the quick brown fox"} and ids[0] == model.tokenizer.bos_token_id, r.text
    r = httpx.post(url + "/detokenize", json={"tokens": [1, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert httpx.post(url + "/tokenize", json={"prompt": "a", "messages": messages}).status_code == 400
    assert httpx.get(url + "/version").json()["version"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.head(url + "/health").status_code == httpx.get(url + "/ping").status_code == 200


def test_detokenize_takes_ids_of_a_padded_vocabulary(tmp_path):
    """Logits often outnumber the tokenizer's tokens (Qwen's 151936 for 151669): the ids between
    can be generated, and /detokenize takes them, decoded to nothing, as vLLM's tokenizer does."""
    import asyncio

    from llmirc.server.app import APIError, Server, ServerOptions
    from llmirc.server.openai_api import DetokenizeRequest, detokenize

    make_checkpoint(tmp_path / "ckpt", "llama", tokenizer=True, vocab_size=400)  # (a tokenizer of 384)
    compile_model(tmp_path / "ckpt", tmp_path / "m.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    model = load(tmp_path / "m.llmir", kv_cache_tokens=64)
    server = Server(model, ServerOptions("m"))
    ids = model.encode("the quick brown fox")
    assert model.tokenizer.vocab_size < 399 < model.vocab_size
    got = asyncio.run(detokenize(server, DetokenizeRequest(tokens=ids + [399])))
    assert got == {"prompt": "<s>the quick brown fox"}  # (special tokens kept, as vLLM's)
    with pytest.raises(APIError, match="token id 400 is outside the vocabulary of 400"):
        asyncio.run(detokenize(server, DetokenizeRequest(tokens=[400])))


def test_null_fields_odd_text_and_special_tokens_as_vllm(server, model):
    """null where vLLM's fields are Optional (the openai SDK sends it for None), null message
    content rendered as empty text, a lone surrogate in an SGLang rid echoed escaped (it was a
    500), add_special_tokens on completions and /tokenize."""
    url = server.url
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": None, "echo": None,
                                                  "return_token_ids": None, "n": None})
    assert r.status_code == 200, r.text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "again"}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "logprobs": None,
                                                       "stream": None})
    as_empty = [{**m, "content": m["content"] or ""} for m in messages]
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(model.apply_chat_template(as_empty))
    r = httpx.post(url + "/generate", content=b'{"text": "hi", "rid": "\\ud800", "sampling_params": '
                   b'{"max_new_tokens": 1}}', headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "\ud800", r.text
    for special in (True, False):
        r = httpx.post(url + "/tokenize", json={"prompt": "hi there", "add_special_tokens": special})
        assert r.json()["tokens"] == model.tokenizer.encode("hi there", add_special_tokens=special)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi there", "max_tokens": 1,
                                                      "add_special_tokens": special})
        assert r.json()["usage"]["prompt_tokens"] == len(model.tokenizer.encode("hi there", special))


def test_chat_template_kwargs_override_the_request(server, model):
    """As in vLLM, chat_template_kwargs win over the request's own add_generation_prompt (and the
    like); 'messages' cannot be set there."""
    messages = [{"role": "user", "content": "hello there"}]
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, json={"messages": messages, "max_tokens": 1,
                              "chat_template_kwargs": {"add_generation_prompt": False}})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
        model.apply_chat_template(messages, add_generation_prompt=False))
    r = httpx.post(url, json={"messages": messages, "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    r = httpx.post(url, json={"messages": messages, "max_tokens": 1, "chat_template_kwargs": {"self": 1}})
    assert r.status_code == 200, r.text  # a template variable like any other


def test_default_chat_template_kwargs_under_the_requests(bundle, model):
    """serve --default-chat-template-kwargs (vLLM's flag): every chat request's template variables,
    which a request's own chat_template_kwargs override; /tokenize renders alike."""
    messages = [{"role": "user", "content": "hello there"}]
    without = len(model.apply_chat_template(messages, add_generation_prompt=False))
    with RunningServer(bundle, "--kv-cache-tokens", 256, "--default-chat-template-kwargs",
                       '{"add_generation_prompt": false}') as s:
        url = s.url + "/v1/chat/completions"
        r = httpx.post(url, json={"messages": messages, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == without, r.text
        assert httpx.post(s.url + "/tokenize", json={"messages": messages}).json()["count"] == without
        r = httpx.post(url, json={"messages": messages, "max_tokens": 1,
                                  "chat_template_kwargs": {"add_generation_prompt": True}})
        assert r.json()["usage"]["prompt_tokens"] == len(model.apply_chat_template(messages))
    r = subprocess.run([sys.executable, "-m", "llmirc.cli", "serve", str(bundle), "--default-chat-template-kwargs",
                        "[1]"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--default-chat-template-kwargs: expected a JSON object" in r.stderr, r.stderr


def test_chat_template_errors_do_not_show_the_servers_paths(bundle):
    template = bundle.parent / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
                        "{% endif %}{{ m.content }}{% endfor %}")
    with RunningServer(bundle, "--chat-template", template) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "system", "content": "hi"}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["message"].startswith("chat template: ") and "no system" in \
        error["message"] and str(bundle.parent) not in error["message"], error


def test_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)


# -- API key and overload --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(bundle):
    with RunningServer(bundle, "--api-key", "sekret", "--max-num-seqs", 1, "--max-num-batched-tokens", 64,
                       "--max-queued-requests", 0, "--allowed-origins", '["https://app.example"]',
                       "--max-body-bytes", 4096) as s:
        yield s


@pytest.fixture(scope="module")
def small_kv(bundle):
    """A server whose KV cache holds 64 tokens (a sequence's limit: the context is 16k)."""
    with RunningServer(bundle, "--kv-cache-tokens", 64) as s:
        yield s


def test_chat_without_max_tokens_fits_a_smaller_kv_cache(small_kv):
    """Chat's default max_tokens is the rest of what one sequence can hold: with a KV cache of 64
    tokens on a 16k context, 64 - prompt (it was the rest of the context: refused every time)."""
    r = httpx.post(small_kv.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "temperature": 0}, timeout=60)
    usage = r.json()["usage"]
    assert r.status_code == 200 and usage["total_tokens"] == 64 and \
        r.json()["choices"][0]["finish_reason"] == "length", r.text
    r = httpx.post(small_kv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and \
        "KV cache holds 64 tokens (--kv-cache-tokens)" in r.json()["error"]["message"], r.text
    # a prompt too long by itself: the error names it, not a max_tokens the request did not give
    r = httpx.post(small_kv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi " * 80}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = httpx.post(small_kv.url + "/v1/completions", json={"prompt": "hi " * 80})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_completions_max_tokens_null_is_the_rest_of_the_sequence(small_kv):
    """As in vLLM (get_max_tokens), completions' max_tokens of null is chat's default, the rest of
    what one sequence holds, per prompt; left out, it is 16 (it was 16 for null too)."""
    body = {"prompt": ["hi", "hello there"], "max_tokens": None, "ignore_eos": True, "temperature": 0}
    r = httpx.post(small_kv.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 2, r.text
    assert r.json()["usage"]["total_tokens"] == 2 * 64, r.text
    body.pop("max_tokens")
    assert httpx.post(small_kv.url + "/v1/completions", json=body).json()["usage"]["completion_tokens"] == 2 * 16
    r = httpx.post(small_kv.url + "/v1/completions", json={"prompt": "hi " * 80, "max_tokens": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_sglang_max_new_tokens_fits_a_smaller_kv_cache_as_sglang(small_kv):
    """SGLang's max_new_tokens: the default 128 (it was refused: "you requested 131 tokens", never
    asked for) and a number over the KV cache are clipped to what one sequence holds, as SGLang's
    scheduler clips to max_req_len, the finish_reason saying how many; null is no limit but that;
    over the context is SGLang's 400; a prompt that leaves no room for a token names the prompt."""
    url = small_kv.url + "/generate"
    for params, length in (({}, 61), ({"max_new_tokens": 100}, 61), ({"max_new_tokens": None}, 61),
                           ({"max_new_tokens": 40}, 40)):
        r = httpx.post(url, json={"text": "hi", "sampling_params": {**params, "ignore_eos": True}}, timeout=60)
        meta = r.json()["meta_info"]
        assert r.status_code == 200 and meta["completion_tokens"] == length and \
            meta["finish_reason"] == {"type": "length", "length": length}, (params, r.text)
    r = httpx.post(url, json={"text": "hi", "sampling_params": {"max_new_tokens": CONTEXT}})
    assert r.status_code == 400 and "maximum context length is 16384" in r.json()["error"]["message"], r.text
    r = httpx.post(url, json={"input_ids": list(range(1, 65))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_ids" and \
        "KV cache holds 64 tokens" in r.json()["error"]["message"], r.text
    r = httpx.post(url, json={"input_ids": list(range(1, 65)), "sampling_params": {"max_new_tokens": 0}})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 0, r.text


def test_sglang_prompt_over_the_context_names_the_prompt(server):
    """A prompt longer than the context is the prompt's fault whatever max_new_tokens says (SGLang's
    _validate_one_request checks the input first): it named sampling_params when max_new_tokens was given."""
    for params in ({"max_new_tokens": 0}, {"max_new_tokens": 5}, {}):
        r = httpx.post(server.url + "/generate", json={"input_ids": [0] * (CONTEXT + 1), "sampling_params": params})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_ids", (params, r.text)
        assert f"{CONTEXT + 1} in the input" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/generate", json={"input_ids": [0] * 8,
                                                   "sampling_params": {"max_new_tokens": CONTEXT}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params", r.text


def test_chat_template_given_inline(bundle, model):
    """--chat-template takes the template itself as well as a file, as vLLM's does; a chat request's
    `documents` (vLLM's field, for RAG templates) are the template's `documents`."""
    template = "{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}" \
               "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    with RunningServer(bundle, "--chat-template", template) as s:
        r = httpx.post(s.url + "/tokenize", json={"messages": [{"role": "user", "content": "hello"}]})
        assert r.json()["tokens"] == model.tokenizer.encode("<hello>", add_special_tokens=False), r.text
        r = httpx.post(s.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1, "return_token_ids": True,
            "documents": [{"title": "a", "text": "b"}]})
        assert r.json()["prompt_token_ids"] == model.tokenizer.encode("[a: b]<hello>", add_special_tokens=False), \
            r.text


def test_api_key_is_required(guarded):
    for path in ("/v1/models", "/generate", "/get_model_info", "/flush_cache"):
        r = httpx.request("POST" if path == "/generate" else "GET", guarded.url + path, json={"text": "hi"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    # health checks need no key: /ping is vLLM's (SageMaker's), which vLLM answers without one
    assert httpx.get(guarded.url + "/health").status_code == httpx.get(guarded.url + "/ping").status_code == 200
    assert httpx.get(guarded.url + "/health_generate").status_code == 200  # (SGLang's, open as there)
    assert httpx.head(guarded.url + "/ping").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model=str(guarded.proc.args[4]), prompt="hi", max_tokens=2).usage.total_tokens
    # the scheme's name is case-insensitive (RFC 9110); the key is not
    for header, status in (("bearer sekret", 200), ("BEARER sekret", 200), ("Bearer SEKRET", 401),
                           ("Basic sekret", 401), ("Bearersekret", 401), ("Bearer  sekret", 401)):
        assert httpx.get(guarded.url + "/v1/models", headers={"authorization": header}).status_code == status, header


def test_body_over_the_limit_is_413(guarded):
    """--max-body-bytes: a larger body is answered 413 in the API's error format, whether its
    Content-Length says so or it comes in chunks; the server goes on serving."""
    headers = {"authorization": "Bearer sekret"}

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"hello " * 100
        yield b'", "max_tokens": 2}'

    for body in ({"json": {"prompt": "hello " * 1000, "max_tokens": 2}},
                 {"content": chunks(), "headers": {**headers, "content-type": "application/json"}}):
        r = httpx.post(guarded.url + "/v1/completions", **{"headers": headers, **body})
        error = r.json()["error"]
        assert r.status_code == error["code"] == 413 and \
            "over this server's limit of 4096 bytes (llmirc serve --max-body-bytes)" in error["message"], r.text
    r = httpx.post(guarded.url + "/v1/completions", headers=headers, json={"prompt": "hello " * 100, "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("signals, code, within", [(("SIGTERM",), 143, (4.5, 8)),
                                                    (("SIGHUP",), 129, (4.5, 8)),  # (README: 129 hung up; was 143)
                                                    (("SIGINT", "SIGINT"), 0, (0, 3))])
def test_shutdown_ends_running_and_half_sent_requests(bundle, signals, code, within):
    """SIGTERM (or Ctrl-C): after the 5 s grace a running request ends with finish_reason "abort", a
    request whose body is still arriving gets a 503 (it held the shutdown another 5 s and left a
    CancelledError traceback), and serve exits with no traceback in its log. A second Ctrl-C
    does that at once (uvicorn's force exit cancelled them: 500s and tracebacks)."""
    import signal
    import socket
    import threading

    with RunningServer(bundle) as s:
        # not streamed: a stream's reader that lags (a loaded CI host) loses its end when the server exits
        answers = []
        running = threading.Thread(target=lambda: answers.append(httpx.post(s.url + "/v1/completions", json={
            "prompt": "hi", "max_tokens": LONG_RUN, "ignore_eos": True}, timeout=60)), daemon=True)
        running.start()
        deadline = time.monotonic() + 30
        while metrics(s).get("llmirc:num_requests_running", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stalled = socket.create_connection(("127.0.0.1", s.port))
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{")
        time.sleep(0.3)
        start = time.monotonic()
        for name in signals:
            s.proc.send_signal(getattr(signal, name))
            time.sleep(0.3)
        running.join(30)
        assert answers[0].json()["choices"][0]["finish_reason"] == "abort", answers[0].text
        stalled.settimeout(30)
        answer = stalled.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer, answer
        assert s.proc.wait(timeout=30) == code
        assert within[0] < time.monotonic() - start < within[1]
        stalled.close()
        log = s.log.read_text()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log


def test_a_request_ready_after_the_shutdown_stopped_requests_gets_503(model):
    """Once the shutdown's grace is over (requests aborted, `closing` set), a request whose body was
    in but which was still being tokenized or rendered is refused with 503, as one whose body is
    still arriving: it was admitted after the abort, ran on, and held the exit until uvicorn
    cancelled it 5 s later, its client left with no answer."""
    import asyncio

    from llmirc.runtime.engine import SamplingParams
    from llmirc.server.app import APIError, Server, ServerOptions

    server = Server(model, ServerOptions("tiny"))

    async def admit_after_shutdown():
        server.closing.set()
        admitted = server.admit([(model.encode("hi"), SamplingParams(max_tokens=1))])
        admitted.close()  # (not left in the module's engine)

    with pytest.raises(APIError, match="shutting down") as refusal:
        asyncio.run(admit_after_shutdown())
    assert refusal.value.status == 503 and server.in_flight == 0


def test_allowed_origins_cors(guarded, server):
    """--allowed-origins: a browser's preflight from a listed origin passes without the API key,
    the answer names the origin; another origin, or a server without the option, gets no grant."""
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    r = httpx.options(guarded.url + "/v1/completions", headers={"origin": "https://app.example", **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example", r.text
    r = httpx.get(guarded.url + "/v1/models", headers={"origin": "https://app.example",
                                                       "authorization": "Bearer sekret"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    for url, origin in ((guarded.url, "https://evil.example"), (server.url, "https://app.example")):
        r = httpx.options(url + "/v1/completions", headers={"origin": origin, **preflight})
        assert "access-control-allow-origin" not in r.headers, (url, r.headers)

def test_overload_is_503_and_clears(guarded):
    headers = {"authorization": "Bearer sekret"}
    with httpx.stream("POST", guarded.url + "/v1/completions", headers=headers, json={
            "prompt": LONG * 4, "max_tokens": LONG_RUN, "stream": True, "ignore_eos": True}) as busy:
        lines = busy.iter_lines()
        next(lines)
        r = httpx.post(guarded.url + "/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "overloaded" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        data = (line for line in lines if line.startswith("data: {"))
        assert len(list(itertools.islice(data, 500))) == 500  # the busy one was still running
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = httpx.post(guarded.url + "/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200


# -- SGLang's native API ---------------------------------------------------------------------------

def test_sglang_generate_text_ids_batch_and_logprobs(server, model):
    ids = model.encode("the quick brown")
    r = httpx.post(server.url + "/generate", json={
        "text": "the quick brown", "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True})
    out = r.json()
    expected = model.generate([ids], 6, ignore_eos=True)[0]
    meta = out["meta_info"]
    assert out["output_ids"] == expected and out["text"] == generated_text(model.tokenizer, expected)
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == 6
    ref = log_softmax(model.score(ids + expected))
    inputs = meta["input_token_logprobs"]
    assert inputs[0][0] is None and [t for _, t, _ in inputs] == ids and inputs[1][2] == model.tokenizer.token_text(
        ids[1])
    np.testing.assert_allclose([lp for lp, _, _ in inputs[1:]], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    np.testing.assert_allclose([lp for lp, _, _ in meta["output_token_logprobs"]],
                               ref[np.arange(len(ids) - 1, len(ids) + 5), expected], atol=1e-4)
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    by_ids = httpx.post(server.url + "/generate", json={  # (the fields llmirc refuses, neutral as clients send them)
        "input_ids": [ids, ids[:2]], "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        "image_data": [None, None], "lora_path": None, "modalities": [], "session_params": {},
        "return_hidden_states": False}).json()
    assert isinstance(by_ids, list) and by_ids[0]["output_ids"] == expected[:3], by_ids
    prefill_only = httpx.post(server.url + "/generate", json={
        "text": LONG, "sampling_params": {"max_new_tokens": 0}}).json()
    assert prefill_only["text"] == "" and prefill_only["meta_info"]["completion_tokens"] == 0
    again = httpx.post(server.url + "/generate", json={"text": LONG, "sampling_params": {"max_new_tokens": 1}}).json()
    assert again["meta_info"]["cached_tokens"] >= 32


def test_sglang_logprob_shapes_are_sglangs(server, model):
    """As SGLang's scheduler lists them: input_token_logprobs are prompt[logprob_start_len:], the first
    with a null logprob (it was the real logprob of prompt[s] for s > 0), and the default -1 is the
    last prompt token alone (it was no entry); input/output_top_logprobs only with top_logprobs_num > 0
    (they were lists of nulls without it)."""
    ids = [0, 5, 6, 7, 9]
    ref = log_softmax(model.score(ids))

    def meta(**fields):
        r = httpx.post(server.url + "/generate", json={"input_ids": ids, "return_logprob": True, **fields,
                                                       "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
        assert r.status_code == 200, r.text
        return r.json()["meta_info"]

    m = meta()
    assert m["input_token_logprobs"] == [[None, 9, None]] and len(m["output_token_logprobs"]) == 2
    assert "input_top_logprobs" not in m and "output_top_logprobs" not in m
    for start in (0, 2, 4):
        m = meta(logprob_start_len=start, top_logprobs_num=3)
        inputs = m["input_token_logprobs"]
        assert [t for _, t, _ in inputs] == ids[start:] and inputs[0][0] is None, inputs
        np.testing.assert_allclose([lp for lp, _, _ in inputs[1:]], ref[np.arange(start, len(ids) - 1),
                                                                        ids[start + 1:]], atol=1e-4)
        tops = m["input_top_logprobs"]
        assert len(tops) == len(inputs) and tops[0] is None and all(len(t) == 3 for t in tops[1:]), tops
        assert len(m["output_top_logprobs"]) == 2 and all(len(t) == 3 for t in m["output_top_logprobs"])
    m = meta(logprob_start_len=1, return_text_in_logprobs=True)
    assert m["input_token_logprobs"][0] == [None, 5, model.tokenizer.token_text(5)]
    assert "input_top_logprobs" not in m


def test_sglang_sampling_seed_and_null_parameters(server):
    """SGLang's sampling_params.sampling_seed makes a sampled answer reproducible (it was refused as
    an unknown field); null is a parameter's default, as in SGLang's SamplingParams."""
    def ids(**params):
        r = httpx.post(server.url + "/generate", json={"text": "the quick", "sampling_params": {
            "max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True, **params}})
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]

    assert ids(sampling_seed=5) == ids(sampling_seed=5.0) != ids(sampling_seed=6)
    assert ids(sampling_seed=7, top_k=None, top_p=None, stop=None) == ids(sampling_seed=7)
    r = httpx.post(server.url + "/generate", json={"text": "hi", "sampling_params": {"sampling_seed": 2**64}})
    assert r.status_code == 400 and "sampling_seed" in r.json()["error"]["message"], r.text


def test_sglang_null_logprob_fields_and_its_other_sampling_params(server):
    """GenerateReqInput's return_logprob, logprob_start_len and top_logprobs_num are Optional in
    SGLang, null meaning the default (they were refused with a 400); SamplingParams' stream_interval
    and custom_params change no answer and are taken (and a null structural_tag)."""
    body = {"text": "the quick", "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    plain = httpx.post(server.url + "/generate", json=body).json()
    nulls = httpx.post(server.url + "/generate", json={**body, "return_logprob": None, "logprob_start_len": None,
                                                       "top_logprobs_num": None})
    assert nulls.status_code == 200, nulls.text
    out = nulls.json()
    assert out["output_ids"] == plain["output_ids"] and "output_token_logprobs" not in out["meta_info"]
    asked = httpx.post(server.url + "/generate", json={**body, "return_logprob": True, "top_logprobs_num": None})
    assert asked.status_code == 200 and len(asked.json()["meta_info"]["output_token_logprobs"]) == 4, asked.text
    taken = {**body["sampling_params"], "stream_interval": 1, "custom_params": {"x": 1}, "logit_bias": {},
             "structural_tag": None}
    r = httpx.post(server.url + "/generate", json={**body, "sampling_params": taken})
    assert r.status_code == 200 and r.json()["output_ids"] == plain["output_ids"], r.text


def test_penalties_min_p_and_logit_bias_in_both_apis(server, model):
    """vLLM's repetition/presence/frequency penalties, logit_bias (string ids, biases clamped to
    [-100, 100]) and min_tokens and SGLang's same sampling_params (min_new_tokens) give the tokens the
    loader gives with them; min_p 1 leaves only the most likely token, so a seeded sample is the greedy one."""
    prompt = [5, 6, 7, 5, 6, 7]
    penalties = dict(repetition_penalty=1.6, presence_penalty=0.8, frequency_penalty=0.4)
    want = model.generate([prompt], max_new_tokens=10, ignore_eos=True, **penalties)[0]
    assert want != model.generate([prompt], max_new_tokens=10, ignore_eos=True)[0]
    body = {"prompt": prompt, "max_tokens": 10, "ignore_eos": True, "temperature": 0, "return_token_ids": True}
    r = httpx.post(server.url + "/v1/completions", json={**body, **penalties})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, r.text
    r = httpx.post(server.url + "/generate", json={"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 10, "ignore_eos": True, "temperature": 0, **penalties}})
    assert r.status_code == 200 and r.json()["output_ids"] == want, r.text
    r = httpx.post(server.url + "/v1/completions", json={**body, "logit_bias": {"17": 500}})
    assert r.json()["choices"][0]["token_ids"] == [17] * 10, r.text
    r = httpx.post(server.url + "/generate", json={"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 10, "ignore_eos": True, "temperature": 0, "logit_bias": {"17": 100.0}}})
    assert r.json()["output_ids"] == [17] * 10, r.text
    greedy = model.generate([prompt], max_new_tokens=10, ignore_eos=True)[0]
    r = httpx.post(server.url + "/v1/completions", json={**body, "temperature": 1.5, "seed": 3, "min_p": 1.0})
    assert r.json()["choices"][0]["token_ids"] == greedy, r.text
    # min_tokens / min_new_tokens: the request's stop id (its second greedy token) is not sampled before 5 tokens
    stop = dict(ignore_eos=True, stop_token_ids=[greedy[1]])
    held = model.generate([prompt], max_new_tokens=10, min_tokens=5, **stop)[0]
    assert len(held) >= 5 and greedy[1] not in held[:5]
    r = httpx.post(server.url + "/v1/completions", json={**body, **stop, "min_tokens": 5})
    assert r.json()["choices"][0]["token_ids"] == held, r.text
    r = httpx.post(server.url + "/generate", json={"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 10, "temperature": 0, "min_new_tokens": 5, **stop}})
    assert r.json()["output_ids"] == held, r.text
    # vLLM's allowed_token_ids and bad_words (two greedy tokens whose text tokenizes back to them as a bad word)
    r = httpx.post(server.url + "/v1/completions", json={**body, "allowed_token_ids": [40, 41, 42]})
    assert set(r.json()["choices"][0]["token_ids"]) <= {40, 41, 42}, r.text
    i = next(i for i in range(9) if model.tokenizer.encode(model.tokenizer.decode(greedy[i:i + 2]).lstrip(),
                                                           add_special_tokens=False) == greedy[i:i + 2])
    words = [model.tokenizer.decode(greedy[i:i + 2])]
    banned = model.generate([prompt], max_new_tokens=10, ignore_eos=True, bad_words=words)[0]
    assert banned[:i + 2] != greedy[:i + 2]
    r = httpx.post(server.url + "/v1/completions", json={**body, "bad_words": words})
    assert r.json()["choices"][0]["token_ids"] == banned, r.text


def test_logit_bias_keys_of_one_id_and_sglang_penalty_ranges(server):
    """Two logit_bias keys naming one id ("17" and "017") give it the last bias, as vLLM's
    {int(key): bias} dict (they were added: -100 + 100 left it unbiased); SGLang's repetition_penalty is
    refused past its range (0, 2], as SGLang's SamplingParams.verify (3 ran)."""
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "temperature": 0, "return_token_ids": True}
    r = httpx.post(server.url + "/v1/completions", json={**body, "logit_bias": {"17": -100, "017": 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == [17] * 4, r.text
    r = httpx.post(server.url + "/v1/completions", json={**body, "logit_bias": {"017": 100, "17": -100}})
    assert 17 not in r.json()["choices"][0]["token_ids"], r.text
    sp = {"max_new_tokens": 2, "temperature": 0}
    for rp, status in ((2.0, 200), (3.0, 400), (0.0, 400)):
        r = httpx.post(server.url + "/generate", json={"input_ids": [5, 6], "sampling_params": {
            **sp, "repetition_penalty": rp}})
        assert r.status_code == status, (rp, r.text)
    assert "repetition_penalty in (0, 2]" in r.json()["error"]["message"]


def test_structured_outputs_in_both_apis(server, client):
    """vLLM's guided_choice / guided_regex / structured_outputs, OpenAI's response_format (json_object,
    json_schema) through the openai client, and SGLang's regex and json_schema hold the text to the format."""
    pytest.importorskip("llguidance")
    body = {"prompt": "the quick", "max_tokens": 40, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json={**body, "guided_choice": ["alpha", "beta"]})
    assert r.json()["choices"][0]["text"] in ("alpha", "beta") and r.json()["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(server.url + "/v1/completions", json={**body, "n": 2, "temperature": 1, "seed": 4,
                                                         "guided_regex": "[0-9]{2}-[xy]"})
    assert all(re.fullmatch("[0-9]{2}-[xy]", c["text"]) for c in r.json()["choices"]), r.text
    schema = {"type": "object", "properties": {"n": {"enum": [7, 8]}}, "required": ["n"], "additionalProperties": False}
    r = httpx.post(server.url + "/v1/completions", json={**body, "structured_outputs": {
        "json": schema, "disable_any_whitespace": True}})
    assert json.loads(r.json()["choices"][0]["text"])["n"] in (7, 8), r.text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                          temperature=0, response_format={"type": "json_object"})
    assert chat.choices[0].message.content.lstrip().startswith("{")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                          temperature=0, response_format={"type": "json_schema", "json_schema": {
                                              "name": "n", "schema": schema}})
    assert chat.choices[0].message.content.lstrip().startswith("{")
    r = httpx.post(server.url + "/generate", json={"text": "the quick", "sampling_params": {
        "max_new_tokens": 20, "temperature": 0, "regex": "(yes|no)!"}})
    assert r.json()["text"] in ("yes!", "no!"), r.text
    r = httpx.post(server.url + "/generate", json={"text": "the quick", "sampling_params": {
        "max_new_tokens": 40, "temperature": 0, "json_schema": json.dumps(schema)}})
    assert r.json()["text"].lstrip().startswith("{"), r.text
    # grammars (EBNF, Lark), structural tags, JSON's whitespace pattern: vLLM's and SGLang's fields
    ebnf = 'root ::= ("ab" | "cd") [0-9]{2}'
    for field in ({"guided_grammar": ebnf}, {"structured_outputs": {"grammar": 'start: ("ab" | "cd") /[0-9]{2}/'}}):
        r = httpx.post(server.url + "/v1/completions", json={**body, **field})
        assert re.fullmatch("(ab|cd)[0-9]{2}", r.json()["choices"][0]["text"]), (field, r.text)
    r = httpx.post(server.url + "/generate", json={"text": "the quick", "sampling_params": {
        "max_new_tokens": 20, "temperature": 0, "ebnf": ebnf}})
    assert re.fullmatch("(ab|cd)[0-9]{2}", r.json()["text"]), r.text
    # SGLang's names on its OpenAI API: regex, ebnf, json_schema (they were ignored: unknown to vLLM)
    for field, pattern in (({"regex": "(yes|no)!"}, "(yes|no)!"), ({"ebnf": ebnf}, "(ab|cd)[0-9]{2}"),
                           ({"json_schema": json.dumps(schema)}, r"\s*\{.*")):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 40, "temperature": 0, **field})
        assert re.fullmatch(pattern, r.json()["choices"][0]["message"]["content"], re.S), (field, r.text)
    r = httpx.post(server.url + "/v1/completions", json={**body, "temperature": 1, "seed": 1, "guided_json": schema,
                                                         "guided_whitespace_pattern": "[ ]?"})
    text = r.json()["choices"][0]["text"]
    assert json.loads(text)["n"] in (7, 8) and not re.search(r"[^ \S]|  ", text), r.text
    tag = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f>"]}
    for r in (httpx.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            "response_format": {"type": "structural_tag", **tag}}),
              httpx.post(server.url + "/generate", json={"text": "hi", "sampling_params": {
                  "max_new_tokens": 8, "temperature": 0, "structural_tag": json.dumps(tag)}})):
        assert r.status_code == 200, r.text  # (free text until a trigger: what a random model writes)


def test_sglang_health_generate_flush_cache_and_put(server):
    """SGLang's /health_generate (the engine's loop answers), /flush_cache (the prefix cache emptied,
    only while nothing runs: else 400) and PUT /generate, which SGLang clients use (they were 404 and 405)."""
    assert httpx.get(server.url + "/health_generate").status_code == 200
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    assert httpx.put(server.url + "/generate", json=body).status_code == 200
    assert httpx.post(server.url + "/generate", json=body).json()["meta_info"]["cached_tokens"] >= 32
    with httpx.stream("POST", server.url + "/generate", json={
            "text": "hi", "stream": True, "sampling_params": {"max_new_tokens": LONG_RUN, "ignore_eos": True}}) as busy:
        lines = busy.iter_lines()  # (kept: a dropped iterator closes the stream)
        next(lines)
        r = httpx.post(server.url + "/flush_cache")
        assert r.status_code == 400 and "not flushed" in r.text, r.text
    for method in ("GET", "POST"):  # (the stream's abort reaches the engine at its next step)
        deadline = time.monotonic() + 10
        while (r := httpx.request(method, server.url + "/flush_cache")).status_code == 400 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200 and r.text.startswith("Cache flushed"), r.text
    assert httpx.post(server.url + "/generate", json=body).json()["meta_info"]["cached_tokens"] == 0
    m = metrics(server)
    assert m["llmirc:kv_cache_usage_perc"] == 0 and m["llmirc:num_requests_running"] == 0


def test_sglang_abort_request_and_get_server_info(server):
    """SGLang's POST /abort_request {"rid"} ends the running /generate request of that rid (finish_reason
    abort), and as SGLang's scheduler those whose rid starts with it, no other; a batch's rid "b" names
    no request (its prompts are b_0, b_1), as in SGLang; abort_all ends them all. GET /get_server_info
    answers SGLang's client. (Both were 404.)"""
    from concurrent.futures import ThreadPoolExecutor

    import sglang as sgl

    info = sgl.RuntimeEndpoint(server.url).get_server_info()
    assert info["served_model_name"] == "tiny" and info["context_length"] == CONTEXT, info
    assert info["max_total_num_tokens"] == CONTEXT and info["max_running_requests"] == 8 and \
        info["chunked_prefill_size"] == 256 and info["internal_states"][0]["memory_usage"]["token_capacity"] == CONTEXT

    def generate(body):
        r = httpx.post(server.url + "/generate", json={**body, "sampling_params": {
            "max_new_tokens": LONG_RUN, "ignore_eos": True}}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def abort(**body):
        r = httpx.post(server.url + "/abort_request", json=body)
        assert r.status_code == 200 and r.content == b"", r.text

    def running(count):
        deadline = time.monotonic() + 30
        while (now := metrics(server)["llmirc:num_requests_running"]) != count and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    with ThreadPoolExecutor(4) as pool:
        job, job2, other = (pool.submit(generate, {"text": "hi", "rid": rid}) for rid in ("job", "job-2", "other"))
        batch = pool.submit(generate, {"text": ["a", "b"], "rid": "b"})
        try:
            assert running(5) == 5
            for rid in ("b", "nothing", "b_1", "job"):
                abort(rid=rid)
            for out, rid in ((job.result(), "job"), (job2.result(), "job-2")):
                assert out["meta_info"]["id"] == rid and out["meta_info"]["finish_reason"]["type"] == "abort", out
            assert running(2) == 2 and not other.done() and not batch.done()  # (other and b_0)
        finally:
            abort(abort_all=True)
        assert other.result()["meta_info"]["finish_reason"]["type"] == "abort"
        outs = batch.result()
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort", "abort"], outs
    assert outs[0]["meta_info"]["completion_tokens"] > outs[1]["meta_info"]["completion_tokens"], outs
    r = httpx.post(server.url + "/abort_request", json={"rid": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rid", r.text


def test_sglang_generate_refuses_a_rid_in_flight(server):
    """/generate with the rid of a request still running, or a rid repeated within one request, is a 400 naming
    rid, as SGLang refuses it ("Duplicate request IDs detected"): both were admitted, and one /abort_request
    ended both. Once the first has finished, its rid is free again."""
    from concurrent.futures import ThreadPoolExecutor

    def generate(body, max_new_tokens=LONG_RUN):
        return httpx.post(server.url + "/generate", json={**body, "sampling_params": {
            "max_new_tokens": max_new_tokens, "ignore_eos": True}}, timeout=120)

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(generate, {"text": "hi", "rid": "dup"})
        try:
            deadline = time.monotonic() + 30
            while metrics(server)["llmirc:num_requests_running"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            for body in ({"text": "hello", "rid": "dup"}, {"text": ["a", "b"], "rid": ["other", "dup"]},
                         {"input_ids": [1, 2], "rid": "dup"}):
                r = generate(body, 4)
                assert r.status_code == 400 and r.json()["error"]["param"] == "rid", r.text
                assert "Duplicate request IDs detected: ['dup']" in r.json()["error"]["message"], r.text
            assert metrics(server)["llmirc:num_requests_running"] == 1  # (nothing of them admitted)
        finally:
            httpx.post(server.url + "/abort_request", json={"rid": "dup"})
        out = first.result()
    assert out.status_code == 200 and out.json()["meta_info"]["finish_reason"]["type"] == "abort", out.text
    r = generate({"text": ["a", "b"], "rid": ["x", "x"]}, 4)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Duplicate request IDs detected within the request: ['x']", "type": "BadRequestError",
        "param": "rid", "code": 400}, r.text
    r = generate({"text": "hi", "rid": "dup"}, 4)
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "dup", r.text


def test_sglang_generate_streams_cumulative_text(server, model):
    with httpx.stream("POST", server.url + "/generate", json={
            "text": "the lazy", "stream": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}) as response:
        events = sse(response)
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert events[-1]["output_ids"] == model.generate(["the lazy"], 8, ignore_eos=True)[0]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_sglang_get_model_info(server):
    """SGLang's model_type and architectures are the checkpoint config.json's ("llama", not the
    architecture's name); newer SGLang's /model_info and /server_info answer as /get_model_info and
    /get_server_info do."""
    info = httpx.get(server.url + "/get_model_info").json()
    assert info["model_path"] == "tiny" and info["is_generation"] is True
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"], info
    assert httpx.get(server.url + "/model_info").json() == info
    assert httpx.get(server.url + "/server_info").json()["max_total_num_tokens"] == \
        httpx.get(server.url + "/get_server_info").json()["max_total_num_tokens"]


CHOICES = ["lazy dog", "a"]


def test_sglang_frontend_program_runs_against_llmirc(server, model):
    """SGLang's frontend language: gen, and select, which scores each choice by the mean of the
    non-null input_token_logprobs from logprob_start_len (prompt - 2) on. Here the choices are ones
    this model ranks the other way round when prompt[logprob_start_len]'s own logprob is counted (as
    llmirc listed it, where SGLang lists null)."""
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(server.url)

    @sgl.function
    def program(s, subject):
        s += subject + " " + sgl.gen("words", max_tokens=6, temperature=0)
        s += " " + sgl.select("pick", choices=CHOICES)

    state = program.run(subject="the", backend=backend)
    expected = generated_text(model.tokenizer, model.generate([model.encode("the ")], 6)[0])
    assert state["words"] == expected
    # select: the choice whose tokens have the highest mean logprob after the shared prefix.
    prefix = "the " + expected + " "
    scores = []
    for choice in CHOICES:
        ids = model.encode(prefix + choice)
        lp = log_softmax(model.score(ids))
        start = max(len(model.encode(prefix)) - 2, 0)
        # (SGLang's input_token_logprobs: prompt[start] with no logprob, then the later tokens')
        values = [lp[p - 1, ids[p]] for p in range(start + 1, len(ids))]
        scores.append(np.mean(values))
    assert state["pick"] == CHOICES[int(np.argmax(scores))] and abs(scores[0] - scores[1]) > 0.1, scores


# -- the model's recommended sampling (generation_config.json) -------------------------------------

def test_requests_get_the_models_generation_config_sampling_as_vllm(tmp_path):
    """serve --generation-config auto (vLLM's and SGLang's default): a request that leaves temperature,
    top_p or top_k out gets the generation_config.json values (here top_k 1: greedy whatever the seed),
    a chat request without max_tokens its max_new_tokens;
    a field set at transformers' default is no recommendation; repetition_penalty is applied too (the
    greedy tokens are those of a repetition penalty of 1.1); --generation-config vllm: the APIs' own
    defaults (sampling at temperature 1)."""
    make_checkpoint(tmp_path / "ckpt", "llama", tokenizer=True)
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.7, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.1, "max_new_tokens": 5,
         "eos_token_id": 2}))
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    compile_model(tmp_path / "ckpt", tmp_path / "g.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    prompt = [5, 6, 7, 8]
    greedy = load(tmp_path / "g.llmir").generate([prompt], max_new_tokens=12, ignore_eos=True,
                                                  repetition_penalty=1.1)[0]
    body = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True}
    with RunningServer(tmp_path / "g.llmir", "--kv-cache-tokens", 256) as s:
        for seed in (1, 2, 3):
            r = httpx.post(s.url + "/v1/completions", json={**body, "seed": seed, "return_token_ids": True})
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == greedy, r.text
        r = httpx.post(s.url + "/generate", json={"input_ids": prompt, "sampling_params": {
            "max_new_tokens": 12, "ignore_eos": True, "sampling_seed": 4}})
        assert r.json()["output_ids"] == greedy, r.text
        r = httpx.post(s.url + "/v1/completions", json={**body, "seed": 1, "top_k": -1, "return_token_ids": True})
        sampled = [r.json()["choices"][0]["token_ids"]]  # the request's own top_k wins
        chat = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        r = httpx.post(s.url + "/v1/chat/completions", json=chat)  # max_tokens: the file's max_new_tokens (vLLM)
        assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "length"
        r = httpx.post(s.url + "/v1/chat/completions", json={**chat, "max_tokens": 7})  # the request's own wins
        assert r.json()["usage"]["completion_tokens"] == 7, r.text
    log = s.log.read_text()
    assert "generation_config.json sampling: temperature 0.7, top_k 1, max_new_tokens 5, repetition_penalty 1.1 " \
        in log, log
    with RunningServer(tmp_path / "g.llmir", "--kv-cache-tokens", 256, "--generation-config", "vllm") as s:
        for seed in (1, 2, 3):
            r = httpx.post(s.url + "/v1/completions", json={**body, "seed": seed, "return_token_ids": True})
            sampled.append(r.json()["choices"][0]["token_ids"])
    assert any(t != greedy for t in sampled), sampled


def test_a_malformed_generation_config_is_named():
    from llmirc.errors import LlmircError
    from llmirc.server.app import sampling_defaults

    assert sampling_defaults({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05}, "g") == \
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05}
    assert sampling_defaults({"temperature": 1.0, "top_k": 50, "do_sample": True, "repetition_penalty": 1.0}, "g") == {}
    assert sampling_defaults({"max_new_tokens": 64.0}, "g") == {"max_new_tokens": 64}
    for bad in ({"top_p": 2}, {"temperature": "hot"}, {"top_k": 2.5}, {"temperature": float("nan")},
                {"max_new_tokens": 0}, {"max_new_tokens": 1.5}, {"min_p": 1.5}, {"repetition_penalty": 0},
                {"temperature": 10**400}, {"repetition_penalty": -10**400}):  # (were OverflowErrors: exit 3)
        with pytest.raises(LlmircError, match="^g: "):
            sampling_defaults(bad, "g")


def test_generation_config_eos_ids_beside_the_tokenizers_are_stop_reasons_as_vllm(bundle):
    """vLLM adds generation_config.json's end-of-sequence ids other than the tokenizer's eos_token to each
    request's stop_token_ids (Gemma's <end_of_turn>, 106, beside <eos>, 1): ending at one reports its id as the
    stop_reason, where the tokenizer's own eos reports null."""
    m = load(bundle, kv_cache_tokens=512)
    tokens = m.generate(["the quick"], 16, ignore_eos=True)[0]
    at = next(i for i in range(1, 16) if tokens.index(tokens[i]) == i)
    m.engine.scheduler.eos_token_ids = frozenset({m.tokenizer.eos_token_id, tokens[at]})
    last = list(m.generate_stream(["the quick"], 16))[-1]
    assert (last.finish_reason, last.stop_reason, last.num_generated) == ("stop", tokens[at], at + 1)
    m.tokenizer.eos_token_id = tokens[at]  # the same token as the tokenizer's eos_token: null
    last = list(m.generate_stream(["the quick"], 16))[-1]
    assert (last.finish_reason, last.stop_reason, last.num_generated) == ("stop", None, at + 1)
    # named in stop_token_ids too (Llama 3.1's <|eot_id|>, its eos_token): still null, as vLLM checks eos first;
    # with ignore_eos, only stop_token_ids stops there, so its id
    for ignore_eos, reason in ((False, None), (True, tokens[at])):
        last = list(m.generate_stream(["the quick"], 16, stop_token_ids=(tokens[at],), ignore_eos=ignore_eos))[-1]
        assert (last.finish_reason, last.stop_reason, last.num_generated) == ("stop", reason, at + 1)
    m.close()


def test_the_tokenizers_eos_token_ends_a_sequence_that_generation_config_does_not_list(bundle, tmp_path):
    """vLLM stops at the tokenizer's eos_token whatever generation_config.json lists (a ChatML fine-tune's
    <|im_end|> beside the base model's eos ids): a bundle whose manifest lists no eos id still ends there, with a
    null stop_reason (it ran on to max_tokens)."""
    copy = tmp_path / "m.llmir"
    shutil.copytree(bundle, copy)
    with load(copy, kv_cache_tokens=512) as m:
        tokens = m.generate(["the quick"], 16, ignore_eos=True)[0]
        at = next(i for i in range(1, 16) if tokens.index(tokens[i]) == i)
        text = m.tokenizer.backend.id_to_token(tokens[at])
    config = json.loads((copy / "tokenizer" / "tokenizer_config.json").read_text())
    edited = json.dumps({**config, "eos_token": text}).encode()
    (copy / "tokenizer" / "tokenizer_config.json").write_bytes(edited)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation"]["eos_token_ids"] = []
    for f in manifest["files"]:
        if f["path"] == "tokenizer/tokenizer_config.json":
            f.update(size=len(edited), sha256=hashlib.sha256(edited).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with load(copy, kv_cache_tokens=512) as m:
        assert m.tokenizer.eos_token_id == tokens[at] and m.eos_token_ids == [tokens[at]]
        last = list(m.generate_stream(["the quick"], 16))[-1]
        assert (last.finish_reason, last.stop_reason, last.num_generated) == ("stop", None, at + 1)
        assert m.generate(["the quick"], 16, ignore_eos=True)[0] == tokens
