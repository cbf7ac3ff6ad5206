"""Output quality of every decoding method against the TRUE continuation of held-out prompts, one
run: edit similarity of the decoded text, exact match of the first line, target forwards per
generated token.

    python benchmarks/quality.py [--preset smoke|default] [--model DIR] [--draft DIR]
                                 [--compare DIR ...] [--out FILE.json]

Prompts: the held-out stdlib files of the bundled models' split (`tools.evaluate_tiny`), 48 tokens
from the middle `def` line of each; the truth is the file's text that follows, gen_length tokens.
Rows: plain block diffusion (`low_confidence_static` one token per step, `low_confidence_dynamic`
at 0.85 and 0.7), SimSD (the draft model, and self-draft; greedy_match, K=1, the draft decodes
dynamic 0.85), PSD (depth 3, dynamic 0.85). `--compare DIR` adds the plain rows of other target
checkpoints (e.g. the pre-distillation target) to the same run.

Runs the pure-PyTorch oracles: the vLLM path equals them token for token (tests/test_vllm_*.py).
Edit similarity = 1 - Levenshtein(output, truth) / max(len(output), len(truth)), on characters;
distinct 4-grams = distinct / all token 4-grams of an output (repetition shows as low values; the
truth's own figure is in the JSON).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRESETS = {
    "smoke": dict(num_prompts=2, gen_length=12),
    "default": dict(num_prompts=64, gen_length=64),
}
DYNAMIC = {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.85}


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / the longer length (1.0 for two empty strings)."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def distinct_ngrams(tokens: list[int], n: int = 4) -> float:
    """Distinct n-grams / n-grams of one output: low values mean repetition loops."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def prompts_with_truth(tok, num: int, gen_length: int, prompt_tokens: int = 48):
    """[(prompt ids, true continuation text)] from the held-out split."""
    from vllm_dllm_spec.tools.evaluate_tiny import def_windows

    return [(ids[:prompt_tokens], tok.decode(ids[prompt_tokens: prompt_tokens + gen_length]))
            for _, ids in def_windows(tok, num, prompt_tokens + gen_length)]


def main(argv=None) -> dict:
    parser_extra = [("--compare", dict(nargs="*", default=[], help="other target dirs: plain rows only"))]
    args = common.parse_args(__doc__, PRESETS, argv, draft=True, extra=parser_extra)
    preset = PRESETS[args.preset]
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_dllm_spec.reference import SDARModel, generate
    from vllm_dllm_spec.reference.psd import psd_generate
    from vllm_dllm_spec.reference.simsd import simsd_generate

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model_dir = args.model or common.default_model()
    draft_dir = args.draft if args.draft else (None if args.model else common.bundled_draft())
    n = preset["gen_length"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    cases = prompts_with_truth(tok, preset["num_prompts"], n)
    target = SDARModel.from_pretrained(model_dir)
    draft = SDARModel.from_pretrained(draft_dir) if draft_dir else None

    def plain_rows(model, tag: str) -> dict:
        return {
            f"{tag}static": lambda p: generate(model, p, gen_length=n, fuse_commit=True,
                                               remasking_strategy="low_confidence_static"),
            f"{tag}dynamic@0.85": lambda p: generate(model, p, gen_length=n, fuse_commit=True, **DYNAMIC),
            f"{tag}dynamic@0.7": lambda p: generate(model, p, gen_length=n, fuse_commit=True,
                                                    remasking_strategy="low_confidence_dynamic",
                                                    confidence_threshold=0.7),
        }

    def simsd(d):
        return lambda p: simsd_generate(target, d, p, gen_length=n, draft_remasking_strategy=DYNAMIC[
            "remasking_strategy"], confidence_threshold=DYNAMIC["confidence_threshold"])

    methods = plain_rows(target, "")
    if draft is not None:
        methods["simsd"] = simsd(draft)
    methods["simsd_self"] = simsd(None)
    methods["psd"] = lambda p: psd_generate(target, p, gen_length=n, draft_depth=3, **DYNAMIC)
    for i, other in enumerate(args.compare):
        methods.update(plain_rows(SDARModel.from_pretrained(other), f"compare{i}:"))

    rows = {}
    for name, run in tqdm(methods.items(), desc="quality", unit="method"):
        sims, firsts, distinct, tokens, forwards = [], [], [], 0, 0
        for prompt, truth in cases:
            out = run(prompt)
            text = tok.decode(out.tokens)
            sims.append(edit_similarity(text, truth))
            firsts.append(first_line(text) == first_line(truth))
            distinct.append(distinct_ngrams(out.tokens))
            tokens += len(out.tokens)
            forwards += out.target_forwards if hasattr(out, "target_forwards") else out.num_forwards
        rows[name] = {"edit_similarity": sum(sims) / len(sims), "first_line_exact": sum(firsts) / len(firsts),
                      "distinct_4grams": sum(distinct) / len(distinct),
                      "target_forwards_per_token": forwards / tokens, "tokens_per_forward": tokens / forwards}
    truth_tokens = [tok.encode(truth, add_special_tokens=False) for _, truth in cases]
    truth_distinct = sum(distinct_ngrams(t) for t in truth_tokens) / len(truth_tokens)
    base = rows["dynamic@0.85"]["edit_similarity"]
    for r in rows.values():
        r["similarity_vs_dynamic@0.85"] = r["edit_similarity"] / base if base else float("nan")
    path = common.write_json("quality", {"preset": args.preset, "model": model_dir, "draft": draft_dir,
                                         "compare": args.compare, "num_prompts": len(cases), "gen_length": n,
                                         "truth_distinct_4grams": truth_distinct,
                                         "results": rows}, args.out)
    print("SUMMARY quality " + ", ".join(
        f"{name}: sim {r['edit_similarity']:.3f} ({r['similarity_vs_dynamic@0.85']:.2f}x), "
        f"line1 {r['first_line_exact']:.0%}, distinct4 {r['distinct_4grams']:.2f}, {r['tokens_per_forward']:.2f} tok/fwd"
        for name, r in rows.items()) + f"; json={path}")
    return rows


if __name__ == "__main__":
    main()
