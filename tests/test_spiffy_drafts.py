"""Spiffy's batched draft states (`spiffy.drafts`, what the vLLM runner drafts with) against the
oracle's `reference.spiffy.instantiate`, one request at a time: random roots and stale logits
with tied probabilities, every remasking strategy, mixed in one batch, block 4 and 8, empty /
chain / default / random graphs (duplicates, repeated and out-of-range ranks, complete states),
budgets 1..6."""
import random

import pytest

torch = pytest.importorskip("torch")

from vllm_dllm_spec.config import REMASKING_STRATEGIES  # noqa: E402
from vllm_dllm_spec.denoise import predict_greedy  # noqa: E402
from vllm_dllm_spec.reference.spiffy import DraftGraph, instantiate, load_graph  # noqa: E402
from vllm_dllm_spec.spiffy.drafts import open_drafts, priority_order, ranked_tokens  # noqa: E402
from test_spiffy_reference import random_graph  # noqa: E402

MASK, V = 5, 12


def batch(K: int, B: int, seed: int):
    """Roots [K, B] with at least one mask, stale logits [K, B, V] on a coarse grid (ties in
    probability, within and across positions), strategy codes [K]."""
    g = torch.Generator().manual_seed(seed)
    root = torch.randint(0, V, (K, B), generator=g)
    root[torch.rand((K, B), generator=g) < 0.6] = MASK
    root[torch.arange(K), torch.randint(0, B, (K,), generator=g)] = MASK
    logits = torch.randint(-2, 3, (K, B, V), generator=g).float()
    logits[:, :, MASK] = float("-inf")  # the runner's rows exclude the mask token
    strategy = torch.randint(0, len(REMASKING_STRATEGIES), (K,), generator=g)
    return root, logits, strategy


def batched(root, logits, strategy, graph, budget):
    K, B = root.shape
    token, confidence, entropy = (t.view(K, B) for t in predict_greedy(logits.view(K * B, V)))
    is_mask = root == MASK
    J = max(1, min(int(graph._tok_rank.max()) if graph.nodes else 1, V - 1))
    tokens = torch.zeros((K, B, J), dtype=torch.int64)
    tokens[is_mask] = ranked_tokens(logits[is_mask].softmax(-1), J)
    assert torch.equal(tokens[is_mask][:, 0], token[is_mask])  # rank 1 is the greedy prediction
    order = priority_order(is_mask, strategy, confidence, entropy)
    return open_drafts(root, order, tokens, graph, MASK, budget)


@pytest.mark.parametrize("B", [4, 8])
@pytest.mark.parametrize("kind", ["empty", "chain", "default", "random", "random_wide"])
def test_equals_instantiate(B, kind):
    graph = {"empty": DraftGraph((), B), "chain": DraftGraph.chain(5, B), "default": load_graph("default", B),
             "random": random_graph(B, 7 * B), "random_wide": random_graph(B, 3 + B, num_nodes=12)}[kind]
    rng = random.Random(B)
    for seed in range(6):
        budget = rng.randint(1, 6)
        root, logits, strategy = batch(9, B, seed)
        drafts, count = batched(root, logits, strategy, graph, budget)
        assert drafts.shape == (9, budget - 1, B)
        for k in range(9):
            want = instantiate(root[k], logits[k], graph, mask_id=MASK, budget=budget,
                               remasking_strategy=REMASKING_STRATEGIES[int(strategy[k])])
            want = want[(want == MASK).any(-1)]
            n = int(count[k])
            assert n == len(want), (k, n, want)
            assert torch.equal(drafts[k, :n], want)
            assert bool((drafts[k, n:] == root[k]).all())


def test_ranked_tokens_is_a_stable_descending_sort():
    probs = torch.randint(0, 4, (50, 30)).float() / 4
    for J in (1, 3, 29):
        assert torch.equal(ranked_tokens(probs, J), probs.sort(dim=-1, descending=True, stable=True).indices[:, :J])
