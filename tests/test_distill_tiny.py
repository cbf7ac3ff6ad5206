"""The distillation stage of the bundled checkpoints (issue 12): its batched greedy decoder against
the reference generator, its objective against a slow twin, and its determinism."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tolerances import assert_close  # noqa: E402
from vllm_dllm_spec.reference.generate import generate  # noqa: E402
from vllm_dllm_spec.reference.model import SDARModel  # noqa: E402
from vllm_dllm_spec.testing import make_random_sdar_checkpoint  # noqa: E402
from vllm_dllm_spec.tools import distill_tiny, train_tiny  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_random_sdar_checkpoint(tmp_path_factory.mktemp("distill"), seed=5)
    return SDARModel.from_pretrained(path)


def test_greedy_continue_equals_reference_one_per_step(model):
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, cfg.vocab_size, (5, 8), generator=gen)  # [N, P], P a multiple of B
    batched = distill_tiny.greedy_continue(model, prompts, 12, batch=2)  # 3 chunks: 2 + 2 + 1
    for row, prompt in zip(batched, prompts):
        ref = generate(model, prompt.tolist(), gen_length=12, remasking_strategy="low_confidence_static",
                       eos_token_id=-1)
        assert row.tolist() == ref.tokens
    assert not (batched == cfg.mask_token_id).any()


def test_greedy_continue_refuses_unaligned_lengths(model):
    with pytest.raises(ValueError, match="multiples of block"):
        distill_tiny.greedy_continue(model, torch.zeros(1, 6, dtype=torch.long), 8)


def _slow_loss(model, x, noisy, masked, prompt_len, weight):
    """The objective spelled out with the reference forward, position by position."""
    t = x.shape[1]
    mask = train_tiny.bd_attention_mask(t, model.config.block_size)
    positions = torch.arange(t).repeat(2)[None].expand(len(x), -1)
    logits = model(torch.cat([x, noisy], 1), positions, mask[None].expand(len(x), -1, -1))[:, t:]
    ces, ents, n = [], [], 0
    for b in range(len(x)):
        for i in range(prompt_len, t):
            if masked[b, i]:
                n += 1
                logp = logits[b, i].log_softmax(-1)
                ces.append(-logp[x[b, i]])
                if logits[b, i].argmax() == x[b, i]:
                    ents.append(-(logp.exp() * logp).sum())
    return torch.stack(ces).mean() + weight * torch.stack(ents).sum() / n


def test_objective_equals_slow_twin(model):
    """CE at masked continuation positions + weight x entropy where the argmax is already right
    (the data are the model's own continuations, so both terms have positions to count)."""
    prompts = torch.randint(2, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    x = torch.cat([prompts, distill_tiny.greedy_continue(model, prompts, 8)], 1)  # [3, 16]
    objective = distill_tiny.DistillObjective(model, prompt_len=8, seq_len=16, entropy_weight=2.0, autocast=False)
    with torch.no_grad():
        loss, ce, _ = objective.loss(model, x, torch.Generator().manual_seed(3))
        noisy, masked = train_tiny.mask_blocks(x, 4, model.config.mask_token_id, torch.Generator().manual_seed(3))
        assert_close(loss, _slow_loss(model, x, noisy, masked, 8, 2.0))
    assert loss > ce  # the certainty term counted something
    assert masked[:, :8].any()  # prompt positions are masked too, yet never counted


def test_objective_with_teacher_is_kl_to_the_teacher(model, tmp_path):
    """Draft alignment: KL(teacher || model) at the masked continuation positions, zero for the
    model itself, equal to the position-by-position sum otherwise."""
    teacher = SDARModel.from_pretrained(make_random_sdar_checkpoint(tmp_path / "teacher", seed=9, head_dim=16))
    x = torch.randint(2, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    t = 16
    with torch.no_grad():
        self_kl = distill_tiny.DistillObjective(model, 8, t, 0.0, autocast=False, teacher=model)
        assert self_kl.loss(model, x, torch.Generator().manual_seed(3))[0].abs() < 1e-5
        objective = distill_tiny.DistillObjective(model, 8, t, 0.0, autocast=False, teacher=teacher)
        loss = objective.loss(model, x, torch.Generator().manual_seed(3))[0]
        noisy, masked = train_tiny.mask_blocks(x, 4, model.config.mask_token_id, torch.Generator().manual_seed(3))
        mask = train_tiny.bd_attention_mask(t, 4)[None].expand(2, -1, -1)
        positions = torch.arange(t).repeat(2)[None].expand(2, -1)
        ids = torch.cat([x, noisy], 1)
        p = teacher(ids, positions, mask)[:, t:].log_softmax(-1)
        q = model(ids, positions, mask)[:, t:].log_softmax(-1)
        counted = masked.clone()
        counted[:, :8] = False
        kl = [(p[b, i].exp() * (p[b, i] - q[b, i])).sum() for b in range(2) for i in range(t) if counted[b, i]]
        assert_close(loss, torch.stack(kl).mean())


def test_line_start_prompts_are_seeded_windows():
    from transformers import PreTrainedTokenizerFast

    from vllm_dllm_spec import bundled_model_path

    tok = PreTrainedTokenizerFast.from_pretrained(bundled_model_path())
    docs = [("a.py", "import os\n\ndef f(x):\n    return x + 1\n" * 40), ("b.py", "x = 1\n" * 200)]
    a = distill_tiny.line_start_prompts(tok, docs, 6, seed=1, prompt_tokens=8)
    b = distill_tiny.line_start_prompts(tok, docs, 6, seed=1, prompt_tokens=8)
    assert a.shape == (6, 8) and torch.equal(a, b)
    defs = [tok.decode(row).lstrip().startswith("def ") for row in a]
    assert sum(defs) >= 3  # half of them start at `def` lines


def test_finetune_is_deterministic(model):
    data = torch.randint(2, model.config.vocab_size, (16, 16), generator=torch.Generator().manual_seed(2))
    cfg = dataclasses.replace(distill_tiny.DISTILL["target"], steps=20, warmup=2, batch_size=4)
    states = []
    for _ in range(2):
        m = _copy(model)
        hist = distill_tiny.finetune(m, data, 8, cfg, "t", log=lambda s: None)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], model.state_dict()[k]) for k in states[0])
    assert hist["step"] == [10, 20] and all(loss > 0 for loss in hist["loss"])


