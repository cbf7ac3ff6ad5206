"""The `dllm_spec` option on the vLLM path: the config hook (defaults, scheduler / worker /
speculative config from one option), start-up validation, and per-request knob validation
(a bad request is refused with a clear message, the engine keeps serving)."""
import gc
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def engine_config(path, options=None, **kw):
    from vllm.engine.arg_utils import EngineArgs

    additional = {} if options is None else {"dllm_spec": options}
    args = EngineArgs(model=path, dtype="float32", max_model_len=256, enforce_eager=True,
                      block_size=32, additional_config=additional, **kw)
    return args.create_engine_config()


def test_hook_sets_everything_from_defaults(tiny_ckpt):
    cfg = engine_config(tiny_ckpt)
    assert cfg.scheduler_config.scheduler_cls == "vllm_dllm_spec.scheduler.BlockDiffusionScheduler"
    assert cfg.parallel_config.worker_cls == "vllm_dllm_spec.worker.DLLMWorker"
    assert cfg.speculative_config.method == "custom_class"
    assert cfg.speculative_config.num_speculative_tokens == 4  # the model's block size
    assert cfg.additional_config["dllm_spec"] == {
        "method": "block_diffusion", "block_length": 4, "denoising_steps": 4,
        "remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.85,
        "eb_threshold": 0.35,
    }


def test_hook_applies_the_option(tiny_ckpt):
    cfg = engine_config(tiny_ckpt, {"denoising_steps": 2, "remasking_strategy": "entropy_bounded",
                                    "eb_threshold": 0.5})
    knobs = cfg.additional_config["dllm_spec"]
    assert (knobs["denoising_steps"], knobs["remasking_strategy"], knobs["eb_threshold"]) == (
        2, "entropy_bounded", 0.5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "medusa"}, "method must be one of"),
        ({"remasking_strategy": "random"}, "remasking_strategy must be one of"),
        ({"confidence_threshold": 1.5}, r"confidence_threshold must be a number in \[0, 1\]"),
        ({"confidence_threshold": -0.1}, r"confidence_threshold must be a number in \[0, 1\]"),
        ({"denoising_steps": 0}, "denoising_steps must be an integer >= 1"),
        ({"denoising_steps": 5}, r"denoising_steps must be an integer in \[1, block_length=4\]"),
        ({"block_length": 8}, "block size the model was trained with"),
        ({"steps": 2}, "unknown option"),
    ],
)
def test_bad_option_fails_at_startup(tiny_ckpt, options, message):
    with pytest.raises(Exception, match=message):
        engine_config(tiny_ckpt, options)


def test_cache_block_must_hold_whole_sdar_blocks(tmp_path):
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    path = make_random_sdar_checkpoint(tmp_path / "b3", block_size=3)
    with pytest.raises(Exception, match="multiple of the SDAR block"):
        engine_config(path)


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    from vllm import LLM

    engine = LLM(model=tiny_ckpt, dtype="float32", max_model_len=256, enforce_eager=True,
                 max_num_seqs=8, block_size=32, enable_prefix_caching=False, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"remasking_strategy": "nope"}, "remasking_strategy must be one of"),
        ({"confidence_threshold": 2}, r"confidence_threshold must be a number in \[0, 1\]"),
        ({"denoising_steps": 9}, r"denoising_steps must be an integer in \[1, block_length=4\]"),
        ({"block_length": 8}, "block_length must be the model's trained block size 4"),
        ({"method": "medusa"}, "method must be one of"),
        ({"method": "simsd"}, "method is chosen per engine"),
        ({"method": "spiffy"}, "method is chosen per engine"),
    ],
)
def test_bad_request_knobs_are_refused_and_engine_keeps_serving(llm, extra, message):
    from vllm import SamplingParams

    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(max_tokens=4, temperature=0, extra_args=extra), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                       SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_request_knobs_change_the_method(llm, tiny_ckpt):
    """The same prompt with different per-request knobs gives the reference's output for those
    knobs (and unrelated extra_args keys are ignored)."""
    from vllm import SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    ref = SDARModel.from_pretrained(tiny_ckpt)
    prompt = [11, 12, 13, 14, 15, 16]
    knobs = [{"remasking_strategy": "sequential", "denoising_steps": 1, "other_plugin": 1},
             {"remasking_strategy": "low_confidence_static", "denoising_steps": 2}]
    outs = llm.generate([{"prompt_token_ids": prompt}] * 2,
                        [SamplingParams(max_tokens=12, temperature=0, extra_args=k) for k in knobs],
                        use_tqdm=False)
    for k, o in zip(knobs, outs):
        k = {key: v for key, v in k.items() if key != "other_plugin"}
        r = generate(ref, prompt, gen_length=12, fuse_commit=True, **k)
        assert list(o.outputs[0].token_ids) == r.tokens
        assert o.kv_transfer_params["dllm_spec"]["num_forwards"] == r.num_forwards


