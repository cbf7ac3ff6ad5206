"""Tensor parallelism on CPU: TP=2 (two worker processes, gloo) gives the reference's tokens,
forwards and step_map, hence the same outputs as TP=1 (tests/test_vllm_block_diffusion.py)."""
import os
import random

import pytest

from vllm_dllm_spec.testing import shutdown_llm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


PROMPT_LENGTHS = [2, 7, 12, 33]
MAX_TOKENS = 14


def tp2_generate(path, options, seed, knobs=None):
    """A TP=2 engine (two worker processes) with the `dllm_spec` option: (prompts, outputs) of
    one greedy batch, per-request knobs optional."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=8, block_size=32,
              tensor_parallel_size=2, distributed_executor_backend="mp", seed=0,
              additional_config={"dllm_spec": options})
    try:
        vocab = llm.llm_engine.model_config.hf_config.vocab_size
        rng = random.Random(seed)
        prompts = [[rng.randrange(2, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]
        knobs = knobs or [None] * len(prompts)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args=k) for k in knobs],
                            use_tqdm=False)
    finally:
        shutdown_llm(llm)
    return prompts, outs


@pytest.mark.slow
def test_tp2_equals_reference(tiny_tied_ckpt, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    from vllm_dllm_spec.reference import SDARModel, generate

    knobs = [{"remasking_strategy": s} for s in
             ["sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded"]]
    prompts, outs = tp2_generate(tiny_tied_ckpt, {}, 5, knobs)
    ref = SDARModel.from_pretrained(tiny_tied_ckpt)
    for p, k, o in zip(prompts, knobs, outs):
        r = generate(ref, p, gen_length=MAX_TOKENS, fuse_commit=True, **k)
        assert list(o.outputs[0].token_ids) == r.tokens, (len(p), k)
        record = o.kv_transfer_params["dllm_spec"]
        assert (record["num_forwards"], record["step_map"]) == (r.num_forwards, r.step_map)


@pytest.mark.slow
def test_simsd_tp2_equals_oracle(tiny_ckpt, tiny_tied_ckpt, monkeypatch):
    """SimSD with TP=2: the draft runs replicated on both ranks, the target's verification is
    sharded; tokens and forward counts equal the SimSD oracle."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    from vllm_dllm_spec.reference import SDARModel
    from vllm_dllm_spec.reference.simsd import simsd_generate

    prompts, outs = tp2_generate(tiny_ckpt, {"method": "simsd", "draft_model": tiny_tied_ckpt,
                                             "remasking_strategy": "low_confidence_static"}, 6)
    target, draft = SDARModel.from_pretrained(tiny_ckpt), SDARModel.from_pretrained(tiny_tied_ckpt)
    for p, o in zip(prompts, outs):
        r = simsd_generate(target, draft, p, gen_length=MAX_TOKENS, draft_remasking_strategy="low_confidence_static")
        record = o.kv_transfer_params["dllm_spec"]
        assert list(o.outputs[0].token_ids) == r.tokens, len(p)
        assert (record["target_forwards"], record["draft_forwards"]) == (r.target_forwards, r.draft_forwards)


@pytest.mark.slow
def test_psd_tp2_equals_oracle(tiny_tied_ckpt, monkeypatch):
    """PSD with TP=2: the block copies' region attention runs on each rank's heads; tokens,
    step_map and forwards equal the PSD oracle (and so plain block diffusion's tokens)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    from vllm_dllm_spec.reference import SDARModel
    from vllm_dllm_spec.reference.psd import psd_generate

    prompts, outs = tp2_generate(tiny_tied_ckpt, {"method": "psd", "draft_depth": 3}, 7)
    model = SDARModel.from_pretrained(tiny_tied_ckpt)
    for p, o in zip(prompts, outs):
        r = psd_generate(model, p, gen_length=MAX_TOKENS, draft_depth=3)
        record = o.kv_transfer_params["dllm_spec"]
        assert list(o.outputs[0].token_ids) == r.tokens, len(p)
        assert (record["step_map"], record["num_forwards"]) == (r.step_map, r.num_forwards)
