"""The training script of the bundled checkpoints (issue 4): its objective pieces against slow,
obviously-correct twins, its determinism, and that it rebuilds the bundled tokenizer."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tolerances import assert_close  # noqa: E402
from vllm_dllm_spec import bundled_model_path  # noqa: E402
from vllm_dllm_spec.reference.model import SDARArchConfig, SDARModel, rope_cos_sin  # noqa: E402
from vllm_dllm_spec.testing import sdar_config_dict  # noqa: E402
from vllm_dllm_spec.tools import train_tiny  # noqa: E402

VOCAB, EOS, MASK = 64, 0, 1
TINY_ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)


def _cfg() -> dict:
    return sdar_config_dict(VOCAB, EOS, MASK, block_size=4, **TINY_ARCH)


def _may_attend(q: int, k: int, seq_len: int, block: int) -> bool:
    """The issue's rule, position by position: [clean | noisy], each half at positions 0..T-1."""
    q_noisy, k_noisy = q >= seq_len, k >= seq_len
    qb, kb = (q % seq_len) // block, (k % seq_len) // block
    if not q_noisy:
        return not k_noisy and kb <= qb  # clean: block-causal over clean tokens
    return kb == qb if k_noisy else kb < qb  # noisy: own noisy block + clean earlier blocks


@pytest.mark.parametrize("seq_len,block", [(8, 4), (12, 4), (16, 8), (6, 1)])
def test_bd_attention_mask_equals_the_rule(seq_len, block):
    expected = torch.tensor([[_may_attend(q, k, seq_len, block) for k in range(2 * seq_len)]
                             for q in range(2 * seq_len)])
    assert torch.equal(train_tiny.bd_attention_mask(seq_len, block), expected)


def test_mask_blocks_masks_one_to_block_tokens_per_block():
    x = torch.randint(2, VOCAB, (64, 32))
    noisy, masked = train_tiny.mask_blocks(x, 4, MASK, torch.Generator().manual_seed(0))
    per_block = masked.view(64, 8, 4).sum(-1)  # [b, blocks]
    assert per_block.min() == 1 and per_block.max() == 4
    assert set(per_block.unique().tolist()) == {1, 2, 3, 4}  # every mask ratio occurs
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK))
    assert torch.equal(noisy[~masked], x[~masked])
    again, _ = train_tiny.mask_blocks(x, 4, MASK, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)


def test_fast_hidden_equals_reference_forward():
    """The training forward (SDPA) computes SDARModel.forward's logits on [clean | noisy]."""
    torch.manual_seed(0)
    cfg = _cfg()
    arch = SDARArchConfig.from_dict(cfg)
    model = SDARModel(arch).eval()
    train_tiny.init_weights(model, seed=3)
    seq_len, block = 12, 4
    ids = torch.randint(0, VOCAB, (2, 2 * seq_len))
    positions = torch.arange(seq_len).repeat(2)[None]
    mask = train_tiny.bd_attention_mask(seq_len, block)
    cos, sin = rope_cos_sin(positions, arch.head_dim, arch.rope_theta, torch.float32)
    with torch.no_grad():
        fast = model.lm_head(train_tiny.fast_hidden(model, ids, cos, sin, mask))
        ref = model(ids, positions.expand(2, -1), mask[None].expand(2, -1, -1))
    assert_close(fast, ref)


def _train(steps: int, seed: int):
    stream = torch.randint(2, VOCAB, (4096,), generator=torch.Generator().manual_seed(7))
    return train_tiny.train_model("t", _cfg(), stream, stream[:1024], steps=steps, batch_size=4, lr=3e-3,
                                  warmup=2, seed=seed, log=lambda s: None, eval_every=10)


def test_training_is_deterministic_and_logs_its_history():
    a, hist_a = _train(20, seed=11)
    b, hist_b = _train(20, seed=11)
    c, _ = _train(20, seed=12)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert hist_a["train_loss"] == hist_b["train_loss"] and len(hist_a["train_loss"]) == 2
    assert hist_a["eval_step"] == [10, 20] and hist_a["heldout_loss"] == hist_b["heldout_loss"]
    saved = train_tiny.bf16_state(a)
    assert all(v.dtype == torch.bfloat16 for v in saved.values())


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [train_tiny.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1)
    assert all(x >= y for x, y in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
def test_script_rebuilds_the_bundled_tokenizer(tmp_path):
    """Corpus, held-out split and BPE are deterministic: the bundled tokenizer.json comes back."""
    train_docs, heldout_docs = train_tiny.load_corpus()
    assert len(heldout_docs) > 0 and all(train_tiny.is_heldout(rel) for rel, _ in heldout_docs)
    assert not any(train_tiny.is_heldout(rel) for rel, _ in train_docs)
    train_tiny.train_tokenizer([t for _, t in train_docs], tmp_path)
    bundled = Path(bundled_model_path()) / "tokenizer.json"
    assert (tmp_path / "tokenizer.json").read_bytes() == bundled.read_bytes()
