"""Scheduling stress: chunked prefill under a tight token budget (prompt chunks end on SDAR
block boundaries, running requests are never cut inside a block) and preemption; the outputs
stay equal to the reference (chunks and re-prefills add forwards, so those are bounded below)."""
import os
import random

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_dllm_spec.testing import shutdown_llm  # noqa: E402


def test_chunked_prefill_tight_budget(tiny_ckpt):
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    llm = LLM(model=tiny_ckpt, dtype="float32", max_model_len=512, enforce_eager=True,
              max_num_seqs=4, block_size=32, max_num_batched_tokens=66,
              enable_chunked_prefill=True, enable_prefix_caching=True, seed=0)
    try:
        cfg = llm.llm_engine.vllm_config.scheduler_config
        assert cfg.max_num_batched_tokens == 66  # >= 3 * B * max_num_seqs: kept
        vocab = llm.llm_engine.model_config.hf_config.vocab_size
        rng = random.Random(11)
        lengths = [150, 7, 101, 2, 66, 13]
        prompts = [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]
        knobs = [{"remasking_strategy": s} for s in
                 ["low_confidence_static", "sequential", "entropy_bounded",
                  "low_confidence_dynamic", "sequential", "low_confidence_static"]]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=15, temperature=0, extra_args=k) for k in knobs],
                            use_tqdm=False)
    finally:
        shutdown_llm(llm)
    ref = SDARModel.from_pretrained(tiny_ckpt)
    for p, k, o in zip(prompts, knobs, outs):
        r = generate(ref, p, gen_length=15, fuse_commit=True, **k)
        assert list(o.outputs[0].token_ids) == r.tokens, (len(p), k)
        record = o.kv_transfer_params["dllm_spec"]
        assert record["step_map"] == r.step_map
        assert record["num_forwards"] >= r.num_forwards


def test_preemption_keeps_greedy_output(tiny_ckpt):
    """A KV cache too small for the batch forces preemptions: a preempted request loses its KV
    and in-progress block, resumes with a block-causal re-prefill of its final tokens and
    restarts the block from masks; greedy tokens stay equal to the reference (forwards grow)."""
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    llm = LLM(model=tiny_ckpt, dtype="float32", max_model_len=256, enforce_eager=True,
              max_num_seqs=8, block_size=32, num_gpu_blocks_override=10,
              enable_prefix_caching=False, seed=0)
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        preempt, preemptions = scheduler._preempt_request, []

        def counting_preempt(request, *args, **kwargs):
            preemptions.append(request.request_id)
            return preempt(request, *args, **kwargs)

        scheduler._preempt_request = counting_preempt
        vocab = llm.llm_engine.model_config.hf_config.vocab_size
        rng = random.Random(3)
        prompts = [[rng.randrange(2, vocab) for _ in range(rng.randrange(20, 60))] for _ in range(8)]
        knobs = {"remasking_strategy": "low_confidence_static"}
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                           extra_args=knobs), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    assert preemptions, "the test must preempt"
    ref = SDARModel.from_pretrained(tiny_ckpt)
    for p, o in zip(prompts, outs):
        r = generate(ref, p, gen_length=40, fuse_commit=True, eos_token_id=-1, **knobs)
        assert list(o.outputs[0].token_ids) == r.tokens, len(p)
        assert o.kv_transfer_params["dllm_spec"]["num_forwards"] >= r.num_forwards


def test_requests_arriving_while_others_decode(tiny_ckpt):
    """Continuous batching: requests join a running batch (a 1-token prompt, which vLLM pads
    with placeholder drafts for uniform decode batches, and a prompt with a prefix-cache hit);
    every output equals the reference, forwards included."""
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    llm = LLM(model=tiny_ckpt, dtype="float32", max_model_len=256, enforce_eager=True,
              max_num_seqs=8, block_size=32, enable_prefix_caching=True, seed=0)
    prompts = {"a": [5, 6, 7, 8, 9, 10], "c": list(range(20, 53)), "b": [11],
               "d": list(range(20, 53)) + [99, 98], "e": [40, 41, 42]}
    arrivals = {"a": 0, "c": 0, "b": 2, "d": 4, "e": 5}  # engine step at which each arrives
    sp = SamplingParams(max_tokens=20, temperature=0)
    outputs = {}
    try:
        engine = llm.llm_engine
        for step in range(300):
            for rid, at in arrivals.items():
                if at == step:
                    engine.add_request(rid, {"prompt_token_ids": prompts[rid]}, sp)
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
            if step > max(arrivals.values()) and not engine.has_unfinished_requests():
                break
    finally:
        shutdown_llm(llm)
    assert outputs["d"].num_cached_tokens == 32
    ref = SDARModel.from_pretrained(tiny_ckpt)
    for rid, p in prompts.items():
        r = generate(ref, p, gen_length=20, fuse_commit=True)
        assert list(outputs[rid].outputs[0].token_ids) == r.tokens, rid
        assert outputs[rid].kv_transfer_params["dllm_spec"]["num_forwards"] == r.num_forwards, rid