def _copy(model):
    m = SDARModel(model.config)
    m.load_state_dict(model.state_dict())
    return m


@pytest.mark.slow
def test_stage_writes_deterministic_checkpoints(tmp_path):
    """The whole stage in miniature (two worker processes): both directories come out with the
    distillation in their training log, byte-identical on a re-run."""
    import json

    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "base"
    for name, seed in (("target", 1), ("draft", 2)):
        path = make_random_sdar_checkpoint(base / f"sdar-tiny-{name}", seed=seed)
        history = {"step": [10], "train_loss": [5.0], "eval_step": [10], "heldout_loss": [5.0]}
        (Path(path) / "training_log.json").write_text(json.dumps({"history": history}))
    tok = PreTrainedTokenizerFast.from_pretrained(str(base / "sdar-tiny-target"))
    docs = [("a.py", "def f(x):\n    return x + 1\n" * 60)]
    configs = {n: dataclasses.replace(c, steps=3, warmup=1, batch_size=2) for n, c in distill_tiny.DISTILL.items()}
    weights = []
    for run in ("a", "b"):
        distill_tiny.distill_pair(base, tmp_path / run, tok, docs, num_prompts=4, configs=configs, log=lambda s: None)
        weights.append({n: (tmp_path / run / f"sdar-tiny-{n}" / "model.safetensors").read_bytes()
                        for n in ("target", "draft")})
        log = json.loads((tmp_path / run / "sdar-tiny-target" / "training_log.json").read_text())
        assert log["distill"]["num_prompts"] == 4 and log["distill"]["config"]["steps"] == 3
        assert (tmp_path / run / "sdar-tiny-draft" / "loss_curve.png").is_file()
    assert weights[0] == weights[1]
    assert weights[0]["target"] != (base / "sdar-tiny-target" / "model.safetensors").read_bytes()
