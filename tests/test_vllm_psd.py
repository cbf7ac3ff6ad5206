"""PSD-style self-speculation inside vLLM (real engine, in-process, float32, greedy) against the
pure-PyTorch PSD oracle (`reference.psd.psd_generate`): tokens, step_map and forwards of a
mixed 8-prompt batch with per-request strategies, block 4 and 8, prefix caching off and on,
draft depth 1 and 3; the oracle itself equals plain block diffusion (tests/test_psd_reference.py),
so these outputs are plain greedy block diffusion's, with fewer forwards."""
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_dllm_spec.reference import SDARModel, generate  # noqa: E402
from vllm_dllm_spec.reference.psd import psd_generate  # noqa: E402
from vllm_dllm_spec.testing import shutdown_llm  # noqa: E402
from vllm_helpers import prompts_for, request_configs  # noqa: E402

MAX_TOKENS = [23, 9, 30, 8, 17, 5, 25, 12]


@pytest.fixture(scope="module")
def ckpt_b8(tmp_path_factory) -> str:
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(tmp_path_factory.mktemp("tiny_sdar_b8_psd"), block_size=8, seed=2)


@pytest.fixture(scope="module")
def bundled_ckpt() -> str:
    import vllm_dllm_spec

    return vllm_dllm_spec.bundled_model_path()


CASES = [  # (checkpoint fixture, draft depth, prefix caching)
    ("tiny_ckpt", 3, False),
    ("tiny_ckpt", 1, True),
    ("ckpt_b8", 3, True),
    ("ckpt_b8", 2, False),
    ("bundled_ckpt", 3, True),  # the trained target: drafts are accepted often
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-D{c[1]}-pc{int(c[2])}")
def engine(request):
    from vllm import LLM

    name, depth, prefix_caching = request.param
    path = request.getfixturevalue(name)
    llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=32, block_size=32,
              enable_prefix_caching=prefix_caching, seed=0,
              additional_config={"dllm_spec": {"method": "psd", "draft_depth": depth}})
    yield path, depth, llm
    shutdown_llm(llm)


def run_batch(llm, prompts, configs, max_tokens, temperature=0.0):
    from vllm import SamplingParams

    sps = [SamplingParams(max_tokens=m, temperature=temperature, extra_args=c) for c, m in zip(configs, max_tokens)]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)


def test_batch_equals_oracle(engine):
    path, depth, llm = engine
    model = SDARModel.from_pretrained(path)
    B = model.config.block_size
    prompts = prompts_for(model.config.vocab_size)
    configs = request_configs(B)
    outputs = run_batch(llm, prompts, configs, MAX_TOKENS)
    psd_forwards = plain_forwards = 0
    mismatches = []
    for p, c, m, o in zip(prompts, configs, MAX_TOKENS, outputs):
        r = psd_generate(model, p, gen_length=m, draft_depth=depth, **c)
        record = o.kv_transfer_params["dllm_spec"]
        got = (list(o.outputs[0].token_ids), record["step_map"], record["num_forwards"])
        if got != (r.tokens, r.step_map, r.num_forwards):
            mismatches.append((len(p), c, got, (r.tokens, r.step_map, r.num_forwards)))
        plain = generate(model, p, gen_length=m, fuse_commit=True, **c)
        assert r.tokens == plain.tokens
        psd_forwards += r.num_forwards
        plain_forwards += plain.num_forwards
    assert not mismatches, "\n".join(map(str, mismatches))
    if depth == 1:
        assert psd_forwards == plain_forwards
    else:
        assert psd_forwards < plain_forwards
    # the same batch again (prefix-cache hits when on): still exact
    again = run_batch(llm, prompts, configs, MAX_TOKENS)
    assert [list(o.outputs[0].token_ids) for o in again] == [list(o.outputs[0].token_ids) for o in outputs]


def test_sampling_is_refused_and_the_engine_keeps_serving(engine):
    path, depth, llm = engine
    if depth != 1:
        pytest.skip("covered by the depth-1 engine")
    from vllm.exceptions import VLLMValidationError  # a client error: HTTP 400 on the server

    model = SDARModel.from_pretrained(path)
    with pytest.raises(VLLMValidationError, match="method 'psd' is greedy only: temperature must be 0"):
        run_batch(llm, [[5, 6, 7]], [{}], [4], temperature=0.8)
    (o,) = run_batch(llm, [[5, 6, 7]], [{}], [6])
    assert list(o.outputs[0].token_ids) == generate(model, [5, 6, 7], gen_length=6, fuse_commit=True).tokens
