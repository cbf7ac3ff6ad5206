"""SDAR block diffusion inside vLLM (real engine, in-process, float32, greedy) against the
pure-PyTorch reference with fuse_commit: tokens, forwards per request and step_map, for a batch
of prompts of mixed lengths (shorter than a block, not a multiple of it, several blocks),
every remasking strategy in the same batch, block 4 and 8, prefix caching off and on."""
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_dllm_spec.reference import SDARModel, generate  # noqa: E402
from vllm_dllm_spec.testing import shutdown_llm as shutdown  # noqa: E402
from vllm_helpers import prompts_for, request_configs  # noqa: E402

STRATEGIES = ["sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded"]
MAX_TOKENS = [23, 9, 30, 8, 17, 5, 25, 12]


def make_llm(path: str, *, prefix_caching: bool, additional_config=None, **kw):
    from vllm import LLM

    return LLM(
        model=path, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=32,
        block_size=32, enable_prefix_caching=prefix_caching, seed=0,
        additional_config=additional_config or {}, **kw,
    )


def run_batch(llm, prompts, configs, max_tokens):
    from vllm import SamplingParams

    sps = [SamplingParams(max_tokens=m, temperature=0.0, extra_args=c) for c, m in zip(configs, max_tokens)]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)


_REF_MODELS: dict = {}
_REF_RESULTS: dict = {}


def reference(path, block_length, prompt, config, max_tokens):
    key = (path, block_length, tuple(prompt), tuple(sorted(config.items())), max_tokens)
    if key not in _REF_RESULTS:
        if path not in _REF_MODELS:
            _REF_MODELS[path] = SDARModel.from_pretrained(path)
        _REF_RESULTS[key] = generate(_REF_MODELS[path], prompt, gen_length=max_tokens,
                                     block_length=block_length, fuse_commit=True, **config)
    return _REF_RESULTS[key]


def check_against_reference(path, block_length, prompts, configs, max_tokens, outputs):
    mismatches = []
    for p, c, m, o in zip(prompts, configs, max_tokens, outputs):
        r = reference(path, block_length, p, c, m)
        got = list(o.outputs[0].token_ids)
        record = (o.kv_transfer_params or {}).get("dllm_spec")
        assert record is not None, "every finished request carries its dllm_spec record"
        if (got, record["num_forwards"], record["step_map"]) != (r.tokens, r.num_forwards, r.step_map):
            mismatches.append((len(p), c, got, r.tokens, record, r.num_forwards, r.step_map))
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.fixture(scope="module")
def ckpt_b8(tmp_path_factory) -> str:
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(tmp_path_factory.mktemp("tiny_sdar_b8"), block_size=8, seed=2)


@pytest.fixture(scope="module")
def bundled_ckpt() -> str:
    import vllm_dllm_spec

    try:
        return vllm_dllm_spec.bundled_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


CASES = [  # (checkpoint fixture, block length (None: the model's), prefix caching, rotate knobs)
    ("tiny_ckpt", 4, False, True),
    ("tiny_ckpt", 4, True, False),
    ("ckpt_b8", 8, False, True),
    ("ckpt_b8", 8, True, False),
    ("tiny_tied_ckpt", 4, True, False),  # tied embeddings, GQA 4:1
    ("bundled_ckpt", None, False, False),  # the larger trained model: one batch per engine
    ("bundled_ckpt", None, True, False),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-B{c[1] or 'model'}-pc{int(c[2])}")
def engine(request):
    name, block_length, prefix_caching, rotate = request.param
    path = request.getfixturevalue(name)
    llm = make_llm(path, prefix_caching=prefix_caching)
    if block_length is None:
        block_length = int(llm.llm_engine.model_config.hf_config.block_size)
    yield path, block_length, prefix_caching, rotate, llm
    shutdown(llm)


def test_batch_equals_reference(engine):
    path, B, prefix_caching, rotate, llm = engine
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    prompts = prompts_for(vocab, seed=B)
    configs = request_configs(B)
    outputs = run_batch(llm, prompts, configs, MAX_TOKENS)
    check_against_reference(path, B, prompts, configs, MAX_TOKENS, outputs)
    if rotate:
        # every strategy against other prompt lengths: rotate the knobs over the prompts
        rotated = configs[3:] + configs[:3]
        outputs = run_batch(llm, prompts, rotated, MAX_TOKENS)
        check_against_reference(path, B, prompts, rotated, MAX_TOKENS, outputs)
    if prefix_caching:
        # the same long prompts again: cached blocks are reused and the output stays exact
        outputs = run_batch(llm, prompts, configs, MAX_TOKENS)
        check_against_reference(path, B, prompts, configs, MAX_TOKENS, outputs)
        hits = {len(p): o.num_cached_tokens for p, o in zip(prompts, outputs)}
        assert hits[70] >= 64 and hits[40] >= 32, hits


def test_prefix_cache_hits_on_generated_blocks(engine):
    """A prompt that extends an earlier prompt + its output hits blocks whose KV came from
    the earlier request's fused commits; the continuation stays exact."""
    path, B, prefix_caching, _, llm = engine
    if not prefix_caching:
        pytest.skip("prefix caching off")
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    first = prompts_for(vocab, seed=100 + B)[6][:30]
    config = {"remasking_strategy": "low_confidence_static"}
    out = run_batch(llm, [first], [config], [40])[0]
    extended = first + list(out.outputs[0].token_ids)  # up to 70 tokens
    outputs = run_batch(llm, [extended], [config], [16])
    assert len(extended) > 32 and outputs[0].num_cached_tokens == (len(extended) - 1) // 32 * 32
    check_against_reference(path, B, [extended], [config], [16], outputs)
