"""A real `vllm serve` process on 127.0.0.1 serving an SDAR checkpoint with block diffusion (the
plugin's default, no flag), queried through the `openai` client: /v1/completions and
/v1/chat/completions, streaming and not, equal token for token to the reference; bad knobs get
a 400 with the message and the server keeps serving; at the context limit (max_model_len 510,
not a multiple of the block: a request holds at most 508 tokens) the output is cut exactly like
the reference and a prompt without room is a 400."""
import time

import pytest

from vllm_helpers import SERVE_MAX_MODEL_LEN as MAX_MODEL_LEN
from vllm_helpers import SERVED_BLOCK_DIFFUSION

openai = pytest.importorskip("openai")

@pytest.fixture(scope="module")
def server(tiny_ckpt, shared_server):
    srv = shared_server(tiny_ckpt, SERVED_BLOCK_DIFFUSION, max_model_len=MAX_MODEL_LEN)  # shared with test_logprobs
    return openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=120), srv.log_path


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    from vllm_dllm_spec.reference import SDARModel

    return SDARModel.from_pretrained(tiny_ckpt)


def reference(ref, prompt_ids, max_tokens, **knobs):
    from vllm_dllm_spec.reference import generate

    knobs.setdefault("remasking_strategy", "low_confidence_static")  # the server's option
    return generate(ref, prompt_ids, gen_length=max_tokens, fuse_commit=True, **knobs)


def test_completions(server, ref):
    client, _ = server
    for prompt, n in [("The quick brown fox", 13), ("def block_diffusion(model", 6), ("x", 9)]:
        resp = client.completions.create(model="sdar", prompt=prompt, max_tokens=n, temperature=0,
                                         extra_body={"return_token_ids": True})
        choice = resp.choices[0]
        r = reference(ref, choice.prompt_token_ids, n)
        assert choice.token_ids == r.tokens
        record = resp.kv_transfer_params["dllm_spec"]
        assert record["num_forwards"] == r.num_forwards and record["step_map"] == r.step_map


def test_completions_stream_matches(server, ref):
    client, _ = server
    prompt = "Speculative decoding drafts tokens"
    full = client.completions.create(model="sdar", prompt=prompt, max_tokens=17, temperature=0,
                                     extra_body={"return_token_ids": True})
    stream = client.completions.create(model="sdar", prompt=prompt, max_tokens=17, temperature=0,
                                       stream=True, extra_body={"return_token_ids": True})
    pieces, token_ids = [], []
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            token_ids += getattr(chunk.choices[0], "token_ids", None) or []
    assert "".join(pieces) == full.choices[0].text
    assert token_ids == full.choices[0].token_ids
    # tokens arrive block by block (17 tokens -> several chunks carrying text or ids)
    assert sum(1 for p in pieces if p) >= 2


def test_chat_completions(server, ref):
    client, _ = server
    messages = [{"role": "user", "content": "hello world"}]
    resp = client.chat.completions.create(model="sdar", messages=messages, max_tokens=10,
                                          temperature=0, extra_body={"return_token_ids": True})
    r = reference(ref, resp.prompt_token_ids, 10)
    assert resp.choices[0].token_ids == r.tokens
    stream = client.chat.completions.create(model="sdar", messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == resp.choices[0].message.content


def test_request_knobs_and_bad_knobs(server, ref):
    client, _ = server
    knobs = {"remasking_strategy": "sequential", "denoising_steps": 2}
    resp = client.completions.create(model="sdar", prompt="hello", max_tokens=8, temperature=0,
                                     extra_body={"return_token_ids": True, "vllm_xargs": knobs})
    r = reference(ref, resp.choices[0].prompt_token_ids, 8, **knobs)
    assert resp.choices[0].token_ids == r.tokens
    for bad, message in [({"remasking_strategy": "nope"}, "remasking_strategy must be one of"),
                         ({"confidence_threshold": 3}, "confidence_threshold must be a number"),
                         ({"denoising_steps": 99}, "denoising_steps must be an integer in")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model="sdar", prompt="hello", max_tokens=4,
                                      extra_body={"vllm_xargs": bad})
    # still serving, and still exact
    again = client.completions.create(model="sdar", prompt="hello", max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True, "vllm_xargs": knobs})
    assert again.choices[0].token_ids == r.tokens


def test_context_limit(server, ref):
    client, _ = server
    prompt = [2 + i % 300 for i in range(500)]
    # no max_tokens: vLLM allows 510 - 500; the last block must end inside max_model_len: 8
    resp = client.completions.create(model="sdar", prompt=prompt, temperature=0,
                                     extra_body={"return_token_ids": True})
    choice = resp.choices[0]
    assert choice.token_ids == reference(ref, prompt, 8).tokens and choice.finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match=r"leaves no room.*at most 507 tokens"):
        client.completions.create(model="sdar", prompt=prompt + [5] * 8, max_tokens=1)
    again = client.completions.create(model="sdar", prompt=prompt[:40], max_tokens=5, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert again.choices[0].token_ids == reference(ref, prompt[:40], 5).tokens


def test_server_logs_tokens_per_forward(server):
    client, log_path = server
    client.completions.create(model="sdar", prompt="the lazy dog", max_tokens=8, temperature=0)
    deadline = time.monotonic() + 30
    while "tokens per forward" not in log_path.read_text() and time.monotonic() < deadline:
        client.completions.create(model="sdar", prompt="the lazy dog", max_tokens=4, temperature=0)
        time.sleep(3)
    assert "tokens per forward" in log_path.read_text()


def test_metrics_report_tokens_per_forward(server):
    """/metrics: accepted tokens / drafts of vLLM's spec-decode counters = tokens per forward
    (block-diffusion meaning, as vLLM's own diffusion path uses them)."""
    import urllib.request

    client, _ = server
    base = str(client.base_url).rstrip("/").removesuffix("/v1")

    def counters():
        text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
        values = {}
        for line in text.splitlines():
            for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total"):
                if line.startswith(name):
                    values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values

    before = counters()
    knobs = {"remasking_strategy": "low_confidence_static", "denoising_steps": 2}
    resp = client.completions.create(model="sdar", prompt="abcd", max_tokens=8, temperature=0,
                                      extra_body={"vllm_xargs": knobs})
    record = resp.kv_transfer_params["dllm_spec"]
    deadline = time.monotonic() + 20
    while True:  # stats reach the front-end asynchronously
        after = counters()
        drafts = after["vllm:spec_decode_num_drafts_total"] - before.get("vllm:spec_decode_num_drafts_total", 0)
        if drafts >= record["num_forwards"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    accepted = (after["vllm:spec_decode_num_accepted_tokens_total"]
                - before.get("vllm:spec_decode_num_accepted_tokens_total", 0))
    assert drafts == record["num_forwards"]
    # static with 2 steps per block of 4: at most 2 tokens per forward (the first block may hold
    # prompt tokens); accepted also counts the cut-off tail of the last block
    assert 8 <= accepted <= 8 + 4 and 1.0 <= accepted / drafts <= 2.0
