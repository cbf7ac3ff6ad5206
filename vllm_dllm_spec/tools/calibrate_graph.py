"""Calibrates a Spiffy draft graph (`reference/spiffy.py`) for a model, a block length and a
remasking strategy, from traces of plain greedy decoding.

    python -m vllm_dllm_spec.tools.calibrate_graph --model DIR --block-length B \\
        --remasking-strategy S --budget N --out graph.json [--selector greedy|degree1]

1. Trace: plain greedy `generate(..., fuse_commit=True)` on calibration prompts (held-out
   `def` windows AFTER the first --skip ones, which the benchmarks use: disjoint by default),
   recording every block state S_0 .. S_T and its logits L_t.
2. Read: every state S_t with masks can be a Spiffy root (decided from the stale L_{t-1});
   each later open state S_{t+d} of the block is expressed as the formula that turns S_t into
   it under L_{t-1} (`spiffy.formula_of`).
3. Select budget - 1 nodes, in priority order:
   - "greedy" (default): exact greedy simulation. For greedy decoding the run-time walk only
     needs the trace (a node is accepted iff it equals the next trace state), so the forward
     count of ANY graph on these prompts follows from step 2 alone (`simulate`, equal to
     `spiffy_generate`'s count: tests/test_calibrate_graph.py). Each round adds the node that
     saves the most forwards (ties: fewer copies, then the more frequent formula).
   - "degree1": the paper's degree-1 accumulation: score = count(q) + the counts of its
     parents (q minus one pair), grown as a connected graph from the root.
4. Write JSON: format version, model hash, knobs, limits, nodes, per node its count, and the
   simulated tokens per forward / block copies per token for each budget 2..N, for the graph,
   the PSD chain and plain decoding.

Deterministic (no clocks, no randomness in the output); the graph's budget prefix order means
one file serves every smaller budget.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_dllm_spec.config import REMASKING_STRATEGIES
from vllm_dllm_spec.reference.generate import block_params, generate
from vllm_dllm_spec.reference.model import SDARModel
from vllm_dllm_spec.reference.psd import policy_step
from vllm_dllm_spec.reference.spiffy import DraftGraph, Formula, formula_of

PROMPT_TOKENS = 48
BENCHMARK_PROMPTS = 16  # benchmarks/common.prompts takes the first held-out windows


@dataclass
class BlockTrace:
    """One block of plain greedy decoding: S_0 .. S_T (S_T complete)."""

    num_masks: list[int]  # [T + 1] masks left in S_t
    # futures[t][d - 1]: the formula turning S_t into S_{t+d} under L_{t-1}, for roots
    # t = 1 .. T - 1 and open states t + d < T (None: a token rank past the limit)
    futures: dict[int, list[Formula | None]]
    num_tokens: int  # generated tokens it contributes (after the cut at gen_length / eos)


class _TracingModel:
    """Wraps an SDARModel for `generate`: records each forward's block state and its logits."""

    def __init__(self, model: SDARModel, block_length: int):
        self.model, self.config, self.B = model, model.config, block_length
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, tokens, positions, mask, cache, num_store):
        logits = self.model(tokens, positions, mask, cache, num_store)
        self.records.append((tokens[0, -self.B:].clone(), logits[0, -self.B:].clone()))
        return logits


def trace_prompt(model: SDARModel, prompt: list[int], *, gen_length: int, params, max_token_rank: int,
                 eos_token_id: int | None = None) -> list[BlockTrace]:
    """Plain greedy decoding of one prompt, read as Spiffy roots and futures."""
    B, mask_id = params.block_length, model.config.mask_token_id
    tracer = _TracingModel(model, B)
    out = generate(tracer, prompt, gen_length=gen_length, fuse_commit=True, block_length=B,
                   denoising_steps=params.denoising_steps, remasking_strategy=params.remasking_strategy,
                   confidence_threshold=params.confidence_threshold, eb_threshold=params.eb_threshold,
                   eos_token_id=eos_token_id)
    blocks: list[BlockTrace] = []
    left = len(out.tokens)
    first_generated = (len(prompt) % B) if prompt else 0
    i = 0
    while i < len(tracer.records) and left > 0:
        states, logits = [tracer.records[i][0]], []
        while True:  # S_{t+1} = the greedy policy on (S_t, L_t): exactly generate's step
            logits.append(tracer.records[i][1])
            nxt, _ = policy_step(params, len(logits) - 1, states[-1], logits[-1], mask_id)
            states.append(nxt)
            i += 1
            if not bool((nxt == mask_id).any()):
                break
            if not torch.equal(tracer.records[i][0], nxt):
                raise AssertionError("trace out of step with generate")
        T = len(states) - 1
        futures = {t: [formula_of(states[t], states[k], logits[t - 1], params.remasking_strategy, mask_id,
                                  max_token_rank) for k in range(t + 1, T)]
                   for t in range(1, T)}
        n = min(B - first_generated, left)
        blocks.append(BlockTrace([int((s == mask_id).sum()) for s in states], futures, n))
        left -= n
        first_generated = 0
    return blocks


