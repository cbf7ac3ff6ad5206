"""Evaluates the bundled tiny SDAR checkpoints on the held-out split, with the reference generator.

    python -m vllm_dllm_spec.tools.evaluate_tiny                # full evaluation, prints figures
    python -m vllm_dllm_spec.tools.evaluate_tiny --write-cards  # ... and writes them to the model cards
    python -m vllm_dllm_spec.tools.evaluate_tiny --quick        # a few prompts, seconds

Figures (all greedy, temperature 0):
- masked-token accuracy: the training objective's layout ([clean | noisy], per block of 4 a
  random k in 1..4 of the tokens masked, fixed seed) on held-out sequences, run through the
  reference `SDARModel.forward`; overall and per number of masks in the block.
- tokens per forward (TPF) = generated tokens / model forwards, with `fuse_commit=True` (the
  product's mode: a block's KV commit is fused into the next block's first denoising forward,
  and the prompt prefill into the first one), for `low_confidence_dynamic` at thresholds
  0.7 / 0.85 / 0.95 and `low_confidence_static` with denoising_steps = B (one token per step)
  and B / 2 (two per step), at block 4 and 8.
- agreement with greedy one-token-per-step decoding (`low_confidence_static`,
  denoising_steps = block length, same block length): % of prompts whose whole output is
  identical, and the mean fraction of the one-per-step output matched by the common prefix.
- draft vs target: along the target's own greedy output (block 4), the draft denoises each
  block from the same prefix; reported: % of draft tokens equal to the target's, mean leading
  run of equal tokens per block (what greedy_match verification accepts before the bonus
  token), % of blocks equal as a whole.

Prompts: in every held-out file (see train_tiny's docstring for the split) the middle line that
starts a `def`, tokenized, first PROMPT_TOKENS tokens; files without one are skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vllm_dllm_spec.reference.generate import generate
from vllm_dllm_spec.reference.model import SDARModel
from vllm_dllm_spec.tools import train_tiny

PROMPT_TOKENS = 48
GEN_LENGTH = 64
THRESHOLDS = (0.7, 0.85, 0.9, 0.95)


def default_paths() -> tuple[Path, Path]:
    from vllm_dllm_spec import bundled_model_path

    return Path(bundled_model_path("target")), Path(bundled_model_path("draft"))


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def heldout_docs() -> list[tuple[str, str]]:
    root = train_tiny.stdlib_dir()
    return [
        (rel, (root / rel).read_bytes().decode("utf-8", errors="replace"))
        for rel in train_tiny.corpus_files(root)
        if train_tiny.is_heldout(rel)
    ]


def def_windows(tok, num: int, min_tokens: int, max_tokens: int | None = None) -> list[tuple[str, list[int]]]:
    """[(relpath, ids)]: the tokens from the middle `def` line of each held-out file on (at most
    max_tokens of them), for the first `num` files that have at least min_tokens there."""
    out = []
    for rel, text in heldout_docs():
        starts = [m.start() for m in train_tiny.DEF_LINE.finditer(text)]
        if not starts:
            continue
        ids = tok.backend_tokenizer.encode(text[starts[len(starts) // 2]:], add_special_tokens=False).ids
        if len(ids) < min_tokens:
            continue
        out.append((rel, ids[: max_tokens or min_tokens]))
        if len(out) == num:
            break
    return out


def heldout_prompts(tok, num: int, prompt_tokens: int = PROMPT_TOKENS) -> list[tuple[str, list[int]]]:
    """[(relpath, prompt ids)]: the middle `def` line of each held-out file and what follows."""
    return def_windows(tok, num, prompt_tokens + 8, prompt_tokens)


@torch.no_grad()
def masked_token_accuracy(model: SDARModel, stream: torch.Tensor, num_seqs: int, seed: int = 7) -> dict:
    """Accuracy at masked positions, by the reference forward on the training layout."""
    cfg = model.config
    T, B = train_tiny.SEQ_LEN, cfg.block_size
    n_chunks = stream.numel() // T
    idx = torch.linspace(0, n_chunks - 1, num_seqs).long()  # spread over the held-out stream
    x = stream[: n_chunks * T].view(n_chunks, T)[idx]
    gen = torch.Generator().manual_seed(seed)
    noisy, masked = train_tiny.mask_blocks(x, B, cfg.mask_token_id, gen)
    attn = train_tiny.bd_attention_mask(T, B)
    pos = torch.arange(T).repeat(2)
    correct = torch.zeros(B + 1)
    total = torch.zeros(B + 1)
    nll = 0.0
    for i in range(0, num_seqs, 8):
        xs, ns, ms = x[i: i + 8], noisy[i: i + 8], masked[i: i + 8]
        b = xs.shape[0]
        logits = model(torch.cat([xs, ns], 1), pos[None].expand(b, -1), attn[None].expand(b, -1, -1))[:, T:]
        hit = logits.argmax(-1) == xs
        nll += float(torch.nn.functional.cross_entropy(logits[ms], xs[ms], reduction="sum"))
        k = ms.view(b, -1, B).sum(-1, keepdim=True).expand(-1, -1, B).reshape(b, T)  # masks in block
        for kk in range(1, B + 1):
            sel = ms & (k == kk)
            correct[kk] += float((hit & sel).sum())
            total[kk] += float(sel.sum())
    return {
        "accuracy": float(correct.sum() / total.sum()),
        "loss": nll / float(total.sum()),
        "by_masks_in_block": {str(kk): float(correct[kk] / total[kk]) for kk in range(1, B + 1)},
        "num_masked_tokens": int(total.sum()),
    }


def _gen(model, prompt, **kw):
    return generate(model, prompt, temperature=0.0, fuse_commit=True, **kw)


def decoding_figures(model: SDARModel, prompts, blocks, gen_length: int, thresholds=THRESHOLDS) -> dict:
    """TPF per strategy and agreement with one-token-per-step decoding, per block length."""
    out = {}
    for B in blocks:
        configs = {f"dynamic@{t}": dict(remasking_strategy="low_confidence_dynamic", confidence_threshold=t,
                                         denoising_steps=B) for t in thresholds}
        configs["static(steps=B)"] = dict(remasking_strategy="low_confidence_static", denoising_steps=B)
        configs["static(steps=B/2)"] = dict(remasking_strategy="low_confidence_static",
                                            denoising_steps=max(1, B // 2))
        results = {name: [] for name in configs}
        for _, prompt in prompts:
            for name, kw in configs.items():
                results[name].append(_gen(model, prompt, gen_length=gen_length, block_length=B, **kw))
        ref = results["static(steps=B)"]
        figs = {}
        for name, outs in results.items():
            toks = sum(len(o.tokens) for o in outs)
            fwds = sum(o.num_forwards for o in outs)
            exact = sum(o.tokens == r.tokens for o, r in zip(outs, ref)) / len(outs)
            prefix = sum(_common_prefix(o.tokens, r.tokens) / max(1, len(r.tokens)) for o, r in zip(outs, ref))
            figs[name] = {
                "tokens_per_forward": toks / fwds,
                "tokens": toks,
                "forwards": fwds,
                "match_one_per_step_exact": exact,
                "match_one_per_step_prefix": prefix / len(outs),
            }
        out[f"block{B}"] = figs
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def draft_acceptance(target: SDARModel, draft: SDARModel, prompts, gen_length: int, block: int = 4) -> dict:
    """Along the target's greedy output, the draft denoises each block from the same prefix."""
    out = {}
    modes = {
        "dynamic@0.85": dict(remasking_strategy="low_confidence_dynamic", confidence_threshold=0.85),
        "static(steps=B)": dict(remasking_strategy="low_confidence_static"),
    }
    for mode, kw in modes.items():
        same = total = lead = blocks = whole = 0
        for _, prompt in prompts:
            tgt = _gen(target, prompt, gen_length=gen_length, block_length=block, denoising_steps=block, **kw).tokens
            start = 0
            first = block - len(prompt) % block  # generated tokens in the first (partial) block
            while start < len(tgt):
                size = first if start == 0 else block
                want = tgt[start: start + size]
                got = _gen(draft, list(prompt) + tgt[:start], gen_length=len(want), block_length=block,
                           denoising_steps=block, **kw).tokens
                got = got + [-1] * (len(want) - len(got))
                same += sum(a == b for a, b in zip(got, want))
                total += len(want)
                lead += _common_prefix(got, want)
                whole += got == want
                blocks += 1
                start += size
        out[mode] = {
            "token_match": same / total,
            "mean_accepted_per_block": lead / blocks,
            "block_match": whole / blocks,
            "blocks": blocks,
        }
    return out


