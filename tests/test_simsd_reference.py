"""The pure-PyTorch SimSD oracle: exact where SimSD is exact (block length 1), the paper's
RoPE-copy ablation, MRS keeping the target's distribution, forward accounting."""
import pytest
import torch

from tolerances import assert_close
from vllm_dllm_spec.reference import SDARModel, generate
from vllm_dllm_spec.reference.simsd import simsd_generate

PROMPTS = [[5], [5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3], list(range(20, 33))]


@pytest.fixture(scope="module")
def target(tiny_ckpt):
    return SDARModel.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def other_draft(tiny_tied_ckpt):
    return SDARModel.from_pretrained(tiny_tied_ckpt)  # same tokenizer, different weights


@pytest.mark.parametrize("num_draft_blocks", [1, 3])
@pytest.mark.parametrize("self_draft", [True, False])
def test_block_length_one_is_exact(target, other_draft, num_draft_blocks, self_draft):
    """With B = 1 the reference-token mask gives each copy exactly the target's own context,
    so greedy SimSD must reproduce the target's plain decoding whatever the draft proposes."""
    draft = None if self_draft else other_draft
    for prompt in PROMPTS:
        plain = generate(target, prompt, gen_length=11, block_length=1, denoising_steps=1)
        spec = simsd_generate(target, draft, prompt, gen_length=11, block_length=1,
                              num_draft_blocks=num_draft_blocks)
        assert spec.tokens == plain.tokens
        assert_close(spec.logprobs, plain.logprobs)  # the copies see the target's own context
        assert spec.target_forwards == len(spec.accepted_per_round)
        finalized = [a + (a < d) for a, d in zip(spec.accepted_per_round, spec.drafted_per_round)]
        assert sum(finalized) >= 11
        if self_draft:
            assert all(a == d for a, d in zip(spec.accepted_per_round, spec.drafted_per_round))


@pytest.mark.parametrize("block_length", [4, 8])
def test_self_draft_first_round_follows_plain_block_diffusion(target, block_length):
    for prompt in PROMPTS:
        plain = generate(target, prompt, gen_length=16, block_length=block_length,
                         remasking_strategy="low_confidence_static", fuse_commit=True)
        spec = simsd_generate(target, None, prompt, gen_length=16, block_length=block_length,
                              draft_remasking_strategy="low_confidence_static")
        first = spec.accepted_per_round[0]
        assert spec.tokens[:first] == plain.tokens[:first]
        assert len(spec.tokens) == 16


def test_rope_copy_off_collapses_acceptance(target):
    def mean_acceptance(rope_copy: bool) -> float:
        accepted = drafted = 0
        for prompt in PROMPTS:
            out = simsd_generate(target, None, prompt, gen_length=16, rope_copy=rope_copy,
                                 draft_remasking_strategy="low_confidence_static")
            accepted += sum(out.accepted_per_round)
            drafted += sum(out.drafted_per_round)
        return accepted / drafted

    with_copy, without = mean_acceptance(True), mean_acceptance(False)
    assert with_copy > 0.5 and with_copy > 2 * without


def test_mrs_at_temperature_zero_equals_greedy_match(target, other_draft):
    for prompt in PROMPTS:
        kw = dict(gen_length=12, num_draft_blocks=2)
        greedy = simsd_generate(target, other_draft, prompt, **kw)
        mrs = simsd_generate(target, other_draft, prompt, verification="mrs", **kw)
        assert mrs.tokens == greedy.tokens and mrs.accepted_per_round == greedy.accepted_per_round


def test_forward_accounting_and_histogram(target, other_draft):
    out = simsd_generate(target, other_draft, list(range(5, 15)), gen_length=20, num_draft_blocks=2,
                         draft_denoising_steps=2, draft_remasking_strategy="sequential")
    rounds = len(out.accepted_per_round)
    assert out.target_forwards == rounds
    # sequential, 2 per step: the current block takes ceil(masks / 2) steps (its accepted
    # tokens are known), the next draft block 2 steps
    assert out.draft_forwards == sum(-(-(d - 4) // 2) + 2 for d in out.drafted_per_round)
    assert out.drafted_per_round[0] == 4 + 2  # 10-token prompt: 2 leftover tokens in block 0
    assert sum(out.acceptance_histogram.values()) == rounds


@pytest.fixture(scope="module")
def bundled_pair():
    import vllm_dllm_spec

    return (SDARModel.from_pretrained(vllm_dllm_spec.bundled_model_path()),
            SDARModel.from_pretrained(vllm_dllm_spec.bundled_model_path("draft")))


@pytest.mark.slow
@pytest.mark.parametrize("models", ["random", "bundled"])
def test_mrs_keeps_the_target_distribution(target, other_draft, bundled_pair, models):
    """First generated token (B = 1): empirical SimSD-MRS histogram vs the target's exact
    distribution (mask token excluded, top_k 8), on random weights and on the bundled trained
    target + draft. Expected total-variation noise at N=1500 over <= 8 tokens is about 0.03."""
    if models == "bundled":
        target, other_draft = bundled_pair
    prompt, temperature, top_k, n = [5, 6, 7], 1.0, 8, 1500
    counts = torch.zeros(target.config.vocab_size)
    for seed in range(n):
        out = simsd_generate(target, other_draft, prompt, gen_length=1, block_length=1,
                             verification="mrs", temperature=temperature, top_k=top_k, seed=seed)
        counts[out.tokens[0]] += 1
    mask_id = target.config.mask_token_id
    ids = torch.tensor([prompt + [mask_id]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        logits = target(ids, torch.arange(4)[None], causal)[0, -1] / temperature
    logits[mask_id] = float("-inf")
    kth = logits.topk(top_k).values[-1]
    exact = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.08, f"total variation {tv:.3f}"