def simulate(traces: list[list[BlockTrace]], nodes, budget: int) -> dict:
    """Greedy Spiffy on traced prompts: forwards and block copies `spiffy_generate` would take
    with this graph (nodes = formulas in priority order) and budget, and the tokens."""
    seen, order = set(), []
    for q in nodes:  # instantiate drops duplicates before the budget
        if q not in seen and len({i for i, _ in q}) == len(q):
            seen.add(q)
            order.append(q)
    meta = [(q, max(i for i, _ in q), len(q)) for q in order]
    forwards = copies = tokens = 0
    for blocks in traces:
        for blk in blocks:
            tokens += blk.num_tokens
            T = len(blk.num_masks) - 1
            forwards += 1
            copies += 1
            t = 1
            while t < T:
                m = blk.num_masks[t]
                # open nodes that exist at this root (complete ones need no copy and end the
                # block whatever they are)
                live = [q for q, imax, size in meta if imax <= m and size < m][: budget - 1]
                forwards += 1
                copies += 1 + len(live)
                live = set(live)
                fut = blk.futures[t]
                d = 0
                while d < len(fut) and fut[d] in live:
                    d += 1
                t += d + 1
    return {"forwards": forwards, "block_copies": copies, "tokens": tokens,
            "tokens_per_forward": tokens / forwards, "block_copies_per_token": copies / tokens}


def formula_counts(traces) -> dict[Formula, int]:
    counts: dict[Formula, int] = {}
    for blocks in traces:
        for blk in blocks:
            for fut in blk.futures.values():
                for q in fut:
                    if q:
                        counts[q] = counts.get(q, 0) + 1
    return counts


def candidates(counts: dict[Formula, int], max_position_rank: int, limit: int) -> list[Formula]:
    """The most frequent formulas within the rank limits (ties: the smaller formula first)."""
    pool = [q for q in counts if max(i for i, _ in q) <= max_position_rank]
    return sorted(pool, key=lambda q: (-counts[q], len(q), q))[:limit]


def select_greedy(traces, pool: list[Formula], num_nodes: int) -> list[Formula]:
    chosen: list[Formula] = []
    for _ in range(num_nodes):
        best, best_key = None, None
        for q in pool:
            if q in chosen:
                continue
            r = simulate(traces, chosen + [q], len(chosen) + 2)
            key = (r["forwards"], r["block_copies"])
            if best_key is None or key < best_key:
                best, best_key = q, key
        if best is None:
            break
        chosen.append(best)
    return chosen


def parents(q: Formula) -> list[Formula]:
    return [q[:k] + q[k + 1:] for k in range(len(q))] if len(q) > 1 else [()]


def select_degree1(counts: dict[Formula, int], pool: list[Formula], num_nodes: int) -> list[Formula]:
    score = {q: counts[q] + sum(counts.get(p, 0) for p in parents(q)) for q in pool}
    chosen: list[Formula] = []
    reached = {()}
    for _ in range(num_nodes):
        ready = [q for q in pool if q not in reached and any(p in reached for p in parents(q))]
        if not ready:
            break
        best = min(ready, key=lambda q: (-score[q], len(q), q))
        chosen.append(best)
        reached.add(best)
    return chosen


def calibration_prompts(model_dir: str, num: int, skip: int = BENCHMARK_PROMPTS) -> list[list[int]]:
    """Held-out `def` windows after the first `skip` (the benchmarks' prompts)."""
    from vllm_dllm_spec.tools.evaluate_tiny import def_windows, load_tokenizer

    tok = load_tokenizer(Path(model_dir))
    found = [ids for _, ids in def_windows(tok, skip + num, PROMPT_TOKENS + 8, PROMPT_TOKENS)][skip:]
    if len(found) < num:
        raise ValueError(f"--prompts: only {len(found)} calibration prompts exist after the first {skip} "
                         f"held-out windows, asked for {num}")
    return found