def simsd_acceptance(target: SDARModel, draft: SDARModel, prompts, gen_length: int,
                     self_draft: bool = True) -> dict:
    """SimSD (the oracle; greedy_match, K=1, block 4, the draft decodes dynamic 0.85) with the draft
    model (and with self-draft): drafted tokens accepted per round, target forwards per token."""
    from vllm_dllm_spec.reference.simsd import simsd_generate

    out = {}
    for name, drafter in (("draft", draft), ("self_draft", None))[: 2 if self_draft else 1]:
        accepted, tokens, forwards = [], 0, 0
        for _, prompt in prompts:
            o = simsd_generate(target, drafter, prompt, gen_length=gen_length,
                               draft_remasking_strategy="low_confidence_dynamic", confidence_threshold=0.85)
            accepted += o.accepted_per_round
            tokens += len(o.tokens)
            forwards += o.target_forwards
        out[name] = {"accepted_per_round": sum(accepted) / len(accepted), "rounds": len(accepted),
                     "target_forwards_per_token": forwards / tokens}
    return out


def sample_text(model: SDARModel, tok, prompt: list[int], gen_length: int = GEN_LENGTH) -> dict:
    o = _gen(model, prompt, gen_length=gen_length, block_length=4, denoising_steps=4,
             remasking_strategy="low_confidence_dynamic", confidence_threshold=0.85)
    return {"prompt": tok.decode(prompt), "completion": tok.decode(o.tokens),
            "tokens_per_forward": len(o.tokens) / o.num_forwards}