def test_stop_token_and_sampling(llm, tiny_ckpt):
    """stop_token_ids cut exactly as the reference cuts at eos; top_k=1 sampling with the
    sequential strategy (confidence-independent) equals greedy; a seed reproduces samples."""
    from vllm import SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    ref = SDARModel.from_pretrained(tiny_ckpt)
    prompt = [21, 22, 23, 24, 25]
    base = generate(ref, prompt, gen_length=20, fuse_commit=True, remasking_strategy="sequential")
    stop = base.tokens[9]
    cut = generate(ref, prompt, gen_length=20, fuse_commit=True, remasking_strategy="sequential",
                   eos_token_id=stop)
    knobs = {"remasking_strategy": "sequential"}
    outs = llm.generate(
        [{"prompt_token_ids": prompt}] * 4,
        [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop], extra_args=knobs),
         SamplingParams(max_tokens=20, temperature=0.8, top_k=1, extra_args=knobs),
         SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, extra_args=knobs),
         SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, extra_args=knobs)],
        use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == cut.tokens
    assert outs[0].kv_transfer_params["dllm_spec"]["num_forwards"] == cut.num_forwards
    assert list(outs[1].outputs[0].token_ids) == base.tokens
    assert list(outs[2].outputs[0].token_ids) == list(outs[3].outputs[0].token_ids)
    assert len(outs[2].outputs[0].token_ids) >= 1


@pytest.mark.parametrize("kw", [{"prompt_logprobs": 1}, {"repetition_penalty": 1.3}, {"presence_penalty": 0.5}])
def test_sampler_only_params_are_refused(llm, kw):
    from vllm import SamplingParams

    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="SDAR block diffusion does not support"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(max_tokens=4, temperature=0, **kw), use_tqdm=False)


def test_stop_string_cuts_text(llm):
    """Stop strings are applied by vLLM's detokenizer to the block-wise output: the text ends
    right before the stop string, and the tokens are a prefix of the unstopped output."""
    from vllm import SamplingParams

    prompt = [31, 32, 33, 34, 35, 36, 37]
    knobs = {"remasking_strategy": "sequential"}
    full = llm.generate([{"prompt_token_ids": prompt}],
                        SamplingParams(max_tokens=24, temperature=0, extra_args=knobs),
                        use_tqdm=False)[0].outputs[0]
    text = full.text
    cut_at = next(i for i in range(len(text) // 2, len(text)) if text[i:i + 2].strip())
    stop = text[cut_at:cut_at + 2]
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=24, temperature=0, stop=[stop], extra_args=knobs),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert list(out.token_ids) == list(full.token_ids)[: len(out.token_ids)]


def test_seeded_sampling_equals_reference(llm, tiny_ckpt):
    """temperature / top_k / top_p with a seed: vLLM's per-request generator is seeded like the
    reference's and consumed the same way (B rows per step), so sampled outputs are equal token
    for token too, for every strategy."""
    import random

    from vllm import SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    ref = SDARModel.from_pretrained(tiny_ckpt)
    rng = random.Random(9)
    prompts = [[rng.randrange(2, 400) for _ in range(n)] for n in [1, 3, 6, 9, 17, 30, 4, 11]]
    strategies = ["sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded"]
    knobs = [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.8),
             dict(temperature=1.0, top_k=50, top_p=0.9)]
    cases = [(knobs[i % 4], strategies[(i // 2) % 4], 100 + i) for i in range(8)]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(max_tokens=18, seed=seed, extra_args={"remasking_strategy": strat}, **kw)
         for kw, strat, seed in cases], use_tqdm=False)
    for p, (kw, strat, seed), o in zip(prompts, cases, outs):
        r = generate(ref, p, gen_length=18, fuse_commit=True, seed=seed, remasking_strategy=strat, **kw)
        assert list(o.outputs[0].token_ids) == r.tokens, (len(p), kw, strat)
        assert o.kv_transfer_params["dllm_spec"]["num_forwards"] == r.num_forwards
