"""PSD-style self-speculative block diffusion (`reference.psd.psd_generate`) against plain greedy
block diffusion on held-out prompts, one run: tokens per forward, block copies evaluated per
token (the verification's extra work), steps accepted per verification, and a check that every
output is identical to plain decoding (the method is lossless).

    python benchmarks/psd_oracle.py [--preset smoke|default] [--model DIR] [--out FILE.json]

Oracle runs (pure PyTorch, one prompt at a time): forward counts are the method's, not a
throughput (the vLLM method `psd` equals this oracle; its tokens/s: benchmarks/throughput.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRESETS = {
    "smoke": dict(num_prompts=2, gen_length=12, depths=[1, 3], strategies=["low_confidence_dynamic"]),
    "default": dict(num_prompts=16, gen_length=64, depths=[1, 2, 3],
                    strategies=["low_confidence_dynamic", "sequential", "entropy_bounded"]),
}


def main(argv=None) -> list[dict]:
    args = common.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    import torch
    from tqdm import tqdm

    from vllm_dllm_spec.reference import SDARModel, generate
    from vllm_dllm_spec.reference.psd import psd_generate

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model_dir = args.model or common.default_model()
    model = SDARModel.from_pretrained(model_dir)
    prompts = common.prompts(model_dir, preset["num_prompts"])
    n = preset["gen_length"]
    rows = []
    work = [(s, d) for s in preset["strategies"] for d in [0] + preset["depths"]]  # 0 = plain
    plain = {}
    for strategy, depth in tqdm(work, desc="psd_oracle", unit="config"):
        if depth == 0:
            plain[strategy] = [generate(model, p, gen_length=n, fuse_commit=True, remasking_strategy=strategy)
                               for p in prompts]
            outs = plain[strategy]
            evals = sum(o.num_forwards for o in outs)
            accepted = None
        else:
            outs = [psd_generate(model, p, gen_length=n, draft_depth=depth, remasking_strategy=strategy)
                    for p in prompts]
            evals = sum(o.num_state_evals for o in outs)
            acc = [a for o in outs for a in o.accepted_per_verification]
            accepted = sum(acc) / len(acc) if acc else None
        tokens = sum(len(o.tokens) for o in outs)
        forwards = sum(o.num_forwards for o in outs)
        rows.append({
            "strategy": strategy, "method": "plain" if depth == 0 else "psd", "draft_depth": depth,
            "tokens_per_forward": tokens / forwards,
            "block_copies_per_token": evals / tokens,
            "accepted_per_verification": accepted,
            "identical_to_plain": sum(o.tokens == q.tokens and o.step_map == q.step_map
                                      for o, q in zip(outs, plain[strategy])) / len(outs),
        })
    for r in rows:
        base = next(b for b in rows if b["strategy"] == r["strategy"] and b["method"] == "plain")
        r["forward_reduction"] = r["tokens_per_forward"] / base["tokens_per_forward"]
    path = common.write_json("psd_oracle", {"preset": args.preset, "model": model_dir, "num_prompts": len(prompts),
                                            "gen_length": n, "results": rows}, args.out)
    best = {s: max((r for r in rows if r["strategy"] == s), key=lambda r: r["tokens_per_forward"])
            for s in preset["strategies"]}
    print("SUMMARY psd_oracle " + ", ".join(
        f"{s}: {r['tokens_per_forward']:.2f} tok/fwd at depth {r['draft_depth']} ({r['forward_reduction']:.2f}x "
        f"plain)" for s, r in best.items())
        + f"; identical to plain {min(r['identical_to_plain'] for r in rows):.0%}; json={path}")
    return rows


if __name__ == "__main__":
    main()
