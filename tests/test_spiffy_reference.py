"""The Spiffy oracle (`reference.spiffy`): draft graphs (validation, JSON, the shipped defaults),
`instantiate` against an obviously-correct per-formula loop, and the lossless claim: tokens,
step_map and logprobs equal plain block diffusion (`generate`, fuse_commit) for every strategy,
block 4 and 8, random and bundled weights, empty / chain / default / random graphs, greedy and
seeded sampling (same seed, same tokens); the empty graph takes plain's forwards, the chain is
PSD (forwards, copies, accepted steps)."""
import json
import random

import pytest

torch = pytest.importorskip("torch")

from vllm_dllm_spec import bundled_model_path  # noqa: E402
from vllm_dllm_spec.reference import SDARModel, generate  # noqa: E402
from vllm_dllm_spec.reference.psd import psd_generate  # noqa: E402
from vllm_dllm_spec.reference.spiffy import (  # noqa: E402
    DraftGraph,
    formula_of,
    instantiate,
    load_graph,
    spiffy_generate,
)
from tolerances import assert_close  # noqa: E402
from vllm_helpers import prompts_for, request_configs  # noqa: E402

STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded")


@pytest.fixture(scope="module")
def random_model(tiny_ckpt):
    return SDARModel.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def bundled():
    return SDARModel.from_pretrained(bundled_model_path())


def random_graph(block_length: int, seed: int, num_nodes: int = 5) -> DraftGraph:
    """Random formulas, with a duplicate, a repeated position rank, a rank past any block's
    masks, and a whole-block (complete-state) node."""
    rng = random.Random(seed)
    nodes = []
    for _ in range(num_nodes):
        ranks = rng.sample(range(1, block_length + 1), rng.randint(1, min(3, block_length)))
        nodes.append(tuple(sorted((i, rng.randint(1, 3)) for i in ranks)))
    nodes += [nodes[0], ((1, 1), (1, 2)), ((block_length, 1),),
              tuple((i, 1) for i in range(1, block_length + 1))]
    return DraftGraph(tuple(nodes), block_length)


def graphs(block_length: int) -> dict[str, DraftGraph]:
    return {"empty": DraftGraph((), block_length), "chain": DraftGraph.chain(4, block_length),
            "default": load_graph("default", block_length), "random": random_graph(block_length, block_length)}


def _check(model, prompt, gen_length, graph, budget=None, **knobs):
    plain = generate(model, prompt, gen_length=gen_length, fuse_commit=True, **knobs)
    spiffy = spiffy_generate(model, prompt, gen_length=gen_length, graph=graph, graph_budget=budget, **knobs)
    assert spiffy.tokens == plain.tokens
    assert spiffy.step_map == plain.step_map
    assert spiffy.logprobs.shape == (len(plain.tokens), model.config.vocab_size)
    assert_close(spiffy.logprobs, plain.logprobs)
    assert spiffy.num_forwards <= plain.num_forwards
    budget = 1 + len(graph.nodes) if budget is None else budget
    assert all(1 <= a <= 1 + len(graph.nodes) for a in spiffy.accepted_per_verification)
    # copies: one per first forward, at most `budget` per verification forward
    verifications = len(spiffy.accepted_per_verification)
    assert spiffy.num_state_evals <= spiffy.num_forwards - verifications + budget * verifications
    if not graph.nodes:
        assert spiffy.num_forwards == plain.num_forwards
        assert spiffy.num_state_evals == plain.num_forwards
    return plain, spiffy


# --- lossless ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block_length", [4, 8])
@pytest.mark.parametrize("kind", ["empty", "chain", "default", "random"])
def test_equals_plain_for_every_strategy_random_weights(random_model, block_length, kind):
    graph = graphs(block_length)[kind]
    prompts = prompts_for(random_model.config.vocab_size)
    for prompt, knobs in zip(prompts, request_configs(block_length)):
        _check(random_model, prompt, 13, graph, block_length=block_length, **knobs)
    _check(random_model, prompts[2], 13, graph, budget=2, block_length=block_length)  # budget cut