def evaluate(target_path: Path, draft_path: Path, *, quick: bool = False, num_prompts: int | None = None,
             log=print) -> dict:
    torch.set_num_threads(1)  # tiny models gain nothing from threads; on a busy machine they stall
    t0 = time.perf_counter()
    tok = load_tokenizer(target_path)
    n = num_prompts or (4 if quick else 32)
    gen_length = 32 if quick else GEN_LENGTH
    prompts = heldout_prompts(tok, n)
    blocks = (4,) if quick else (4, 8)
    thresholds = (0.85,) if quick else THRESHOLDS
    stream = train_tiny.encode_docs(tok, heldout_docs())
    results = {
        "settings": {"num_prompts": len(prompts), "prompt_tokens": PROMPT_TOKENS, "gen_length": gen_length,
                     "fuse_commit": True, "temperature": 0.0, "prompt_files": [r for r, _ in prompts]},
    }
    models = {}
    for name, path in (("target", target_path), ("draft", draft_path)):
        model = SDARModel.from_pretrained(path)
        models[name] = model
        res = {"num_parameters": sum(p.numel() for p in model.parameters())}
        res["masked_token_accuracy"] = masked_token_accuracy(model, stream, 8 if quick else 64)
        log(f"[{name}] masked-token accuracy {res['masked_token_accuracy']['accuracy']:.3f} "
            f"(by masks in block {_fmt(res['masked_token_accuracy']['by_masks_in_block'])})")
        res["decoding"] = decoding_figures(model, prompts, blocks, gen_length, thresholds)
        for blk, figs in res["decoding"].items():
            for cfg, f in figs.items():
                log(f"[{name}] {blk} {cfg:18s} TPF {f['tokens_per_forward']:.3f}  "
                    f"== one-per-step: exact {f['match_one_per_step_exact']:.0%} "
                    f"prefix {f['match_one_per_step_prefix']:.0%}")
        res["sample"] = sample_text(model, tok, prompts[0][1], gen_length)
        results[name] = res
    results["draft_vs_target"] = draft_acceptance(models["target"], models["draft"], prompts, gen_length)
    for mode, f in results["draft_vs_target"].items():
        log(f"[draft vs target] block4 {mode}: token match {f['token_match']:.1%}, accepted "
            f"{f['mean_accepted_per_block']:.2f}/block, whole block {f['block_match']:.1%} ({f['blocks']} blocks)")
    results["simsd"] = simsd_acceptance(models["target"], models["draft"], prompts, gen_length)
    for name, f in results["simsd"].items():
        log(f"[simsd {name}] accepted {f['accepted_per_round']:.2f} drafted tokens per round, "
            f"{f['target_forwards_per_token']:.3f} target forwards per token ({f['rounds']} rounds)")
    results["eval_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"evaluation took {results['eval_seconds']}s")
    return results


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}: {v:.3f}" for k, v in d.items())


# ----------------------------------------------------------------------------- model cards


