"""The pure-PyTorch oracle against independent implementations (transformers' Qwen3, a dense
4-D mask built here, a one-token-per-step loop) and against its documented semantics."""
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from tolerances import assert_close
from vllm_dllm_spec.reference import KVCache, SDARModel, block_causal_mask, generate
from vllm_dllm_spec.reference.generate import select_to_unmask
from vllm_dllm_spec.config import DenoiseParams

STRATEGIES = ["sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded"]


def load_hf(path: str) -> Qwen3ForCausalLM:
    cfg = json.load(open(f"{path}/config.json"))
    hf_cfg = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = Qwen3ForCausalLM(hf_cfg).eval()
    state = load_file(f"{path}/model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if cfg["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.fixture(scope="module", params=["tiny_ckpt", "tiny_tied_ckpt"])
def pair(request):
    path = request.getfixturevalue(request.param)
    return SDARModel.from_pretrained(path), load_hf(path)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return SDARModel.from_pretrained(tiny_ckpt)


def test_logits_equal_transformers_qwen3_causal(pair):
    ours, hf = pair
    torch.manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 13))
    positions = torch.arange(13).expand(2, 13)
    causal = torch.ones(13, 13, dtype=torch.bool).tril().expand(2, 13, 13)
    with torch.no_grad():
        assert_close(ours(ids, positions, causal), hf(input_ids=ids).logits)


def test_block_causal_equals_dense_4d_mask_in_transformers(pair):
    ours, hf = pair
    n, block = 14, 4
    dense = torch.zeros(n, n, dtype=torch.bool)  # built independently, element by element
    for q in range(n):
        for k in range(n):
            dense[q, k] = (k // block) <= (q // block)
    assert torch.equal(block_causal_mask(0, n, block), dense)
    ids = torch.randint(0, ours.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=dense[None, None]).logits
        actual = ours(ids, torch.arange(n)[None], block_causal_mask(0, n, block)[None])
        causal = hf(input_ids=ids).logits
    assert_close(actual, expected)
    assert (expected - causal).abs().max() > 1e-2  # the mask really differs from causal


def test_kv_cache_forward_equals_full_block_causal_forward(model):
    """Prefill two blocks into the cache, then run block 3 against it: equal to one dense pass."""
    B, n = 4, 12
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids, torch.arange(n)[None], block_causal_mask(0, n, B)[None])
        cache = KVCache(model.config.num_hidden_layers)
        model(ids[:, :8], torch.arange(8)[None], block_causal_mask(0, 8, B)[None], cache, num_store=8)
        assert len(cache) == 8
        tail = model(ids[:, 8:], torch.arange(8, n)[None], block_causal_mask(8, 4, B)[None], cache)
    assert len(cache) == 8  # num_store=0 stores nothing
    assert_close(tail, full[:, 8:])


@pytest.mark.parametrize("block_length", [4, 8])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fuse_commit_same_tokens_one_forward_fewer_per_block(model, block_length, strategy):
    for prompt_len in (1, 4, 7, 13):
        prompt = list(range(3, 3 + prompt_len))
        kw = dict(gen_length=19, block_length=block_length, remasking_strategy=strategy)
        plain = generate(model, prompt, **kw)
        fused = generate(model, prompt, fuse_commit=True, **kw)
        assert fused.tokens == plain.tokens and fused.step_map == plain.step_map
        assert fused.block_steps == plain.block_steps
        has_prefill = prompt_len >= block_length
        assert plain.num_forwards == has_prefill + sum(s + 1 for s in plain.block_steps)
        assert fused.num_forwards == sum(fused.block_steps)
        assert len(plain.tokens) == 19


def test_block_length_one_equals_one_token_per_step_loop(tiny_ckpt, model):
    """Block length 1: append a mask, predict it from its own logits, replace; repeat."""
    hf = load_hf(tiny_ckpt)
    mask_id = model.config.mask_token_id
    prompt = [7, 8, 9, 10, 11]
    seq = list(prompt)
    logprobs = []  # each token's committing distribution: its own step's, mask token excluded
    with torch.no_grad():
        for _ in range(10):
            logits = hf(input_ids=torch.tensor([seq + [mask_id]])).logits[0, -1]
            logits[mask_id] = float("-inf")
            seq.append(int(logits.argmax()))
            logprobs.append(logits.log_softmax(-1))
    for fuse in (False, True):
        out = generate(model, prompt, gen_length=10, block_length=1, denoising_steps=1, fuse_commit=fuse)
        assert out.tokens == seq[len(prompt):]
        assert out.step_map == [0] * 10
        assert_close(out.logprobs, torch.stack(logprobs))
    assert out.num_forwards == 10  # fused: one forward per token


@pytest.mark.parametrize("strategy", ["sequential", "low_confidence_static"])
@pytest.mark.parametrize("steps,counts", [(4, [2, 2, 2, 2]), (3, [3, 3, 2]), (8, [1] * 8), (1, [8])])
def test_static_strategies_unmask_the_documented_count(model, strategy, steps, counts):
    out = generate(model, [5, 6, 7, 8, 9, 10, 11, 12], gen_length=24, block_length=8,
                   denoising_steps=steps, remasking_strategy=strategy)
    for b in range(3):
        block = out.step_map[8 * b: 8 * b + 8]
        assert [Counter(block)[s] for s in range(steps)] == counts
        if strategy == "sequential":
            assert block == sorted(block)