@pytest.mark.parametrize("block_length", [4, 8])
def test_equals_plain_on_the_bundled_model_with_fewer_forwards(bundled, block_length):
    from vllm_dllm_spec.tools.evaluate_tiny import heldout_prompts, load_tokenizer

    tok = load_tokenizer(bundled_model_path())
    plain_fw = spiffy_fw = 0
    prompts = [p for _, p in heldout_prompts(tok, 1)]
    for kind, graph in graphs(block_length).items():
        for strategy in STRATEGIES:
            for prompt in prompts:
                plain, spiffy = _check(bundled, prompt, 16, graph, block_length=block_length,
                                       remasking_strategy=strategy)
                if kind == "default":
                    plain_fw += plain.num_forwards
                    spiffy_fw += spiffy.num_forwards
    assert spiffy_fw < plain_fw  # the calibrated graph's drafts are accepted (lossless either way)


@pytest.mark.parametrize("block_length", [4, 8])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampling_is_seed_exact(random_model, bundled, block_length, temperature):
    """Drafts consume no randomness: the same seed gives plain sampled decoding's tokens."""
    prompts = prompts_for(random_model.config.vocab_size)
    cases = [(random_model, prompts[4], random_graph(block_length, 7)),
             (bundled, prompts[2], load_graph("default", block_length))]
    for seed, (model, prompt, graph) in enumerate(cases):
        for strategy, top in zip(STRATEGIES, [(0, 1.0), (20, 1.0), (0, 0.9), (50, 0.8)]):
            knobs = dict(block_length=block_length, remasking_strategy=strategy, temperature=temperature,
                         top_k=top[0], top_p=top[1], seed=seed)
            _check(model, prompt, 13, graph, **knobs)


@pytest.mark.parametrize("block_length", [4, 8])
@pytest.mark.parametrize("strategy", ["sequential", "low_confidence_static"])
def test_chain_graph_is_psd(random_model, bundled, block_length, strategy):
    """One token per step: the chain ((1,1)), ((1,1),(2,1)), ... of D-1 nodes drafts exactly PSD's
    states, so forwards, copies and accepted steps equal psd_generate(draft_depth=D)."""
    prompts = prompts_for(random_model.config.vocab_size)
    for model, prompt in [(random_model, prompts[5]), (bundled, prompts[2])]:
        for depth in (1, 3, 5):
            knobs = dict(block_length=block_length, remasking_strategy=strategy)
            _, spiffy = _check(model, prompt, 16, DraftGraph.chain(depth, block_length), **knobs)
            psd = psd_generate(model, prompt, gen_length=16, draft_depth=depth, **knobs)
            assert (spiffy.num_forwards, spiffy.num_state_evals) == (psd.num_forwards, psd.num_state_evals)
            assert spiffy.accepted_per_verification == psd.accepted_per_verification


def test_eos_and_gen_length_cut_like_plain(random_model):
    prompt = prompts_for(random_model.config.vocab_size)[3]
    plain = generate(random_model, prompt, gen_length=13, fuse_commit=True)
    graph = random_graph(4, 3)
    _check(random_model, prompt, 13, graph, eos_token_id=plain.tokens[5])
    _check(random_model, prompt, 13, graph)


def test_bad_knobs_name_the_parameter(random_model):
    graph = DraftGraph.chain(3, 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="graph_budget must be an integer >= 1"):
            spiffy_generate(random_model, [3, 4], gen_length=4, graph=graph, graph_budget=bad)
    with pytest.raises(ValueError, match="draft graph is for block_length 4, block_length is 8"):
        spiffy_generate(random_model, [3, 4], gen_length=4, graph=graph, block_length=8)
    with pytest.raises(ValueError, match="graph must be a DraftGraph"):
        spiffy_generate(random_model, [3, 4], gen_length=4, graph=[((1, 1),)])


# --- instantiate --------------------------------------------------------------------------------

