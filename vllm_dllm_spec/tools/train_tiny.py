"""Trains the bundled tiny SDAR block-diffusion checkpoints (target + draft), on CPU.

    python -m vllm_dllm_spec.tools.train_tiny            # writes vllm_dllm_spec/models/sdar-tiny-*
    python -m vllm_dllm_spec.tools.train_tiny --no-eval  # checkpoints only (cards get no figures)

Two stages: pre-training (below) of both models, then certainty-forcing self-distillation
(`tools.distill_tiny`: both models fine-tuned on the pre-trained target's greedy continuations),
which makes the target decode several tokens per forward and the draft say what the target says.
`--no-distill` stops after pre-training.

Corpus (offline on every machine): the `.py` sources of the running interpreter's standard
library (`sysconfig.get_paths()["stdlib"]`; CPython 3.11.7 here and in CI), file list sorted by
relative POSIX path, excluding `site-packages/`, every `test`/`tests`/`idle_test` directory,
`encodings/` (code-page tables), `pydoc_data/` (generated docs text), `_sysconfigdata*` and
`config-*` (build-specific). Each file is one document (UTF-8, decoded with errors="replace"),
followed by eos. Held-out split: a file is held out iff
`int(sha256(relpath).hexdigest(), 16) % 20 == 0` (about 5 % of files); everything else trains.

Tokenizer: byte-level BPE (`tokenizers`), vocab 4096 incl. the specials `<|endoftext|>` (eos,
id 0) and `<|mask|>` (id 1), trained on the training split only; chat template from
`vllm_dllm_spec.testing.CHAT_TEMPLATE`.

Objective (SDAR / BD3-LM block diffusion, block size 4): each training sequence x (T tokens,
positions 0..T-1) is fed as [x | x~] (2T tokens; x~ at the SAME positions as x), where x~ masks,
in every block of 4, k ~ Uniform{1..4} random positions (per-block mask ratio k/4 in (0, 1]).
Attention: clean token -> clean tokens of its own and earlier blocks (block-causal); noisy
token -> noisy tokens of its own block (bidirectional) and clean tokens of earlier blocks.
Loss: mean cross-entropy at the masked positions of x~, predicting the token at the same
position (no autoregressive shift). Training uses a fast SDPA forward over the parameters of
`vllm_dllm_spec.reference.model.SDARModel` with its matmuls under CPU bfloat16 autocast (fp32
master weights, AdamW state and loss); weights are saved in bfloat16 and load with
`SDARModel.from_pretrained`.

Deterministic: fixed seeds, fixed data order, fixed step counts; each model trains in its own
single-threaded worker process (both at once, one per core), so the arithmetic does not depend
on the machine's core count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_dllm_spec.reference.model import SDARArchConfig, SDARModel, rope_cos_sin
from vllm_dllm_spec.testing import EOS_TOKEN, MASK_TOKEN, build_tokenizer, sdar_config_dict, write_checkpoint

SEED = 1234
VOCAB_SIZE = 4096
BLOCK_SIZE = 4
SEQ_LEN = 128  # clean tokens per training sequence (32 blocks); the model sees 2 * SEQ_LEN
HELDOUT_MOD = 20
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DEF_LINE = re.compile(r"^[ \t]*(async )?def ", re.M)  # prompts start at such lines (evaluation, distillation)

# Target ~5.25 M parameters (4 Qwen3 layers, untied 4096-token embeddings: embedding parameters
# are nearly free in compute, layers are not), draft ~1.1 M (4.7x smaller, tied); bf16 on disk.
ARCHS = {
    "target": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
    ),
    "draft": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
    ),
}
# Fixed schedule, chosen from measured speed so that tokenizer + both models take well under
# 60 min on an idle 2-core machine (see docs/MODELS.md for the measured times). The two models
# train at the same time in two single-threaded worker processes (one core each): single-threaded
# math does not depend on the machine's core count, and two 1-thread processes keep working on a
# busy shared machine, where one 2-thread OpenMP process stalls at every barrier.
TRAIN = {
    "target": dict(steps=7000, batch_size=8, lr=2.5e-3, warmup=100),
    "draft": dict(steps=10000, batch_size=8, lr=3e-3, warmup=100),
}
THREADS_PER_MODEL = 1
# Matmuls under CPU bf16 autocast (fp32 master weights and optimizer): 2.4x the steps per second
# of fp32 on an AVX512-BF16 core (measured: target 0.30 vs 0.72 s/step, draft 0.15 vs 0.23).
TRAIN_AUTOCAST_DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus files, sorted."""
    root = stdlib_dir() if root is None else root
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS
                       and not (rel_dir == Path(".") and d.startswith("config-"))]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                out.append((rel_dir / f).as_posix())
    return sorted(out)


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELDOUT_MOD == 0