def test_dynamic_threshold_extremes(model):
    kw = dict(gen_length=16, block_length=8, denoising_steps=4)
    everything = generate(model, [5, 6, 7, 8, 9, 10, 11, 12], remasking_strategy="low_confidence_dynamic",
                          confidence_threshold=0.0, **kw)
    assert everything.block_steps == [1, 1] and set(everything.step_map) == {0}
    never = generate(model, [5, 6, 7, 8, 9, 10, 11, 12], remasking_strategy="low_confidence_dynamic",
                     confidence_threshold=1.0, **kw)
    static = generate(model, [5, 6, 7, 8, 9, 10, 11, 12], remasking_strategy="low_confidence_static", **kw)
    assert never.tokens == static.tokens and never.step_map == static.step_map


def test_entropy_bounded_bounds(model):
    kw = dict(gen_length=16, block_length=8, denoising_steps=2, remasking_strategy="entropy_bounded")
    one_at_a_time = generate(model, list(range(5, 13)), eb_threshold=1e-9, **kw)
    assert one_at_a_time.block_steps == [8, 8]  # at least one per step, and only one
    all_at_once = generate(model, list(range(5, 13)), eb_threshold=1e9, **kw)
    assert all_at_once.block_steps == [1, 1]


def test_selection_never_touches_non_masks():
    params = DenoiseParams(block_length=8, denoising_steps=4, remasking_strategy="low_confidence_static")
    is_mask = torch.tensor([False, False, False, True, True, True, True, True])
    confidence = torch.tensor([0.99, 0.99, 0.99, 0.1, 0.5, 0.5, 0.5, 0.3])
    chosen = select_to_unmask(params, 0, is_mask, confidence, torch.zeros(8))
    # 2 per step; the three-way tie at 0.5 resolves to the lower positions; prompt never chosen
    assert chosen.tolist() == [False, False, False, False, True, True, False, False]
    last = select_to_unmask(params, 3, torch.tensor([False] * 7 + [True]), confidence, torch.zeros(8))
    assert last.tolist() == [False] * 7 + [True]


def test_eos_stops_after_its_block_and_cuts_after_it(model):
    prompt = [5, 6, 7]
    free = generate(model, prompt, gen_length=24, fuse_commit=True)
    index = next(i for i in range(4, 24) if free.tokens[i] not in free.tokens[:i])
    eos = free.tokens[index]
    stopped = generate(model, prompt, gen_length=24, fuse_commit=True, eos_token_id=eos)
    assert stopped.tokens == free.tokens[: index + 1]
    blocks_run = (len(prompt) % 4 + index) // 4 + 1
    assert len(stopped.block_steps) == blocks_run
    assert stopped.num_forwards == sum(free.block_steps[:blocks_run]) < free.num_forwards


def test_gen_length_cuts_exactly(model):
    for n in (1, 3, 5, 9):
        out = generate(model, [5, 6], gen_length=n)
        assert len(out.tokens) == n == len(out.step_map)


def test_sampling_is_seeded_and_degenerate_filters_equal_greedy(model):
    prompt = [9, 8, 7, 6, 5]
    kw = dict(gen_length=12, remasking_strategy="sequential")
    a = generate(model, prompt, temperature=1.0, seed=11, **kw)
    b = generate(model, prompt, temperature=1.0, seed=11, **kw)
    c = generate(model, prompt, temperature=1.0, seed=12, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = generate(model, prompt, **kw)
    assert generate(model, prompt, temperature=0.8, top_k=1, seed=1, **kw).tokens == greedy.tokens
    assert generate(model, prompt, temperature=0.8, top_p=1e-6, seed=1, **kw).tokens == greedy.tokens


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(gen_length=0), "gen_length"),
        (dict(block_length=0), "block_length"),
        (dict(denoising_steps=0), "denoising_steps"),
        (dict(block_length=4, denoising_steps=5), "denoising_steps"),
        (dict(remasking_strategy="random"), "remasking_strategy"),
        (dict(confidence_threshold=1.5), "confidence_threshold"),
        (dict(confidence_threshold=-0.1), "confidence_threshold"),
        (dict(eb_threshold=0.0), "eb_threshold"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed="x"), "seed"),
        (dict(mask_token_id=10**9), "mask_token_id"),
    ],
)
def test_bad_parameters_name_the_parameter(model, kwargs, name):
    kw = dict(gen_length=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        generate(model, [1, 2, 3], **kw)


def test_bad_prompt(model):
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [], gen_length=4)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [model.config.vocab_size], gen_length=4)


def test_mask_token_is_never_predicted():
    from vllm_dllm_spec.config import SamplingKnobs
    from vllm_dllm_spec.reference.generate import exclude_mask_token, predict

    logits = torch.tensor([[5.0, 1.0, 9.0], [0.0, 3.0, 8.0]])  # column 2 (the mask) ranks first
    out = exclude_mask_token(logits, 2)
    token, confidence, _, probs = predict(out, SamplingKnobs(), torch.Generator())
    assert token.tolist() == [0, 1] and float(probs[:, 2].sum()) == 0.0
    assert torch.equal(logits[:, 2], torch.tensor([9.0, 8.0]))  # the input is not modified