def write_card(path: Path, name: str, results: dict | None) -> None:
    log = json.loads((path / "training_log.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    c = log["corpus"]
    size = (path / "model.safetensors").stat().st_size
    lines = [
        f"# sdar-tiny-{name}",
        "",
        f"A tiny SDAR block-diffusion language model ({'target' if name == 'target' else 'draft for speculative decoding'}), "
        "trained from scratch on CPU by `python -m vllm_dllm_spec.tools.train_tiny` and bundled with "
        "`vllm_dllm_spec` as the default model of examples, tests and benchmarks "
        f"(`vllm_dllm_spec.bundled_model_path({'' if name == 'target' else repr(name)})`). "
        "It writes Python-stdlib-like code; it is a test fixture, not a useful assistant.",
        "",
        "## Architecture",
        "",
        f"- `SDARForCausalLM` (Qwen3 layers: q/k RMSNorm, GQA, RoPE theta {cfg['rope_theta']:g}), "
        f"{log['num_parameters']:,} parameters, weights bfloat16 ({size / 1e6:.1f} MB)",
        f"- hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads "
        f"x head_dim {cfg['head_dim']}, {cfg['num_key_value_heads']} KV heads, MLP {cfg['intermediate_size']}, "
        f"tied embeddings: {cfg['tie_word_embeddings']}",
        f"- vocab {cfg['vocab_size']} (byte-level BPE), eos `<|endoftext|>` = {cfg['eos_token_id']}, "
        f"mask `<|mask|>` = {cfg['mask_token_id']}, block_size {cfg['block_size']}",
        "",
        "## Training",
        "",
        f"- Corpus: the `.py` files of the CPython {c['python']} standard library "
        f"(`{c['root']}`; no site-packages, test dirs, encodings, pydoc_data, build-specific files), "
        f"{c['num_train_files']} training files ({c['train_tokens']:,} tokens), "
        f"{c['num_heldout_files']} held-out files ({c['heldout_tokens']:,} tokens); held out iff "
        f"`{c['heldout_rule']}`; file list sha256 `{c['file_list_sha256'][:16]}...`",
        f"- Objective: block diffusion at block {log['train']['block_size']} ([clean | noisy] of "
        f"{log['train']['seq_len']} tokens each; per block k ~ U{{1..4}} masks; noisy block attends "
        "bidirectionally to itself and to clean earlier blocks; CE at masked positions, no shift)",
        f"- {log['train']['steps']} AdamW steps x {log['train']['batch_size']} sequences, peak lr "
        f"{log['train']['lr']}, warmup {log['train']['warmup']}, cosine to 10 %, seed {log['seed']}, "
        f"matmuls under CPU {log['train'].get('autocast', 'float32 (no)')} autocast, torch {log['torch']}",
        f"- Wall time {log['train_seconds'] / 60:.1f} min for this model, {log.get('threads', 1)} thread "
        f"(1-min load average {log['load_avg_at_start'][0]} at start, {log['load_avg_at_end'][0]} at end "
        "on a shared 2-core machine); the two models train at once, one process each"
        + (f"; tokenizer + both models {log['total_train_seconds_both_models'] / 60:.1f} min wall"
           if "total_train_seconds_both_models" in log and "distill" not in log else ""),
        (f"- CPU time {log['train_cpu_seconds'] / 60:.1f} min (about the wall time on an idle core)"
         if "train_cpu_seconds" in log else "- CPU time: see docs/MODELS.md"),
        f"- End of training, first 32 held-out sequences: masked-token loss "
        f"{log['history']['heldout_loss'][-1]:.3f}, accuracy {log['history']['heldout_acc'][-1]:.3f}",
        "",
    ]
    if "distill" in log:
        d = log["distill"]
        dc = d["config"]
        lines += [
            "## Distillation (`tools.distill_tiny`)",
            "",
            f"- Both models together: {d['stage_seconds'] / 60:.1f} min wall (two processes, one thread each) "
            "after pre-training" if "stage_seconds" in d else "- Timing: see docs/MODELS.md",
            f"- Certainty-forcing self-distillation after pre-training: {d['num_prompts']} prompts of "
            f"{d['prompt_tokens']} tokens from line starts of the training files, continued by "
            f"{d['continuation_tokens']} tokens with the {d['teacher']}'s greedy one-token-per-step block "
            f"decoding ({d['generate_seconds'] / 60:.1f} min)",
            f"- {dc['steps']} AdamW steps x {dc['batch_size']} sequences, peak lr {dc['lr']}, warmup "
            f"{dc['warmup']}, cosine to 10 %: block-diffusion CE on the continuation blocks + "
            f"{dc['entropy_weight']} x entropy at masked positions already predicted right "
            f"({d['history']['seconds'] / 60:.1f} min); final CE {d['history']['ce'][-1]:.3f}, "
            f"masked accuracy on the distillation data {d['history']['acc'][-1]:.3f}",
        ]
        if "align" in d:
            a = d["align"]
            lines.append(f"- Then aligned with the distilled target: {a['config']['steps']} steps, peak lr "
                         f"{a['config']['lr']}, KL(target || draft) at masked continuation positions, same data "
                         f"({a['history']['seconds'] / 60:.1f} min); final KL {a['history']['loss'][-1]:.3f}")
        lines += ["- Why and how it was chosen: docs/MODELS.md", ""]
    lines += ["![training loss](loss_curve.png)", ""]
    if results is not None:
        r = results[name]
        s = results["settings"]
        mta = r["masked_token_accuracy"]
        lines += [
            "## Evaluation (held-out split, `python -m vllm_dllm_spec.tools.evaluate_tiny`)",
            "",
            f"Masked-token accuracy: **{mta['accuracy']:.3f}** (loss {mta['loss']:.3f}; by masks in the "
            f"block: {_fmt(mta['by_masks_in_block'])}; {mta['num_masked_tokens']} masked tokens)",
            "",
            f"Greedy decoding of {s['num_prompts']} held-out prompts ({s['prompt_tokens']} tokens each, "
            f"{s['gen_length']} generated), reference generator with `fuse_commit=True` (prefill fused "
            "with the first denoising step, each block's commit with the next block's first step). "
            "TPF = generated tokens / forwards. \"= 1/step\" compares with greedy one-token-per-step "
            "decoding (`low_confidence_static`, steps = block length): exact = whole output identical, "
            "prefix = mean fraction matched before the first difference.",
            "",
            "| block | strategy | tokens/forward | = 1/step exact | = 1/step prefix |",
            "|---|---|---|---|---|",
        ]
        for blk, figs in r["decoding"].items():
            for cfg_name, f in figs.items():
                lines.append(f"| {blk[5:]} | {cfg_name} | {f['tokens_per_forward']:.2f} | "
                             f"{f['match_one_per_step_exact']:.0%} | {f['match_one_per_step_prefix']:.0%} |")
        lines += [""]
        if name == "draft":
            lines += [
                "Draft vs target (block 4, along the target's greedy output; the draft denoises each "
                "block from the same prefix):",
                "",
                "| mode | token match | accepted per block (leading run) | whole block equal |",
                "|---|---|---|---|",
            ]
            for mode, f in results["draft_vs_target"].items():
                lines.append(f"| {mode} | {f['token_match']:.1%} | {f['mean_accepted_per_block']:.2f} | "
                             f"{f['block_match']:.1%} |")
            lines += [""]
            if "simsd" in results:
                lines += [
                    "SimSD with this draft (oracle; greedy_match, one draft block, block 4, the draft "
                    "decodes dynamic 0.85), against self-draft:",
                    "",
                    "| drafter | drafted tokens accepted per round | target forwards per token |",
                    "|---|---|---|",
                ]
                for drafter, f in results["simsd"].items():
                    lines.append(f"| {drafter} | {f['accepted_per_round']:.2f} | "
                                 f"{f['target_forwards_per_token']:.3f} |")
                lines += [""]
        smp = r["sample"]
        lines += [
            f"Sample (held-out `{s['prompt_files'][0]}`, dynamic 0.85, block 4, "
            f"{smp['tokens_per_forward']:.2f} tokens/forward). Prompt:",
            "",
            "```python",
            smp["prompt"],
            "```",
            "",
            "Completion (continues the prompt's last line):",
            "",
            "```python",
            smp["completion"],
            "```",
            "",
        ]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "python -m vllm_dllm_spec.tools.train_tiny        # both models, then the evaluation and these cards",
        "python -m vllm_dllm_spec.tools.evaluate_tiny     # figures only",
        "```",
        "",
    ]
    (path / "README.md").write_text("\n".join(lines))


def rewrite_cards(target: Path, draft: Path) -> None:
    """Re-renders both model cards from the stored eval_results.json (no evaluation)."""
    for name, path in (("target", target), ("draft", draft)):
        results = json.loads((path / "eval_results.json").read_text())
        write_card(path, name, results)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=None)
    ap.add_argument("--draft", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="4 prompts, 32 tokens, block 4 only")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--total-train-seconds", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--write-cards", action="store_true",
                    help="write README.md (model card) and eval_results.json into both checkpoints")
    args = ap.parse_args(argv)
    target, draft = default_paths() if args.target is None or args.draft is None else (None, None)
    target = args.target or target
    draft = args.draft or draft
    results = evaluate(target, draft, quick=args.quick, num_prompts=args.num_prompts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_cards:
        for name, path in (("target", target), ("draft", draft)):
            if args.total_train_seconds is not None:
                log = json.loads((path / "training_log.json").read_text())
                log["total_train_seconds_both_models"] = args.total_train_seconds
                (path / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
            (path / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
            write_card(path, name, results)
    return results


if __name__ == "__main__":
    main()
