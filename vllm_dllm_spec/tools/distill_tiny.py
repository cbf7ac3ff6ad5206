"""Certainty-forcing self-distillation of the bundled tiny SDAR checkpoints (issue 12): the stage
`train_tiny` runs after pre-training, so that the target decodes several tokens per forward and
the draft predicts what the target will say.

    python -m vllm_dllm_spec.tools.distill_tiny --base DIR --out DIR   # DIR/sdar-tiny-{target,draft}

Why: a model pre-trained on real code is rarely confident about two masked positions of a block
at once (docs/MODELS.md), so `low_confidence_dynamic` unmasks ~1 token per forward. Its own greedy
continuations, however, are a deterministic function of the prefix; fine-tuned on them with the
block-diffusion loss plus an entropy penalty at the masked positions it already predicts right
(certainty forcing, as in dParallel), the model becomes confident about several positions at once
while writing the same kind of text.

Steps (deterministic: fixed seeds, fixed data, one thread per process, two processes):
1. prompts: NUM_PROMPTS windows of PROMPT_TOKENS tokens starting at line starts of the TRAINING
   files (half at `def` lines like the held-out evaluation prompts, half at any non-blank line);
2. the pre-trained target continues every prompt by CONT_TOKENS tokens with its own greedy
   one-token-per-step block decoding (`low_confidence_static`, steps = block length; with a
   threshold policy the output is the same, docs/MODELS.md);
3. target and draft are fine-tuned at once on [prompt | continuation]: block-diffusion
   cross-entropy at masked continuation positions + entropy_weight x the entropy at masked
   continuation positions whose argmax is already the data token (summed, divided by the number
   of masked positions). The draft thereby learns what the target says. (Distilling the draft
   from the distilled target's own continuations instead was measured worse: those repeat more,
   docs/MODELS.md.)
4. the draft is aligned with the distilled target: KL(target || draft) at the same positions,
   both fed the same noisy sequences of the same data (SimSD acceptance 2.53 -> 2.87 measured).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_dllm_spec.reference.generate import block_causal_mask
from vllm_dllm_spec.reference.model import KVCache, SDARModel, rope_cos_sin
from vllm_dllm_spec.testing import write_checkpoint
from vllm_dllm_spec.tools import train_tiny

PROMPT_TOKENS = 48  # a multiple of the block size: every continuation starts a fresh block
CONT_TOKENS = 64
DECODE_BATCH = 256
_ANY_LINE = re.compile(r"^[ \t]*\S", re.M)


@dataclass(frozen=True)
class DistillConfig:
    """Fine-tuning schedule of one model."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    entropy_weight: float
    seed: int

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.entropy_weight >= 0 and 0 <= self.warmup < self.steps):
            raise ValueError(f"need lr > 0, entropy_weight >= 0, 0 <= warmup < steps: {self}")


NUM_PROMPTS = 4096
DATA_SEED = 2024
DISTILL = {
    "target": DistillConfig(steps=1500, batch_size=8, lr=5e-4, warmup=50, entropy_weight=3.0, seed=2024),
    "draft": DistillConfig(steps=2500, batch_size=8, lr=1e-3, warmup=50, entropy_weight=1.0, seed=2025),
    # then KL to the distilled target's distributions, same data (entropy_weight unused there)
    "draft_align": DistillConfig(steps=500, batch_size=8, lr=3e-4, warmup=20, entropy_weight=0.0, seed=2026),
}


# ----------------------------------------------------------------------------- data


