"""Sample logprobs (`logprobs` / `top_logprobs`) of block diffusion, SimSD and PSD in vLLM equal
the oracles' (`reference.generate` / `simsd.simsd_generate` / `psd.psd_generate` `.logprobs`: per
token the log-softmax, mask excluded, of the logits it was committed from) within the tolerance
table: offline (`LLM.generate`, a mixed batch with different k and a request without logprobs),
served (`vllm serve`, /v1/completions) and streamed. Prompt logprobs are a 400 naming why; k
beyond vLLM's max_logprobs gets vLLM's own error."""
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tolerances import assert_close  # noqa: E402
from vllm_helpers import SERVE_MAX_MODEL_LEN, SERVED_BLOCK_DIFFUSION, served_simsd_options  # noqa: E402

openai = pytest.importorskip("openai")

METHODS = ["block_diffusion", "simsd", "psd"]
ENGINE_KNOBS = {"remasking_strategy": "low_confidence_static"}
PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 11], list(range(20, 33))]  # no eos (0) or mask (1)
MAX_TOKENS = [9, 14, 6]
KS = [0, 2, 5]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from vllm_dllm_spec.reference import SDARModel

    return SDARModel.from_pretrained(tiny_ckpt)


def oracle(model, method: str, prompt: list[int], max_tokens: int, seed: int | None = None, **sampling):
    """The method's oracle with the engine's knobs (static remasking, the defaults otherwise)."""
    from vllm_dllm_spec.reference import generate
    from vllm_dllm_spec.reference.psd import psd_generate
    from vllm_dllm_spec.reference.simsd import simsd_generate

    if method == "simsd":
        return simsd_generate(model, None, prompt, gen_length=max_tokens,
                              draft_remasking_strategy=ENGINE_KNOBS["remasking_strategy"])
    if method == "psd":
        return psd_generate(model, prompt, gen_length=max_tokens, **ENGINE_KNOBS)
    return generate(model, prompt, gen_length=max_tokens, fuse_commit=True, seed=seed, **ENGINE_KNOBS,
                    **sampling)


def expected(row: torch.Tensor, token: int, k: int) -> tuple[dict[int, float], int]:
    """vLLM's entries for one position (the token and the top-k) and the token's rank."""
    top = row.topk(k)
    entries = {int(i): float(v) for i, v in zip(top.indices, top.values)}
    entries[token] = float(row[token])
    return entries, int((row >= row[token]).sum())


def assert_entries(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want)
    ids = sorted(want)
    assert_close(torch.tensor([got[i] for i in ids]), torch.tensor([want[i] for i in ids]))


def check_offline(output, want, k: int) -> None:
    tokens = list(output.token_ids)
    assert tokens == want.tokens and len(output.logprobs) == len(tokens)
    for position, token in enumerate(tokens):
        entries, rank = expected(want.logprobs[position], token, k)
        got = output.logprobs[position]
        assert_entries({i: lp.logprob for i, lp in got.items()}, entries)
        assert got[token].rank == rank


@pytest.mark.parametrize("method", METHODS)
def test_offline_logprobs_equal_the_oracle(tiny_ckpt, model, method):
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.testing import shutdown_llm

    llm = LLM(model=tiny_ckpt, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=8,
              block_size=32, seed=0, additional_config={"dllm_spec": {"method": method, **ENGINE_KNOBS}})
    params = [SamplingParams(max_tokens=m, temperature=0, logprobs=k) for m, k in zip(MAX_TOKENS, KS)]
    params.append(SamplingParams(max_tokens=7, temperature=0))  # no logprobs, same batch
    sampled = method == "block_diffusion"  # seeded sampling: logprobs stay the raw distribution's
    if sampled:
        params.append(SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=3, logprobs=3))
    prompts = PROMPTS + [PROMPTS[0]] + ([PROMPTS[1]] if sampled else [])
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        from vllm.exceptions import VLLMValidationError

        with pytest.raises(VLLMValidationError, match="greater than max allowed"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4, logprobs=21),
                         use_tqdm=False)
        with pytest.raises(VLLMValidationError, match="does not support prompt_logprobs"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4, prompt_logprobs=1),
                         use_tqdm=False)
    finally:
        shutdown_llm(llm)
    for p, m, k, out in zip(PROMPTS, MAX_TOKENS, KS, outs):
        check_offline(out.outputs[0], oracle(model, method, p, m), k)
    assert outs[3].outputs[0].logprobs is None
    if sampled:
        check_offline(outs[4].outputs[0], oracle(model, method, PROMPTS[1], 10, seed=3, temperature=0.8, top_k=20), 3)


@pytest.fixture(scope="module", params=METHODS)
def served(request, tiny_ckpt, tiny_tied_ckpt, shared_server, model):
    """(method, its oracle for the served knobs, client): each method served by the server of the
    module that tests it served (conftest's `shared_server`)."""
    from vllm_dllm_spec.reference import SDARModel
    from vllm_dllm_spec.reference.simsd import simsd_generate

    method = request.param
    if method == "simsd":  # with a separate draft, as tests/test_vllm_simsd.py serves it
        options, draft = served_simsd_options(tiny_tied_ckpt), SDARModel.from_pretrained(tiny_tied_ckpt)

        def want(prompt, n):
            return simsd_generate(model, draft, prompt, gen_length=n, num_draft_blocks=options["num_draft_blocks"],
                                  draft_remasking_strategy=options["remasking_strategy"])
    else:
        options = SERVED_BLOCK_DIFFUSION if method == "block_diffusion" else {"method": method, **ENGINE_KNOBS}

        def want(prompt, n):
            return oracle(model, method, prompt, n)
    srv = shared_server(tiny_ckpt, options, max_model_len=SERVE_MAX_MODEL_LEN)
    return want, openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=120)


def _ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def test_served_and_streamed_logprobs_equal_the_oracle(served, model):
    want_of, client = served
    body = {"return_tokens_as_token_ids": True}
    for prompt, n, k in [(PROMPTS[1], 14, 3), (PROMPTS[2], 6, 0)]:
        resp = client.completions.create(model="sdar", prompt=prompt, max_tokens=n, temperature=0, logprobs=k,
                                         extra_body=body)
        lp = resp.choices[0].logprobs
        want = want_of(prompt, n)
        tokens = _ids(lp.tokens)
        assert tokens == want.tokens
        for position, token in enumerate(tokens):
            entries, _ = expected(want.logprobs[position], token, k)
            assert_close(torch.tensor(lp.token_logprobs[position]), torch.tensor(entries[token]))
            # top_logprobs: the top-k (vLLM may add the token itself), each at the oracle's value
            top = dict(zip(_ids(list(lp.top_logprobs[position])), lp.top_logprobs[position].values()))
            assert set(entries) - {token} <= set(top) <= set(entries)
            assert_entries(top, {i: entries[i] for i in top})
        streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        for chunk in client.completions.create(model="sdar", prompt=prompt, max_tokens=n, temperature=0,
                                               logprobs=k, stream=True, extra_body=body):
            for choice in chunk.choices:
                if choice.logprobs is not None:
                    for key in streamed:
                        streamed[key] += getattr(choice.logprobs, key)
        assert streamed == {key: getattr(lp, key) for key in streamed}


def test_served_prompt_logprobs_and_too_many_are_400(served):
    _, client = served
    with pytest.raises(openai.BadRequestError, match="does not support prompt_logprobs"):
        client.completions.create(model="sdar", prompt=PROMPTS[0], max_tokens=4,
                                  extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="greater than max allowed"):
        client.completions.create(model="sdar", prompt=PROMPTS[0], max_tokens=4, logprobs=21)
