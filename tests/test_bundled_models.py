"""The bundled tiny SDAR checkpoints (issue 4): present, loadable, sane, and good enough to make
tokens-per-forward and acceptance figures meaningful. Trained by vllm_dllm_spec.tools.train_tiny."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from vllm_dllm_spec import bundled_model_path  # noqa: E402
from vllm_dllm_spec.reference.generate import generate  # noqa: E402
from vllm_dllm_spec.reference.model import SDARModel  # noqa: E402
from vllm_dllm_spec.testing import EOS_TOKEN, MASK_TOKEN  # noqa: E402

TPF_BAR = 1.8  # low_confidence_dynamic, threshold 0.85, block 4, fuse_commit, held-out prompts
ACCEPTED_BAR = 2.5  # SimSD with the bundled draft: drafted tokens accepted per round (greedy_match, K=1)
MAX_TOTAL_BYTES = 25 * 1024 * 1024
REQUIRED_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "generation_config.json", "README.md", "loss_curve.png",
)


@pytest.fixture(scope="module")
def paths():
    return {name: Path(bundled_model_path(name)) for name in ("target", "draft")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and threads stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(paths):
    return {name: SDARModel.from_pretrained(p) for name, p in paths.items()}


@pytest.fixture(scope="module")
def tokenizer(paths):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(paths["target"]))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from vllm_dllm_spec.tools.evaluate_tiny import heldout_prompts

    out = heldout_prompts(tokenizer, 4)
    assert len(out) == 4
    return out


def test_default_path_is_target(paths):
    assert Path(bundled_model_path()) == paths["target"]
    assert paths["draft"] != paths["target"]


@pytest.mark.parametrize("name", ["target", "draft"])
def test_checkpoint_files_and_config(paths, name):
    path = paths[name]
    for f in REQUIRED_FILES:
        assert (path / f).is_file(), f"{name}: {f} missing"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["SDARForCausalLM"]
    assert cfg["model_type"] == "sdar"
    assert cfg["block_size"] == 4
    assert cfg["head_dim"] >= 32
    assert cfg["torch_dtype"] == "bfloat16"
    assert "canvas_length" not in cfg  # would make vLLM treat it as its own diffusion kind
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]
    card = (path / "README.md").read_text()
    assert "loss_curve.png" in card and "tokens/forward" in card


def test_sizes(paths, models):
    total = sum(f.stat().st_size for p in paths.values() for f in p.rglob("*") if f.is_file())
    assert total <= MAX_TOTAL_BYTES, f"bundled checkpoints take {total / 1e6:.1f} MB"
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert 5e6 <= n["target"] <= 12e6, n
    assert 4 <= n["target"] / n["draft"] <= 8, n


def test_shared_tokenizer_with_specials(paths, tokenizer):
    assert (paths["target"] / "tokenizer.json").read_bytes() == (paths["draft"] / "tokenizer.json").read_bytes()
    cfgs = {name: json.loads((p / "config.json").read_text()) for name, p in paths.items()}
    for key in ("vocab_size", "eos_token_id", "mask_token_id"):
        assert cfgs["target"][key] == cfgs["draft"][key], key
    cfg = cfgs["target"]
    assert len(tokenizer) == cfg["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) == cfg["eos_token_id"] == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids(MASK_TOKEN) == cfg["mask_token_id"] == tokenizer.mask_token_id
    assert cfg["eos_token_id"] != cfg["mask_token_id"]
    assert tokenizer.encode("x" + MASK_TOKEN, add_special_tokens=False)[-1] == cfg["mask_token_id"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "def f():"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "def f():" in chat and chat.endswith("<|assistant|>\n")
    code = "    def __init__(self, x):\n        self.x = x\n"
    assert tokenizer.decode(tokenizer.encode(code, add_special_tokens=False)) == code


def _readable(text: str) -> bool:
    printable = sum(c in string.printable for c in text)
    return len(text) >= 20 and printable / len(text) >= 0.95 and any(c.isalpha() for c in text)


@pytest.mark.parametrize("name", ["target", "draft"])
def test_generates_readable_code_from_heldout_prompt(models, tokenizer, prompts, name):
    cfg = models[name].config
    _, prompt = prompts[0]
    out = generate(models[name], prompt, gen_length=32, block_length=4, remasking_strategy="low_confidence_dynamic",
                   confidence_threshold=0.85, fuse_commit=True)
    assert cfg.mask_token_id not in out.tokens
    text = tokenizer.decode(out.tokens)
    assert _readable(text), repr(text)
    # code-like: identifiers, punctuation or indentation typical of Python
    assert any(s in text for s in ("self", "(", "=", "    ", "return", ":")), repr(text)


@pytest.fixture(scope="module")
def bar_prompts(tokenizer):
    """The bars are measured as tools.evaluate_tiny does: held-out prompts, 64 generated tokens."""
    from vllm_dllm_spec.tools.evaluate_tiny import heldout_prompts

    return heldout_prompts(tokenizer, 32)


def _tokens_per_forward(model, prompts, gen_length: int = 64) -> float:
    tokens = forwards = 0
    for _, prompt in prompts:
        out = generate(model, prompt, gen_length=gen_length, block_length=4,
                       remasking_strategy="low_confidence_dynamic", confidence_threshold=0.85, fuse_commit=True)
        tokens += len(out.tokens)
        forwards += out.num_forwards
    return tokens / forwards


def test_target_tokens_per_forward_floor(models, prompts):
    # fuse_commit: one forward per denoising step, so dynamic unmasking can never do worse than 1
    assert _tokens_per_forward(models["target"], prompts, gen_length=32) >= 1.0


def test_target_tokens_per_forward_meets_bar(models, bar_prompts):
    """The distilled target decodes in parallel: issue 12's bar (docs/MODELS.md)."""
    assert _tokens_per_forward(models["target"], bar_prompts) >= TPF_BAR


def test_draft_is_accepted_like_the_target_says(models, bar_prompts):
    """The draft was distilled from the target's outputs: SimSD accepts most of its tokens."""
    from vllm_dllm_spec.tools.evaluate_tiny import simsd_acceptance

    figures = simsd_acceptance(models["target"], models["draft"], bar_prompts, 64, self_draft=False)
    assert figures["draft"]["rounds"] > 0
    assert figures["draft"]["accepted_per_round"] >= ACCEPTED_BAR


def test_masked_token_accuracy_is_far_above_chance(models, tokenizer):
    from vllm_dllm_spec.tools import evaluate_tiny

    stream = torch.tensor(tokenizer.encode(evaluate_tiny.heldout_docs()[0][1], add_special_tokens=False))
    for name, model in models.items():
        acc = evaluate_tiny.masked_token_accuracy(model, stream, 4)["accuracy"]
        assert acc > 0.03, (name, acc)  # chance is 1 / 4096
