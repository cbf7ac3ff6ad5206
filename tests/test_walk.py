"""The batched real steps of drafted states (vllm_dllm_spec/walk.py) against the reference's one
step at a time (`reference.generate.predict` + `select_to_unmask`), and greedy next states +
`ops.graph_accept` against a sequential walk written like the Spiffy oracle's."""
import random

import pytest
import torch

from vllm_dllm_spec import ops
from vllm_dllm_spec.config import REMASKING_STRATEGIES, DenoiseParams, SamplingKnobs
from vllm_dllm_spec.denoise import predict_greedy
from vllm_dllm_spec.reference.generate import exclude_mask_token, predict, select_to_unmask
from vllm_dllm_spec.walk import PolicyTable, greedy_next_states, sampled_next_state

MASK, V = 7, 12


def reference_step(params, step, state, logits, knobs=SamplingKnobs(), generator=None):
    token, confidence, entropy, _ = predict(exclude_mask_token(logits, MASK), knobs, generator)
    chosen = select_to_unmask(params, step, state == MASK, confidence, entropy)
    return torch.where(chosen, token, state)


def random_case(seed, R, C, B):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    params = [DenoiseParams(block_length=B, denoising_steps=rng.randint(1, B),
                            remasking_strategy=rng.choice(REMASKING_STRATEGIES),
                            confidence_threshold=rng.choice([0.2, 0.5, 0.9]), eb_threshold=rng.choice([0.5, 2.0]))
              for _ in range(R)]
    states = torch.randint(0, V, (R, C, B), generator=g)
    states[torch.rand((R, C, B), generator=g) < 0.6] = MASK
    states[:, :, 0] = MASK  # every copy has a mask
    logits = torch.randn((R, C, B, V), generator=g) * 2
    logits[..., 3] = logits[..., 4]  # exact ties between tokens
    logits[:, :, 1] = logits[:, :, 2]  # and between positions
    return params, states, logits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("B", [4, 8])
def test_greedy_next_states_equal_reference_steps(seed, B):
    R, C, D = 6, 3, 4
    params, states, logits = random_case(seed, R, C, B)
    steps = torch.randint(0, 2, (R, C, 1)) + torch.arange(D)  # [R, C, D]
    table = PolicyTable.of(params, int(steps.max()))
    masked = logits.clone()
    masked[..., MASK] = float("-inf")
    tok, conf, ent = (t.view(R, C, B) for t in predict_greedy(masked.view(-1, V)))
    nxt = greedy_next_states(states, tok, conf, ent, steps, table, MASK)
    checked = 0
    for r in range(R):
        for c in range(C):
            for d in range(D):
                s = int(steps[r, c, d])
                if params[r].remasking_strategy != "entropy_bounded" and s >= params[r].denoising_steps:
                    continue  # past the schedule: a state the walk cannot stand on
                want = reference_step(params[r], s, states[r, c], logits[r, c])
                assert torch.equal(nxt[r, c, d], want), (r, c, d, params[r])
                checked += 1
    assert checked > R * C


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 3, 0.9)])
def test_sampled_next_state_equals_reference_draw(temperature, top_k, top_p):
    params, states, logits = random_case(5, 4, 1, 8)
    knobs = SamplingKnobs(temperature, top_k, top_p)
    table = PolicyTable.of(params, 8)
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for r in range(4):  # one generator, consumed step after step, as a request's
        masked = exclude_mask_token(logits[r, 0], MASK)
        got = sampled_next_state(states[r, 0], masked, 0, r, table, knobs, ours, MASK)
        assert torch.equal(got, reference_step(params[r], 0, states[r, 0], logits[r, 0], knobs, theirs))


@pytest.mark.parametrize("seed", range(6))
def test_greedy_walk_equals_sequential_walk(seed):
    """Drafts = real future states (so walks go deep) mixed with wrong ones; greedy next states
    + graph_accept reach the state a step-by-step walk reaches, in as many steps."""
    R, C, B = 5, 5, 8
    params, states, logits = random_case(seed, R, C, B)
    params = [DenoiseParams(B, B, p.remasking_strategy, p.confidence_threshold, p.eb_threshold) for p in params]
    g = torch.Generator().manual_seed(seed)
    for r in range(R):  # copies 1..: the true path from copy 0, then a corrupted state
        state = states[r, 0]
        for c in range(1, C):
            state = reference_step(params[r], c - 1, state, logits[r, c - 1])
            if torch.rand((), generator=g) < 0.3 and bool((state == MASK).any()):
                state = state.clone()
                state[(state == MASK).nonzero()[0]] = 1  # a state plain decoding does not reach
            states[r, c] = state if bool((state == MASK).any()) else states[r, c - 1]
    copies = torch.full((R,), C)
    table = PolicyTable.of(params, C)
    masked = logits.clone()
    masked[..., MASK] = float("-inf")
    tok, conf, ent = (t.view(R, C, B) for t in predict_greedy(masked.view(-1, V)))
    steps = torch.arange(C).expand(R, C, C)
    nxt = greedy_next_states(states, tok, conf, ent, steps, table, MASK)
    path_len, path = ops.graph_accept(states[:, 1:], nxt, copies - 1)
    for r in range(R):
        cur, n = 0, 0
        while True:  # the oracle's walk
            real = reference_step(params[r], n, states[r, cur], logits[r, cur])
            hit = [i for i in range(1, C) if torch.equal(states[r, i], real)]
            if not hit or not bool((real == MASK).any()):
                break
            cur, n = hit[0], n + 1
        assert int(path_len[r]) == n
        last = int(path[r, n - 1]) if n else -1
        assert torch.equal(nxt[r, last + 1, n], real)
    assert int(path_len.max()) >= 2
