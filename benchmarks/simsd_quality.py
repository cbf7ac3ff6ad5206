"""SimSD on held-out prompts against the target's plain block diffusion, same policy, one run:
target forwards per generated token, agreement with the target's plain greedy output, the
draft's cost, and the rope_copy ablation.

    python benchmarks/simsd_quality.py [--preset smoke|default] [--model DIR] [--draft DIR] [--out FILE.json]

Runs the pure-PyTorch oracles (`reference.generate`, `reference.simsd.simsd_generate`): the
vLLM path equals them token for token, forward counts included (tests/test_vllm_simsd.py), so
these figures are the plugin's, without engine noise. Variants: `simsd` (the draft model),
`simsd_self` (the target drafts for itself), `simsd_no_rope_copy` (the paper's ablation).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRESETS = {
    "smoke": dict(num_prompts=3, gen_length=16),
    "default": dict(num_prompts=24, gen_length=64),
}
POLICY = {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.85}


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two outputs hold the same token (after a first difference
    the texts usually drift apart, so this mostly measures where that happens)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def matched_prefix(a: list[int], b: list[int]) -> float:
    """Fraction of the output before the first difference."""
    n = max(len(a), len(b))
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / n if n else 1.0


def main(argv=None) -> dict:
    args = common.parse_args(__doc__, PRESETS, argv, draft=True)
    preset = PRESETS[args.preset]
    from tqdm import tqdm

    from vllm_dllm_spec.reference import SDARModel, generate
    from vllm_dllm_spec.reference.simsd import simsd_generate

    model_dir = args.model or common.default_model()
    draft_dir = args.draft if args.draft else (None if args.model else common.bundled_draft())
    target = SDARModel.from_pretrained(model_dir)
    draft = SDARModel.from_pretrained(draft_dir) if draft_dir else None
    prompts = common.prompts(model_dir, preset["num_prompts"])
    n = preset["gen_length"]
    variants = {"simsd_self": dict(draft=None, rope_copy=True),
                "simsd_no_rope_copy": dict(draft=None, rope_copy=False)}
    if draft is not None:
        variants = {"simsd": dict(draft=draft, rope_copy=True), **variants}

    plain, spec = [], {name: [] for name in variants}
    for p in tqdm(prompts, desc="simsd_quality", unit="prompt"):
        plain.append(generate(target, p, gen_length=n, fuse_commit=True, eos_token_id=-1, **POLICY))
        for name, v in variants.items():
            spec[name].append(simsd_generate(
                target, v["draft"], p, gen_length=n, rope_copy=v["rope_copy"], eos_token_id=-1,
                draft_remasking_strategy=POLICY["remasking_strategy"],
                confidence_threshold=POLICY["confidence_threshold"]))

    tokens = sum(len(o.tokens) for o in plain)
    rows = {"block_diffusion": {"target_forwards_per_token": sum(o.num_forwards for o in plain) / tokens,
                                "draft_forwards_per_token": 0.0, "token_agreement": 1.0, "matched_prefix": 1.0,
                                "exact_outputs": 1.0,
                                "accepted_per_round": None}}
    for name, outs in spec.items():
        toks = sum(len(o.tokens) for o in outs)
        rounds = [a for o in outs for a in o.accepted_per_round]
        rows[name] = {
            "target_forwards_per_token": sum(o.target_forwards for o in outs) / toks,
            "draft_forwards_per_token": sum(o.draft_forwards for o in outs) / toks,
            "token_agreement": sum(agreement(o.tokens, q.tokens) for o, q in zip(outs, plain)) / len(outs),
            "matched_prefix": sum(matched_prefix(o.tokens, q.tokens) for o, q in zip(outs, plain)) / len(outs),
            "exact_outputs": sum(o.tokens == q.tokens for o, q in zip(outs, plain)) / len(outs),
            "accepted_per_round": sum(rounds) / len(rounds),
            "acceptance_rate": sum(rounds) / sum(d for o in outs for d in o.drafted_per_round),
        }
    base = rows["block_diffusion"]["target_forwards_per_token"]
    for r in rows.values():
        r["target_forward_reduction"] = base / r["target_forwards_per_token"]
    path = common.write_json("simsd_quality", {"preset": args.preset, "model": model_dir, "draft": draft_dir,
                                               "policy": POLICY, "num_prompts": len(prompts), "gen_length": n,
                                               "results": rows}, args.out)
    print("SUMMARY simsd_quality " + ", ".join(
        f"{name}: {r['target_forwards_per_token']:.3f} target fwd/token ({r['target_forward_reduction']:.2f}x fewer), "
        f"agreement {r['token_agreement']:.0%} (prefix {r['matched_prefix']:.0%})"
        for name, r in rows.items()) + f"; json={path}")
    return rows


if __name__ == "__main__":
    main()