def model_hash(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()


def calibrate(model_dir: str, *, block_length: int, remasking_strategy: str = "low_confidence_dynamic",
              denoising_steps: int | None = None, confidence_threshold: float = 0.85, eb_threshold: float = 0.35,
              budget: int = 8, selector: str = "greedy", num_prompts: int = 16, gen_length: int = 64,
              skip: int = BENCHMARK_PROMPTS, max_position_rank: int = 6, max_token_rank: int = 3,
              num_candidates: int = 120, prompts: list[list[int]] | None = None) -> DraftGraph:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"--budget must be an integer >= 1, got {budget!r}")
    if selector not in ("greedy", "degree1"):
        raise ValueError(f"--selector must be one of ('greedy', 'degree1'), got {selector!r}")
    model = SDARModel.from_pretrained(model_dir)
    params = block_params(model.config, block_length, denoising_steps, remasking_strategy, confidence_threshold,
                          eb_threshold)
    if prompts is None:
        prompts = calibration_prompts(model_dir, num_prompts, skip)
    traces = [trace_prompt(model, p, gen_length=gen_length, params=params, max_token_rank=max_token_rank)
              for p in prompts]
    counts = formula_counts(traces)
    pool = candidates(counts, max_position_rank, num_candidates)
    if selector == "greedy":
        nodes = select_greedy(traces, pool, budget - 1)
    else:
        nodes = select_degree1(counts, pool, budget - 1)
    B = params.block_length
    chain = DraftGraph.chain(budget, B).nodes

    def figures(graph_nodes, b):
        r = simulate(traces, graph_nodes, b)
        return {"tokens_per_forward": round(r["tokens_per_forward"], 6),
                "block_copies_per_token": round(r["block_copies_per_token"], 6)}

    meta = {
        "model": Path(model_dir).name,
        "model_sha256": model_hash(model_dir),
        "knobs": {"block_length": B, "denoising_steps": params.denoising_steps,
                  "remasking_strategy": params.remasking_strategy,
                  "confidence_threshold": params.confidence_threshold, "eb_threshold": params.eb_threshold},
        "ranks": "positions in the remasking policy's order, tokens by probability, under the stale "
                 "(one step old) distribution, untempered, ties to the lower index",
        "selector": selector,
        "limits": {"max_position_rank": max_position_rank, "max_token_rank": max_token_rank,
                   "num_candidates": num_candidates},
        "calibration": {"num_prompts": len(prompts), "gen_length": gen_length,
                        "prompts": f"held-out def windows {skip}..{skip + len(prompts) - 1}"},
        "node_counts": [counts.get(q, 0) for q in nodes],
        "simulated": {
            "plain": figures([], 1),
            "graph": {str(b): figures(nodes, b) for b in range(2, budget + 1)},
            "chain": {str(b): figures(chain[: b - 1], b) for b in range(2, budget + 1)},
        },
    }
    return DraftGraph(tuple(nodes), B, meta)


def main(argv=None) -> DraftGraph:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the bundled target)")
    ap.add_argument("--block-length", type=int, required=True)
    ap.add_argument("--remasking-strategy", default="low_confidence_dynamic", choices=REMASKING_STRATEGIES)
    ap.add_argument("--denoising-steps", type=int, default=None)
    ap.add_argument("--confidence-threshold", type=float, default=0.85)
    ap.add_argument("--eb-threshold", type=float, default=0.35)
    ap.add_argument("--budget", type=int, default=8, help="block copies per verification (graph nodes + 1)")
    ap.add_argument("--selector", default="greedy", choices=("greedy", "degree1"))
    ap.add_argument("--prompts", type=int, default=16, help="calibration prompts")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--skip", type=int, default=BENCHMARK_PROMPTS,
                    help="held-out windows left to the benchmarks (calibration starts after them)")
    ap.add_argument("--max-position-rank", type=int, default=6)
    ap.add_argument("--max-token-rank", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    # tiny matrices: one thread is fastest (and not slowed by the other cores' load)
    torch.set_num_threads(1)
    if args.model is None:
        from vllm_dllm_spec import bundled_model_path

        args.model = bundled_model_path("target")
    start = time.perf_counter()
    graph = calibrate(args.model, block_length=args.block_length, remasking_strategy=args.remasking_strategy,
                      denoising_steps=args.denoising_steps, confidence_threshold=args.confidence_threshold,
                      eb_threshold=args.eb_threshold, budget=args.budget, selector=args.selector,
                      num_prompts=args.prompts, gen_length=args.gen_length, skip=args.skip,
                      max_position_rank=args.max_position_rank, max_token_rank=args.max_token_rank)
    graph.to_json(args.out)
    sim = graph.meta["simulated"]
    print(f"calibrated {len(graph.nodes)} nodes in {time.perf_counter() - start:.1f}s -> {args.out}")
    print(f"plain: {sim['plain']['tokens_per_forward']:.3f} tokens/forward")
    for b in sim["graph"]:
        g, c = sim["graph"][b], sim["chain"][b]
        print(f"budget {b}: graph {g['tokens_per_forward']:.3f} tok/fwd {g['block_copies_per_token']:.3f} copies/tok"
              f" | chain {c['tokens_per_forward']:.3f} tok/fwd {c['block_copies_per_token']:.3f} copies/tok")
    print("nodes:", json.dumps([list(map(list, n)) for n in graph.nodes]))
    return graph


if __name__ == "__main__":
    main()