def load_corpus(root: Path | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, heldout): lists of (relpath, text)."""
    root = stdlib_dir() if root is None else root
    train, heldout = [], []
    for rel in corpus_files(root):
        text = (root / rel).read_bytes().decode("utf-8", errors="replace")
        (heldout if is_heldout(rel) else train).append((rel, text))
    return train, heldout


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with eos (id 0) and mask (id 1) on the training split; saves HF tokenizer
    files to out_dir."""
    return build_tokenizer(out_dir, texts=texts, vocab_size=vocab_size)


def encode_docs(tok, docs: list[tuple[str, str]]) -> torch.Tensor:
    """One token stream: every document followed by eos."""
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    ids: list[int] = []
    encoded = tok.backend_tokenizer.encode_batch([text for _, text in docs], add_special_tokens=False)
    for enc in encoded:
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- objective


def bd_attention_mask(seq_len: int, block: int) -> torch.Tensor:
    """[2T, 2T] bool for [clean | noisy] (True = may attend)."""
    blk = torch.arange(seq_len) // block
    q, k = blk[:, None], blk[None, :]
    clean_clean = k <= q
    noisy_noisy = k == q
    noisy_clean = k < q
    clean_noisy = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    top = torch.cat([clean_clean, clean_noisy], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


def mask_blocks(x: torch.Tensor, block: int, mask_id: int, gen: torch.Generator):
    """x [b, T] -> (noisy [b, T], masked [b, T] bool): per block, k ~ U{1..block} random masks."""
    b, t = x.shape
    nb = t // block
    k = torch.randint(1, block + 1, (b, nb, 1), generator=gen)
    rank = torch.rand(b, nb, block, generator=gen).argsort(-1).argsort(-1)  # random permutation ranks
    masked = (rank < k).reshape(b, t)
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def fast_hidden(model: SDARModel, ids: torch.Tensor, cos, sin, attn_mask: torch.Tensor) -> torch.Tensor:
    """Same math as SDARModel.forward (no cache), with SDPA; returns final-norm hidden states."""
    cfg = model.config
    h, kvh, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    x = model.model.embed_tokens(ids)
    b, t, hid = x.shape
    for layer in model.model.layers:
        a = layer.self_attn
        y = F.rms_norm(x, (hid,), layer.input_layernorm.weight, eps)
        q = F.rms_norm(a.q_proj(y).view(b, t, h, d), (d,), a.q_norm.weight, eps).transpose(1, 2)
        k = F.rms_norm(a.k_proj(y).view(b, t, kvh, d), (d,), a.k_norm.weight, eps).transpose(1, 2)
        v = a.v_proj(y).view(b, t, kvh, d).transpose(1, 2)
        q = q * cos + torch.cat([-q[..., d // 2:], q[..., : d // 2]], -1) * sin
        k = k * cos + torch.cat([-k[..., d // 2:], k[..., : d // 2]], -1) * sin
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        x = x + a.o_proj(o.transpose(1, 2).reshape(b, t, h * d))
        m = layer.mlp
        y = F.rms_norm(x, (hid,), layer.post_attention_layernorm.weight, eps)
        x = x + m.down_proj(F.silu(m.gate_proj(y)) * m.up_proj(y))
    return F.rms_norm(x, (hid,), model.model.norm.weight, eps)


class BDObjective:
    """Block-diffusion loss on [clean | noisy] sequences of a fixed length."""

    def __init__(self, cfg: SDARArchConfig, seq_len: int = SEQ_LEN, block: int = BLOCK_SIZE):
        self.seq_len, self.block, self.mask_id = seq_len, block, cfg.mask_token_id
        self.attn_mask = bd_attention_mask(seq_len, block)
        pos = torch.arange(seq_len).repeat(2)[None]
        self.positions = pos
        self.cos, self.sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)

    def loss(self, model: SDARModel, x: torch.Tensor, gen: torch.Generator):
        noisy, masked = mask_blocks(x, self.block, self.mask_id, gen)
        with torch.autocast("cpu", dtype=TRAIN_AUTOCAST_DTYPE):
            hidden = fast_hidden(model, torch.cat([x, noisy], 1), self.cos, self.sin, self.attn_mask)
            sel = hidden[:, self.seq_len:][masked]  # [n_masked, hidden]
            logits = model.lm_head(sel).float()
        target = x[masked]
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc


# ----------------------------------------------------------------------------- training


def init_weights(model: SDARModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02 / math.sqrt(2 * n_layers))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int):
    """Deterministic order: non-overlapping seq_len chunks, shuffled per epoch."""
    n = stream.numel() // seq_len
    chunks = stream[: n * seq_len].view(n, seq_len)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield chunks[order[cursor: cursor + batch_size]]
        cursor += batch_size


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_config(name: str, tok) -> dict:
    cfg = sdar_config_dict(
        len(tok),
        tok.convert_tokens_to_ids(EOS_TOKEN),
        tok.convert_tokens_to_ids(MASK_TOKEN),
        block_size=BLOCK_SIZE,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        dtype="bfloat16",
        **ARCHS[name],
    )
    cfg["dtype"] = "bfloat16"
    return cfg


def adamw(model: SDARModel, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0.1 on matrices only (norms unregularised), betas 0.9 / 0.95."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_model(name, cfg, stream, heldout_stream, *, steps, batch_size, lr, warmup, seed, log=print,
                eval_every=500):
    arch = SDARArchConfig.from_dict(cfg)
    torch.manual_seed(seed)
    model = SDARModel(arch)
    init_weights(model, seed)
    model.train()
    objective = BDObjective(arch)
    opt = adamw(model, lr)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    history = {"step": [], "train_loss": [], "train_acc": [], "eval_step": [], "heldout_loss": [],
               "heldout_acc": [], "seconds": []}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {n_params / 1e6:.3f} M parameters, {steps} steps x {batch_size} x {SEQ_LEN} tokens")
    start = time.perf_counter()
    cpu_start = time.process_time()
    run_loss = run_acc = 0.0
    for step, x in enumerate(batches(stream, SEQ_LEN, batch_size, steps, seed + 2)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss, acc = objective.loss(model, x, noise_gen)
        loss_value = loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss_value.detach().item()
        run_acc += acc.detach().item()
        if (step + 1) % 10 == 0:
            history["step"].append(step + 1)
            history["train_loss"].append(run_loss / 10)
            history["train_acc"].append(run_acc / 10)
            history["seconds"].append(time.perf_counter() - start)
            run_loss = run_acc = 0.0
        if (step + 1) % 20 == 0:
            history.setdefault("load_avg_1min", []).append(round(os.getloadavg()[0], 2))
            el = time.perf_counter() - start
            log(f"[{name}] step {step + 1}/{steps} train_loss {history['train_loss'][-1]:.3f} "
                f"{el:.0f}s ({(step + 1) / el:.3f} steps/s, load {os.getloadavg()[0]:.2f})")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            hl, ha = heldout_eval(model, objective, heldout_stream)
            model.train()
            history["eval_step"].append(step + 1)
            history["heldout_loss"].append(hl)
            history["heldout_acc"].append(ha)
            el = time.perf_counter() - start
            log(f"[{name}] step {step + 1}/{steps} train_loss {history['train_loss'][-1]:.3f} "
                f"heldout_loss {hl:.3f} heldout_masked_acc {ha:.3f} {el:.0f}s "
                f"({(step + 1) / el:.2f} steps/s)")
    history["train_seconds"] = time.perf_counter() - start
    history["train_cpu_seconds"] = time.process_time() - cpu_start  # ~ wall time on an idle core
    history["num_parameters"] = n_params
    return model.eval(), history


@torch.no_grad()
def heldout_eval(model, objective: BDObjective, stream: torch.Tensor, num_seqs: int = 32, seed: int = 99):
    """Masked-token loss/accuracy on the first num_seqs held-out sequences, fixed noise."""
    model.eval()
    n = min(num_seqs, stream.numel() // objective.seq_len)
    x = stream[: n * objective.seq_len].view(n, objective.seq_len)
    gen = torch.Generator().manual_seed(seed)
    tot_loss = tot_acc = 0.0
    for i in range(0, n, 16):
        loss, acc = objective.loss(model, x[i: i + 16], gen)
        tot_loss += float(loss) * len(x[i: i + 16])
        tot_acc += float(acc) * len(x[i: i + 16])
    return tot_loss / n, tot_acc / n


def bf16_state(model: SDARModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def plot_loss(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    ax.plot(history["step"], history["train_loss"], label="train (masked CE, mean of 10 steps)")
    ax.plot(history["eval_step"], history["heldout_loss"], "o-", label="held-out (masked CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None, "CreationDate": None} if path.suffix == ".pdf" else {"Software": None})
    plt.close(fig)


def _prepare(work: Path) -> dict:
    """Corpus, tokenizer, token streams -> work dir; returns facts for the training log."""
    t0 = time.perf_counter()
    train_docs, heldout_docs = load_corpus()
    tok = train_tokenizer([t for _, t in train_docs], work / "tokenizer")
    train_stream = encode_docs(tok, train_docs)
    heldout_stream = encode_docs(tok, heldout_docs)
    torch.save({"train": train_stream, "heldout": heldout_stream}, work / "streams.pt")
    manifest = hashlib.sha256("\n".join(r for r, _ in train_docs + heldout_docs).encode()).hexdigest()
    facts = {
        "tokenizer_seconds": round(time.perf_counter() - t0, 1),
        "corpus": {
            "root": "sysconfig.get_paths()['stdlib']",
            "python": ".".join(map(str, sys.version_info[:3])),
            "num_train_files": len(train_docs),
            "num_heldout_files": len(heldout_docs),
            "train_tokens": int(train_stream.numel()),
            "heldout_tokens": int(heldout_stream.numel()),
            "file_list_sha256": manifest,
            "heldout_rule": f"int(sha256(relpath).hexdigest(), 16) % {HELDOUT_MOD} == 0",
        },
    }
    (work / "facts.json").write_text(json.dumps(facts))
    return facts


def _worker(name: str, work: Path, out_root: Path, steps: int) -> None:
    """Trains one model from the prepared work dir and writes its checkpoint directory."""
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(THREADS_PER_MODEL)
    torch.manual_seed(SEED)
    log = lambda s: print(s, flush=True)  # noqa: E731
    facts = json.loads((work / "facts.json").read_text())
    tok = PreTrainedTokenizerFast.from_pretrained(str(work / "tokenizer"))
    streams = torch.load(work / "streams.pt")
    load_start = os.getloadavg()
    cfg = build_config(name, tok)
    tc = TRAIN[name]
    model, hist = train_model(name, cfg, streams["train"], streams["heldout"], steps=steps,
                              batch_size=tc["batch_size"], lr=tc["lr"], warmup=tc["warmup"], seed=SEED, log=log)
    out = out_root / f"sdar-tiny-{name}"
    if out.exists():
        shutil.rmtree(out)
    write_checkpoint(out, cfg, bf16_state(model))
    tok.save_pretrained(str(out))
    meta = {
        "name": name,
        "seed": SEED,
        "threads": THREADS_PER_MODEL,
        "arch": ARCHS[name],
        "train": {**tc, "steps": steps, "seq_len": SEQ_LEN, "block_size": BLOCK_SIZE,
                  "autocast": str(TRAIN_AUTOCAST_DTYPE).removeprefix("torch.")},
        "num_parameters": hist["num_parameters"],
        "train_seconds": round(hist["train_seconds"], 1),
        "train_cpu_seconds": round(hist["train_cpu_seconds"], 1),
        "tokenizer_seconds": facts["tokenizer_seconds"],
        "load_avg_at_start": [round(v, 2) for v in load_start],
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
        "corpus": facts["corpus"],
        "history": {k: [round(v, 4) for v in vals] if isinstance(vals, list) else vals
                    for k, vals in hist.items()},
    }
    (out / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot_loss(hist, out / "loss_curve.png", f"sdar-tiny-{name}: block-diffusion loss (block 4)")
    log(f"[{name}] wrote {out} ({hist['train_seconds']:.0f}s)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="parent dir of sdar-tiny-{target,draft}")
    ap.add_argument("--steps-target", type=int, default=TRAIN["target"]["steps"])
    ap.add_argument("--steps-draft", type=int, default=TRAIN["draft"]["steps"])
    ap.add_argument("--only", choices=["target", "draft"], default=None)
    ap.add_argument("--sequential", action="store_true", help="train the models one after the other")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation and model-card figures")
    ap.add_argument("--no-distill", action="store_true", help="write the pre-trained models (no distillation)")
    ap.add_argument("--distill-prompts", type=int, default=None, help="distillation data size (quick runs)")
    ap.add_argument("--distill-steps", type=int, default=None, help="distillation steps of both models (quick runs)")
    ap.add_argument("--worker", choices=["target", "draft"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = {"target": args.steps_target, "draft": args.steps_draft}
    if args.worker:
        _worker(args.worker, args.work, args.out, steps[args.worker])
        return

    t0 = time.perf_counter()
    load = os.getloadavg()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="sdar_tiny_train_"))
    distill = not (args.no_distill or args.only)
    procs: list[subprocess.Popen] = []
    try:
        facts = _prepare(work)
        c = facts["corpus"]
        print(f"corpus: {c['num_train_files']} train files ({c['train_tokens']} tokens), {c['num_heldout_files']} "
              f"held-out files ({c['heldout_tokens']} tokens); tokenizer+encode {facts['tokenizer_seconds']}s; "
              f"load avg at start {load}", flush=True)
        names = [args.only] if args.only else ["target", "draft"]
        stage_out = work / "base" if distill else args.out
        cmd = [sys.executable, "-m", "vllm_dllm_spec.tools.train_tiny", "--out", str(stage_out), "--work", str(work),
               "--steps-target", str(steps["target"]), "--steps-draft", str(steps["draft"])]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS_PER_MODEL), "TOKENIZERS_PARALLELISM": "false"}
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
        for name in names:
            procs.append(subprocess.Popen(cmd + ["--worker", name], env=env))
            if args.sequential:
                procs[-1].wait()
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"training worker failed: exit codes {codes}")
        pretrain_seconds = time.perf_counter() - t0
        if distill:
            from vllm_dllm_spec.tools import distill_tiny

            distill_tiny.run_stage(stage_out, args.out, work / "tokenizer", num_prompts=args.distill_prompts,
                                   steps=args.distill_steps)
            print(f"pre-training {pretrain_seconds:.0f}s, distillation "
                  f"{time.perf_counter() - t0 - pretrain_seconds:.0f}s", flush=True)
    finally:
        for p in procs:  # never leave orphaned workers behind
            if p.poll() is None:
                p.terminate()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    print(f"total training wall time {total:.0f}s (tokenizer, models{', distillation' if distill else ''}); "
          f"load avg at start {load}, "
          f"at end {os.getloadavg()}", flush=True)
    if not args.no_eval and not args.only:
        from vllm_dllm_spec.tools import evaluate_tiny

        evaluate_tiny.main(["--write-cards", "--total-train-seconds", f"{total:.0f}",
                            "--target", str(args.out / "sdar-tiny-target"),
                            "--draft", str(args.out / "sdar-tiny-draft")])


if __name__ == "__main__":
    main()