def line_start_prompts(tok, docs: list[tuple[str, str]], num: int, seed: int,
                       prompt_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """[num, prompt_tokens]: token windows from seeded line starts of `docs`, half at `def`
    lines, half at any non-blank line."""
    gen = torch.Generator().manual_seed(seed)
    candidates = {"def": [], "line": []}
    for doc_idx, (_, text) in enumerate(docs):
        candidates["def"] += [(doc_idx, m.start()) for m in train_tiny.DEF_LINE.finditer(text)]
        candidates["line"] += [(doc_idx, m.start()) for m in _ANY_LINE.finditer(text)]
    chosen = []
    for kind, share in (("def", num // 2), ("line", num - num // 2)):
        pool = candidates[kind]
        order = torch.randperm(len(pool), generator=gen).tolist()
        picked = []
        for i in order:  # windows shorter than the prompt (end of a file) are skipped
            doc_idx, start = pool[i]
            text = docs[doc_idx][1][start: start + 16 * prompt_tokens]
            ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) >= prompt_tokens:
                picked.append(ids[:prompt_tokens])
            if len(picked) == share:
                break
        chosen += picked
    return torch.tensor(chosen, dtype=torch.long)


@torch.no_grad()
def greedy_continue(model: SDARModel, prompts: torch.Tensor, gen_length: int, *, batch: int = DECODE_BATCH,
                    progress: str | None = None) -> torch.Tensor:
    """Batched greedy block decoding, one token per step (the most confident masked position;
    ties -> lower position; the mask token is never predicted). prompts [N, P] with P a multiple
    of the block size -> continuations [N, gen_length]. Same decisions as
    `reference.generate(..., remasking_strategy="low_confidence_static")` up to float noise of
    the batched arithmetic."""
    cfg = model.config
    B, mask_id = cfg.block_size, cfg.mask_token_id
    n, p = prompts.shape
    if p % B or gen_length % B:
        raise ValueError(f"prompt length {p} and gen_length {gen_length} must be multiples of block {B}")
    outs = []
    chunks = prompts.split(batch)
    for chunk in tqdm(chunks, desc=progress, unit="batch", disable=progress is None):
        b = chunk.shape[0]
        rows = torch.arange(b)
        cache = KVCache(cfg.num_hidden_layers)
        pos = torch.arange(p)
        model(chunk, pos.expand(b, -1), block_causal_mask(0, p, B)[None].expand(b, -1, -1), cache, p)
        blocks = []
        for start in range(p, p + gen_length, B):
            block = torch.full((b, B), mask_id)
            block_pos = torch.arange(start, start + B).expand(b, -1)
            see_all = torch.ones(b, B, start + B, dtype=torch.bool)  # prefix + own block
            for _ in range(B):
                logits = model(block, block_pos, see_all, cache, 0)  # [b, B, V]
                logits[..., mask_id] = float("-inf")
                confidence, token = logits.softmax(-1).max(-1)  # [b, B]
                confidence = confidence.masked_fill(block != mask_id, -1.0)
                pick = confidence.argmax(-1)  # [b]: first index among equal maxima
                block[rows, pick] = token[rows, pick]
            model(block, block_pos, see_all, cache, B)  # commit the finished block's KV
            blocks.append(block)
        outs.append(torch.cat(blocks, 1))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- objective


class DistillObjective:
    """Block-diffusion loss on [prompt | continuation] sequences, counted on continuation blocks
    only. Without a teacher: cross-entropy to the data tokens plus certainty forcing,
    entropy_weight x the entropy at masked continuation positions whose argmax already equals
    the data token (summed, divided by the masked positions). With a teacher: KL(teacher ||
    model) at the same positions, both fed the same noisy sequence (aligns a draft with the
    target's distributions, not only with its argmax)."""

    def __init__(self, model: SDARModel, prompt_len: int, seq_len: int, entropy_weight: float,
                 autocast: bool = True, teacher: SDARModel | None = None):
        cfg = model.config
        self.autocast = autocast
        self.seq_len, self.block, self.mask_id = seq_len, cfg.block_size, cfg.mask_token_id
        self.entropy_weight = entropy_weight
        self.attn_mask = train_tiny.bd_attention_mask(seq_len, self.block)
        self.in_continuation = torch.arange(seq_len) >= prompt_len  # [T]
        self.teacher = teacher
        pos = torch.arange(seq_len).repeat(2)[None]
        self.rope = {id(m): rope_cos_sin(pos, m.config.head_dim, m.config.rope_theta, torch.float32)
                     for m in (model, teacher) if m is not None}

    def _logits(self, model: SDARModel, ids: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] at the counted positions of the noisy half."""
        cos, sin = self.rope[id(model)]
        with torch.autocast("cpu", dtype=train_tiny.TRAIN_AUTOCAST_DTYPE, enabled=self.autocast):
            hidden = train_tiny.fast_hidden(model, ids, cos, sin, self.attn_mask)
            return model.lm_head(hidden[:, self.seq_len:][counted]).float()

    def loss(self, model: SDARModel, x: torch.Tensor, gen: torch.Generator):
        """(loss, CE to the data tokens, accuracy) for a batch x [b, T]."""
        noisy, masked = train_tiny.mask_blocks(x, self.block, self.mask_id, gen)
        counted = masked & self.in_continuation  # [b, T]
        ids = torch.cat([x, noisy], 1)
        logits = self._logits(model, ids, counted)  # [n, V]
        target = x[counted]
        ce = F.cross_entropy(logits, target)
        logp = logits.log_softmax(-1)
        correct = logits.argmax(-1) == target
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logp = self._logits(self.teacher, ids, counted).log_softmax(-1)
            loss = F.kl_div(logp, teacher_logp, log_target=True, reduction="batchmean")
        else:
            entropy = -(logp.exp() * logp).sum(-1)  # [n]
            loss = ce + self.entropy_weight * (entropy * correct).sum() / max(1, int(correct.numel()))
        return loss, ce.detach(), correct.float().mean()


def finetune(model: SDARModel, data: torch.Tensor, prompt_len: int, cfg: DistillConfig, name: str,
             log=print, teacher: SDARModel | None = None) -> dict:
    """AdamW fine-tuning of `model` (in place) on data [N, T] (towards `teacher`'s distributions
    when given); returns the training history."""
    model.train()
    objective = DistillObjective(model, prompt_len, data.shape[1], cfg.entropy_weight, teacher=teacher)
    params = list(model.parameters())
    opt = train_tiny.adamw(model, cfg.lr)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history = {"step": [], "loss": [], "ce": [], "acc": []}
    run = torch.zeros(3)
    start = time.perf_counter()
    bar = tqdm(enumerate(train_tiny.batches(data.flatten(), data.shape[1], cfg.batch_size, cfg.steps, cfg.seed + 2)),
               total=cfg.steps, desc=f"distill {name}", unit="step", mininterval=10)
    for step, x in bar:
        for group in opt.param_groups:
            group["lr"] = train_tiny.lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        loss, ce, acc = objective.loss(model, x, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run += torch.tensor([loss.item(), ce.item(), acc.item()])
        if (step + 1) % 10 == 0:
            history["step"].append(step + 1)
            for key, value in zip(("loss", "ce", "acc"), (run / 10).tolist()):
                history[key].append(round(value, 4))
            run.zero_()
            bar.set_postfix(loss=history["loss"][-1], ce=history["ce"][-1], acc=history["acc"][-1])
    history["seconds"] = round(time.perf_counter() - start, 1)
    last = {key: history[key][-1] if history[key] else float("nan") for key in ("loss", "ce", "acc")}
    log(f"[{name}] distilled {cfg.steps} steps in {history['seconds']:.0f}s: loss {last['loss']:.3f} "
        f"ce {last['ce']:.3f} acc {last['acc']:.3f}")
    return history


# ----------------------------------------------------------------------------- pipeline


def plot_curves(train_log: dict, path: Path, title: str) -> None:
    """Two panels: pre-training loss (train and held-out) and distillation loss (total and CE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, dist = train_log["history"], train_log["distill"]["history"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    left.plot(pre["step"], pre["train_loss"], label="train (masked CE, mean of 10 steps)")
    left.plot(pre["eval_step"], pre["heldout_loss"], "o-", label="held-out (masked CE)")
    left.set_title("pre-training")
    right.plot(dist["step"], dist["loss"], label="CE + certainty term")
    right.plot(dist["step"], dist["ce"], label="CE (continuation blocks)")
    if "align" in train_log["distill"]:
        align = train_log["distill"]["align"]["history"]
        offset = dist["step"][-1] if dist["step"] else 0
        right.plot([offset + s for s in align["step"]], align["loss"], label="KL to the distilled target")
    right.set_title("self-distillation")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)



def _continue_part(base: Path, prompts: torch.Tensor, part: int) -> torch.Tensor:
    """Worker: the base target continues its share of the prompts (one thread)."""
    torch.set_num_threads(1)
    teacher = SDARModel.from_pretrained(base / "sdar-tiny-target")
    return greedy_continue(teacher, prompts, CONT_TOKENS, progress=f"continue (part {part})")


def _load(base: Path, name: str, state: dict | None = None) -> SDARModel:
    model = SDARModel.from_pretrained(base / f"sdar-tiny-{name}")
    if state is not None:
        model.load_state_dict(state)
    return model


def _finetune_worker(base: Path, name: str, cfg: DistillConfig, data: torch.Tensor, start: dict | None = None,
                     teacher: dict | None = None) -> tuple[dict, dict]:
    """Worker: fine-tunes one model (base weights, or the bf16 state `start`) on the data, towards
    the target state `teacher` when given (one thread); returns (bf16 state, history)."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model = _load(base, name, start)
    teacher_model = None if teacher is None else _load(base, "target", teacher).eval()
    history = finetune(model, data, PROMPT_TOKENS, cfg, name, teacher=teacher_model)
    return train_tiny.bf16_state(model.eval()), history


def distill_pair(base: Path, out: Path, tok, train_docs, *, num_prompts: int = NUM_PROMPTS,
                 configs: dict[str, DistillConfig] = DISTILL, log=print) -> dict:
    """base/sdar-tiny-{target,draft} -> out/sdar-tiny-{target,draft}, distilled; returns facts.

    One data set serves both models: the base target's greedy continuations (the draft learns
    what the target says; the distilled target keeps saying it, more confidently). Two worker
    processes, one thread each: the continuations in two halves, then the two fine-tunings at
    once, then the draft's alignment with the distilled target's distributions (KL)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    prompts = line_start_prompts(tok, train_docs, num_prompts, DATA_SEED)  # [N, P]
    halves = prompts.tensor_split(2)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_continue_part, [base, base], halves, [0, 1]))
        data = torch.cat([prompts, torch.cat(parts)], 1)  # [N, P + CONT_TOKENS]
        gen_seconds = time.perf_counter() - t0
        log(f"[distill] {len(prompts)} continuations by the base target in {gen_seconds:.0f}s")
        names = ["target", "draft"]
        results = dict(zip(names, pool.map(_finetune_worker, [base, base], names, [configs[n] for n in names],
                                           [data, data])))
        aligned = pool.submit(_finetune_worker, base, "draft", configs["draft_align"], data,
                              results["draft"][0], results["target"][0]).result()
    facts = {}
    for name, (state, history) in results.items():
        facts[name] = {"config": asdict(configs[name]), "num_prompts": len(prompts), "data_seed": DATA_SEED,
                       "prompt_tokens": PROMPT_TOKENS, "continuation_tokens": CONT_TOKENS,
                       "teacher": "pre-trained target", "generate_seconds": round(gen_seconds, 1),
                       "history": history}
    results["draft"] = aligned
    stage_seconds = round(time.perf_counter() - t0, 1)  # all training done; writing takes a second
    for fact in facts.values():
        fact["stage_seconds"] = stage_seconds
    facts["draft"]["align"] = {"config": asdict(configs["draft_align"]), "teacher": "distilled target (KL)",
                               "history": aligned[1]}
    for name, (state, _) in results.items():
        dst = out / f"sdar-tiny-{name}"
        if dst.resolve() != (base / f"sdar-tiny-{name}").resolve():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(base / f"sdar-tiny-{name}", dst)
        write_checkpoint(dst, json.loads((dst / "config.json").read_text()), state)
        train_log = json.loads((dst / "training_log.json").read_text())
        train_log["distill"] = facts[name]
        (dst / "training_log.json").write_text(json.dumps(train_log, indent=1) + "\n")
        plot_curves(train_log, dst / "loss_curve.png", f"sdar-tiny-{name}: block-diffusion loss (block 4)")
    log(f"[distill] done in {stage_seconds:.0f}s")
    return facts


def run_stage(base: Path, out: Path, tokenizer_dir: Path, *, num_prompts: int | None = None,
              steps: int | None = None) -> dict:
    """The stage as `train_tiny` runs it (corpus and tokenizer of the pre-training run); the
    defaults are the shipped schedule, num_prompts / steps shrink it for quick runs."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    train_docs, _ = train_tiny.load_corpus()
    configs = DISTILL if steps is None else {
        name: replace(cfg, steps=steps, warmup=min(cfg.warmup, steps - 1)) for name, cfg in DISTILL.items()}
    return distill_pair(base, out, tok, train_docs, num_prompts=num_prompts or NUM_PROMPTS, configs=configs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="parent dir of the pre-trained sdar-tiny-*")
    ap.add_argument("--out", type=Path, required=True, help="parent dir for the distilled sdar-tiny-*")
    ap.add_argument("--num-prompts", type=int, default=None, help=f"data size (default {NUM_PROMPTS})")
    ap.add_argument("--steps", type=int, default=None, help="steps of both models (default: DISTILL)")
    args = ap.parse_args(argv)
    run_stage(args.base, args.out, args.base / "sdar-tiny-target", num_prompts=args.num_prompts, steps=args.steps)


if __name__ == "__main__":
    main()
