"""Spiffy: lossless auto-speculation over a calibrated draft graph, pure PyTorch: the oracle.

PSD drafts ONE chain of future block states from the stale logits; Spiffy drafts a set of them
(a directed graph of "formulas", calibrated offline: `tools/calibrate_graph.py`). Per block:

    L = forward(uncommitted + S0)                    the block's first forward (fused commit)
    root = step(S0, L)                               a real plain step: argmax or a seeded draw
    while root has masks:
        nodes = instantiate(root, L, graph, budget)  whole future states from the stale L
        V = forward([root] + open nodes)             ONE forward, one block copy each
        cur, Lc = root, V[root]
        loop: nxt = step(cur, Lc)                    the real next step, exact logits
              nxt complete -> block done             (no forward needed)
              nxt among nodes (state equality) -> cur, Lc = nxt, V[node]; continue
              else -> root, L = nxt, Lc; break

Lossless at any temperature: `step` is plain decoding's own step (`predict` + `select_to_unmask`)
on the exact logits of the exact state, called once per state in plain decoding's order, so the
seeded generator is consumed exactly as `generate` consumes it; drafts only cache the logits of
states the walk may reach. Tokens, step_map and logprobs equal `generate(..., fuse_commit=True)`
(greedy and sampled, same seed); the empty graph takes plain decoding's forwards; the chain
((1,1)), ((1,1),(2,1)), ... of D-1 nodes is `psd_generate(draft_depth=D)` for one-token steps
(`tests/test_spiffy_reference.py`). Copies run one by one here so their logits equal plain
decoding's bit for bit (a batched engine runs them as one block-diagonal pass).

Formula semantics: a node is a sorted tuple of pairs (i, j), 1-based: "the masked position of
priority rank i gets the token of rank j there". Ranks are taken on the stale distribution
(mask token excluded, untempered): positions in the remasking policy's own order
(`priority_order`), tokens by probability; ties go to the lower index (stable sorts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_dllm_spec.config import REMASKING_STRATEGIES, SamplingKnobs
from vllm_dllm_spec.reference.generate import (
    _validate,
    block_params,
    exclude_mask_token,
    is_finished,
    output_length,
    predict,
    select_to_unmask,
)
from vllm_dllm_spec.reference.model import KVCache, SDARModel
from vllm_dllm_spec.reference.psd import PSDOutput, split_prompt, state_evaluator

Formula = tuple[tuple[int, int], ...]

GRAPH_FORMAT = "vllm_dllm_spec.draft_graph"
GRAPH_VERSION = 1
DEFAULT_GRAPH_NAME = "draft_graph_b{block_length}.json"  # file name next to a model's weights

SpiffyOutput = PSDOutput  # tokens, step_map, num_forwards, num_state_evals, accepted_per_verification, logprobs


@dataclass(frozen=True)
class DraftGraph:
    """Formulas in priority order (a run-time budget keeps the first open ones)."""

    nodes: tuple[Formula, ...]
    block_length: int
    meta: dict = field(default_factory=dict, compare=False)
    # [N, K] int64 position / token ranks, 0 = padding; [N] bool: no position rank repeats
    _pos_rank: torch.Tensor = field(init=False, repr=False, compare=False)
    _tok_rank: torch.Tensor = field(init=False, repr=False, compare=False)
    _distinct: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        B = self.block_length
        if not isinstance(B, int) or isinstance(B, bool) or B < 1:
            raise ValueError(f"DraftGraph: block_length must be an integer >= 1, got {B!r}")
        if not isinstance(self.nodes, (tuple, list)):
            raise ValueError(f"DraftGraph: nodes must be a list of formulas, got {type(self.nodes).__name__}")
        nodes = tuple(_check_formula(n, k, B) for k, n in enumerate(self.nodes))
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "meta", dict(self.meta))
        K = max((len(n) for n in nodes), default=1)
        pos = torch.zeros(len(nodes), K, dtype=torch.long)
        tok = torch.zeros(len(nodes), K, dtype=torch.long)
        for r, node in enumerate(nodes):  # once per graph, not per step
            if node:
                pos[r, : len(node)] = torch.tensor([i for i, _ in node])
                tok[r, : len(node)] = torch.tensor([j for _, j in node])
        object.__setattr__(self, "_pos_rank", pos)
        object.__setattr__(self, "_tok_rank", tok)
        object.__setattr__(self, "_distinct", torch.tensor(
            [len({i for i, _ in n}) == len(n) for n in nodes], dtype=torch.bool))

    @classmethod
    def chain(cls, depth: int, block_length: int) -> "DraftGraph":
        """PSD's chain as a graph: ((1,1)), ((1,1),(2,1)), ... (depth - 1 nodes)."""
        nodes = tuple(tuple((i, 1) for i in range(1, d + 1)) for d in range(1, min(depth, block_length + 1)))
        return cls(nodes, block_length, {"kind": "chain"})

    def to_dict(self) -> dict:
        return {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "block_length": self.block_length,
                "nodes": [[list(p) for p in n] for n in self.nodes], "meta": self.meta}

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data, source: str = "draft graph") -> "DraftGraph":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != GRAPH_FORMAT:
            raise ValueError(f"{source}: format must be {GRAPH_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != GRAPH_VERSION:
            raise ValueError(f"{source}: unsupported version {data.get('version')!r} (this package reads "
                             f"version {GRAPH_VERSION})")
        nodes = data.get("nodes")
        if not isinstance(nodes, list):
            raise ValueError(f"{source}: 'nodes' must be a list of formulas, got {nodes!r}")
        try:
            return cls(tuple(nodes), data.get("block_length"), data.get("meta") or {})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path) -> "DraftGraph":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"draft graph {str(path)!r} cannot be read: {e}") from None
        return cls.from_dict(data, f"draft graph {str(path)!r}")