def instantiate_loop(root, stale_logits, graph, strategy, mask_id, budget):
    """The obviously-correct twin: one formula at a time, Python sorts."""
    probs = stale_logits.float().clone()
    probs[:, mask_id] = float("-inf")
    probs = probs.softmax(-1)
    B, V = probs.shape
    masked = [p for p in range(B) if int(root[p]) == mask_id]
    if strategy == "sequential":
        key = {p: 0.0 for p in masked}
    elif strategy == "entropy_bounded":
        key = {p: float(torch.special.entr(probs[p]).sum()) for p in masked}
    else:
        key = {p: -float(probs[p].max()) for p in masked}
    order = sorted(masked, key=lambda p: (key[p], p))
    out, num_open = [], 0
    for node in graph.nodes:
        if len({i for i, _ in node}) < len(node) or any(i > len(order) or j > V - 1 for i, j in node):
            continue
        state = root.clone()
        for i, j in node:
            pos = order[i - 1]
            ranked = sorted(range(V), key=lambda v: (-float(probs[pos, v]), v))
            state[pos] = ranked[j - 1]
        if torch.equal(state, root) or any(torch.equal(state, s) for s in out):
            continue
        if bool((state == mask_id).any()):
            if num_open == budget - 1:
                continue
            num_open += 1
        out.append(state)
    return torch.stack(out) if out else root.new_empty(0, B)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_instantiate_equals_the_formula_loop(strategy):
    gen = torch.Generator().manual_seed(0)
    mask_id, V = 1, 40
    for trial in range(40):
        B = (4, 8)[trial % 2]
        logits = torch.randn(B, V, generator=gen)
        if trial % 3 == 0:  # ties: equal confidence and entropy across positions, equal tokens
            logits[1::2] = logits[0]
            logits[:, 5] = logits[:, 7]
        root = torch.randint(2, V, (B,), generator=gen)
        root[torch.rand(B, generator=gen) < 0.7] = mask_id
        if not bool((root == mask_id).any()):
            root[0] = mask_id
        graph = random_graph(B, trial, num_nodes=12)
        for budget in (1, 2, 4, 20):
            fast = instantiate(root, logits, graph, remasking_strategy=strategy, mask_id=mask_id, budget=budget)
            assert torch.equal(fast, instantiate_loop(root, logits, graph, strategy, mask_id, budget))
            assert int((fast == mask_id).any(-1).sum()) <= budget - 1


def test_formula_of_inverts_instantiate():
    gen = torch.Generator().manual_seed(1)
    mask_id = 1
    for trial in range(30):
        B = 8
        logits = torch.randn(B, 30, generator=gen)
        root = torch.full((B,), mask_id)
        root[:3] = torch.tensor([5, 6, 7])
        strategy = STRATEGIES[trial % 4]
        graph = random_graph(B, trial)
        for state in instantiate(root, logits, graph, remasking_strategy=strategy, mask_id=mask_id, budget=99):
            q = formula_of(root, state, logits, strategy, mask_id, max_token_rank=3)
            assert q in graph.nodes
            again = instantiate(root, logits, DraftGraph((q,), B), remasking_strategy=strategy, mask_id=mask_id,
                                budget=2)
            assert torch.equal(again, state[None])
        assert formula_of(root, root, logits, strategy, mask_id, 3) == ()


# --- graphs and files ---------------------------------------------------------------------------

def test_json_round_trip_and_defaults(tmp_path):
    graph = random_graph(8, 0)
    path = tmp_path / "g.json"
    graph.to_json(path)
    back = DraftGraph.from_json(path)
    assert back == graph and back.nodes == graph.nodes
    assert load_graph(str(path), 8) == graph
    for B in (4, 8):
        default = load_graph("default", B)
        assert default.block_length == B and default.nodes
        assert default.meta["knobs"]["block_length"] == B


def test_bad_graphs_are_clear_errors(tmp_path):
    good = DraftGraph.chain(3, 4).to_dict()

    def write(**change):
        path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({**good, **change}))
        return str(path)

    cases = [
        (write(version=99), "unsupported version 99"),
        (write(format="x"), "format must be"),
        (write(nodes="x"), "'nodes' must be a list"),
        (write(nodes=[[]]), "node 0 .* malformed: a node is a non-empty list"),
        (write(nodes=[[[1, 0]]]), "two integers >= 1"),
        (write(nodes=[[[1, 1, 1]]]), "two integers >= 1"),
        (write(nodes=[[[2, 1], [1, 1]]]), "sorted and distinct"),
        (write(nodes=[[[5, 1]]]), "position rank 5 > block_length 4"),
        (write(block_length=0), "block_length must be an integer >= 1"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            load_graph(path, 4)
    with pytest.raises(ValueError, match="is for block_length 4, the request decodes block_length 8"):
        load_graph(write(), 8)
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        load_graph(str(tmp_path / "garbage.json"), 4)
    with pytest.raises(ValueError, match="cannot be read"):
        load_graph(str(tmp_path / "missing.json"), 4)
    with pytest.raises(ValueError, match="no graph ships for block_length 16"):
        load_graph("default", 16)
    with pytest.raises(ValueError, match="no graph ships for block_length 4"):
        load_graph("default", 4, model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="draft_graph must be a JSON path or 'default'"):
        load_graph("", 4)