def _check_formula(node, k: int, B: int) -> Formula:
    def bad(why: str):
        return ValueError(f"node {k} {node!r} is malformed: {why}")

    if not isinstance(node, (tuple, list)) or not node:
        raise bad("a node is a non-empty list of [i, j] pairs")
    pairs = []
    for p in node:
        if (not isinstance(p, (tuple, list)) or len(p) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in p)):
            raise bad("each pair is [i, j], two integers >= 1")
        if p[0] > B:
            raise bad(f"position rank {p[0]} > block_length {B}")
        pairs.append((int(p[0]), int(p[1])))
    if pairs != sorted(set(pairs)):
        raise bad("pairs must be sorted and distinct")
    return tuple(pairs)


def default_graph_path(block_length: int, model_dir: str | None = None) -> Path:
    """Where the graph shipped for a model (default: the bundled target) at a block size lives."""
    if model_dir is None:
        from vllm_dllm_spec import bundled_model_path

        model_dir = bundled_model_path("target")
    return Path(model_dir) / DEFAULT_GRAPH_NAME.format(block_length=block_length)


def load_graph(spec: str, block_length: int, model_dir: str | None = None) -> DraftGraph:
    """spec: a JSON path, or "default" = the graph shipped next to `model_dir`'s weights (the
    bundled target when None) for this block length. ValueError names what is wrong."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"draft_graph must be a JSON path or 'default', got {spec!r}")
    if spec == "default":
        path = default_graph_path(block_length, model_dir)
        if not path.is_file():
            raise ValueError(
                f"draft_graph 'default': no graph ships for block_length {block_length} at {path}; "
                f"calibrate one (python -m vllm_dllm_spec.tools.calibrate_graph) and pass its path")
    else:
        path = Path(spec)
    graph = DraftGraph.from_json(path)
    if graph.block_length != block_length:
        raise ValueError(f"draft graph {str(path)!r} is for block_length {graph.block_length}, "
                         f"the request decodes block_length {block_length}")
    return graph


def priority_order(is_mask: torch.Tensor, probs: torch.Tensor, remasking_strategy: str) -> torch.Tensor:
    """is_mask [B], probs [B, V] (stale, mask excluded) -> masked positions [M] in the policy's
    own priority: sequential left to right, low_confidence_* by confidence (descending),
    entropy_bounded by entropy (ascending); ties to the lower position."""
    if remasking_strategy not in REMASKING_STRATEGIES:
        raise ValueError(f"remasking_strategy must be one of {REMASKING_STRATEGIES}, got {remasking_strategy!r}")
    num_masks = int(is_mask.sum())
    if remasking_strategy == "sequential":
        return torch.nonzero(is_mask).squeeze(-1)
    if remasking_strategy == "entropy_bounded":
        key = torch.special.entr(probs).sum(-1).masked_fill(~is_mask, float("inf"))
        return key.argsort(stable=True)[:num_masks]
    key = probs.max(-1).values.masked_fill(~is_mask, float("-inf"))
    return key.argsort(descending=True, stable=True)[:num_masks]


def num_token_ranks(max_token_rank: int, vocab_size: int) -> int:
    """J, how many stale token ranks a formula can name: max_token_rank, at least 1, at most
    V - 1 (the mask token is never ranked)."""
    return max(1, min(max_token_rank, vocab_size - 1))


def stale_ranks(root: torch.Tensor, stale_logits: torch.Tensor, remasking_strategy: str, mask_id: int,
                max_token_rank: int):
    """(positions [M] by priority, token ids [B, J] by stale probability, J = max_token_rank
    capped at V - 1): what the ranks of a formula refer to."""
    probs = exclude_mask_token(stale_logits, mask_id).float().softmax(-1)  # [B, V]
    order = priority_order(root == mask_id, probs, remasking_strategy)  # [M]
    J = num_token_ranks(max_token_rank, probs.shape[-1])
    tokens = probs.sort(dim=-1, descending=True, stable=True).indices[:, :J]  # [B, J]
    return order, tokens


def instantiate(root: torch.Tensor, stale_logits: torch.Tensor, graph: DraftGraph, *, remasking_strategy: str,
                mask_id: int, budget: int) -> torch.Tensor:
    """root [B] (has masks), stale_logits [B, V] (the logits root was decided from) -> [N, B]
    distinct draft states in graph order: each formula applied to root; formulas with a repeated
    position rank, i > #masks or j > V - 1 dropped, duplicates and root itself dropped. At most
    budget - 1 of them still have masks (each costs a verify copy); complete states (no mask
    left) are kept beyond that: they need no copy. Open ones: `(states == mask_id).any(-1)`."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"graph_budget must be an integer >= 1, got {budget!r}")
    B = root.numel()
    if graph.block_length != B:
        raise ValueError(f"draft graph is for block_length {graph.block_length}, the block has {B} positions")
    pos_rank, tok_rank = graph._pos_rank, graph._tok_rank  # [N, K]
    if pos_rank.shape[0] == 0:
        return root.new_empty(0, B)
    order, tokens = stale_ranks(root, stale_logits, remasking_strategy, mask_id, int(tok_rank.max()))
    M, J = order.numel(), tokens.shape[1]
    pad = pos_rank == 0  # [N, K]
    valid = graph._distinct & ((pos_rank <= M) & (tok_rank <= J) | pad).all(-1)  # [N]
    if M == 0:
        return root.new_empty(0, B)
    pos = torch.where(pad, B, order[(pos_rank - 1).clamp(0, M - 1)])  # [N, K]; B = a scratch column
    tok = tokens[pos.clamp(max=B - 1), (tok_rank - 1).clamp(0, J - 1)]  # [N, K]
    states = torch.cat([root, root.new_zeros(1)]).expand(len(pos), B + 1).clone()  # [N, B + 1]
    states.scatter_(1, pos, tok)  # valid rows have distinct positions; pads hit the scratch column
    states = states[:, :B]  # [N, B]
    same = (states[:, None, :] == states[None, :, :]).all(-1)  # [N, N]
    earlier = torch.ones_like(same).tril(-1)
    duplicate = (same & earlier & valid[None, :]).any(-1)
    keep = valid & ~duplicate & (states != root).any(-1)
    is_open = (states == mask_id).any(-1)
    keep &= ~is_open | ((keep & is_open).cumsum(0) <= budget - 1)
    return states[keep]


def formula_of(root: torch.Tensor, state: torch.Tensor, stale_logits: torch.Tensor, remasking_strategy: str,
               mask_id: int, max_token_rank: int) -> Formula | None:
    """The inverse of `instantiate`: the formula that turns root into `state` (a later state of
    the same block), or None if a token's rank exceeds max_token_rank. Calibration's reading of
    a trace."""
    order, tokens = stale_ranks(root, stale_logits, remasking_strategy, mask_id, max_token_rank)
    new = (root == mask_id) & (state != mask_id)  # [B]
    if not bool(new.any()):
        return ()
    rank_of = torch.full((root.numel(),), -1, dtype=torch.long)
    rank_of[order] = torch.arange(order.numel())
    hit = tokens == state[:, None]  # [B, J]
    if not bool(hit[new].any(-1).all()):
        return None
    j = hit.float().argmax(-1)  # [B]
    pos = torch.nonzero(new).squeeze(-1)
    pairs = torch.stack([rank_of[pos] + 1, j[pos] + 1], -1).tolist()
    return tuple(sorted((int(i), int(jj)) for i, jj in pairs))


def spiffy_generate(
    model: SDARModel,
    prompt_ids: list[int] | torch.Tensor,
    *,
    gen_length: int,
    graph: DraftGraph | str,
    graph_budget: int | None = None,
    block_length: int | None = None,
    denoising_steps: int | None = None,
    remasking_strategy: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.85,
    eb_threshold: float = 0.35,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> PSDOutput:
    """graph: a DraftGraph or a `load_graph` spec; graph_budget: block copies per verification
    (root + open nodes), default 1 + len(graph.nodes)."""
    cfg = model.config
    params = block_params(cfg, block_length, denoising_steps, remasking_strategy, confidence_threshold,
                          eb_threshold)
    knobs = SamplingKnobs(temperature=temperature, top_k=top_k, top_p=top_p)
    B = params.block_length
    if isinstance(graph, str):
        graph = load_graph(graph, B)
    if not isinstance(graph, DraftGraph):
        raise ValueError(f"graph must be a DraftGraph or a draft_graph spec, got {type(graph).__name__}")
    if graph.block_length != B:
        raise ValueError(f"draft graph is for block_length {graph.block_length}, block_length is {B}")
    budget = 1 + len(graph.nodes) if graph_budget is None else graph_budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"graph_budget must be an integer >= 1, got {graph_budget!r}")
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
    eos_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
    _validate(prompt, gen_length, seed, mask_id, cfg.vocab_size)

    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    cache = KVCache(cfg.num_hidden_layers)
    out = PSDOutput(tokens=[], step_map=[], num_forwards=0, num_state_evals=0)

    block_forward = state_evaluator(model, cache, out, B)
    uncommitted, block, first_generated = split_prompt(prompt, B, mask_id)
    logprobs: list[torch.Tensor] = []  # [n_i, V] per block
    while True:
        unmasked_at = torch.full((B,), -1)
        block_logprobs = None

        def real_step(state, logits, step):
            """Plain decoding's step on exact logits: the only consumer of the generator."""
            nonlocal block_logprobs
            lg = exclude_mask_token(logits, mask_id)
            token, confidence, entropy, _ = predict(lg, knobs, generator)
            chosen = select_to_unmask(params, step, state == mask_id, confidence, entropy)
            if block_logprobs is None:
                block_logprobs = torch.zeros_like(lg, dtype=torch.float32)  # [B, V]
            unmasked_at[chosen] = step
            block_logprobs[chosen] = lg.float().log_softmax(-1)[chosen]
            return torch.where(chosen, token, state)

        # the block's first forward: the previous block's (or the prompt's) commit fused in
        out.num_forwards += 1
        stale = block_forward(torch.cat([uncommitted, block]), uncommitted.numel())  # [B, V]
        step = 0
        if bool((block == mask_id).any()):
            block = real_step(block, stale, step)
            step += 1
        while bool((block == mask_id).any()):  # block = the root, decided from `stale`
            nodes = instantiate(block, stale, graph, remasking_strategy=params.remasking_strategy,
                                mask_id=mask_id, budget=budget)  # [N, B]
            open_nodes = nodes[(nodes == mask_id).any(-1)]
            out.num_forwards += 1  # one verification forward: root + open nodes, one copy each
            root_logits = block_forward(block, 0)
            verified = [block_forward(s, 0) for s in open_nodes]
            cur_logits, accepted = root_logits, 1
            while True:
                nxt = real_step(block, cur_logits, step)
                step += 1
                hit = torch.nonzero((nodes == nxt).all(-1)).flatten()
                accepted += int(hit.numel() > 0)
                block = nxt
                if not bool((nxt == mask_id).any()):
                    break  # complete: the block needs no more forwards
                hit = torch.nonzero((open_nodes == nxt).all(-1)).flatten()
                if hit.numel() == 0:
                    stale = cur_logits  # nxt is the next root, decided from these logits
                    break
                cur_logits = verified[int(hit[0])]
            out.accepted_per_verification.append(accepted)
        out.tokens += block[first_generated:].tolist()
        out.step_map += unmasked_at[first_generated:].tolist()
        logprobs.append(block_logprobs[first_generated:] if block_logprobs is not None
                        else torch.zeros(B - first_generated, cfg.vocab_size))
        first_generated = 0
        uncommitted = block
        if is_finished(out.tokens, gen_length, eos_id):
            break
        block = torch.full((B,), mask_id)

    keep = output_length(out.tokens, gen_length, eos_id)
    out.tokens, out.step_map = out.tokens[:keep], out.step_map[:keep]
    out.logprobs = torch.cat(logprobs)[:keep]
    return out
