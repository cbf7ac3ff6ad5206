"""Shared inputs of the vLLM test modules: one mixed-length batch and per-request knobs."""
import random

PROMPT_LENGTHS = [1, 3, 5, 9, 17, 40, 70, 8]  # < B, not a multiple of B, long, a multiple of B


def request_configs(block_length: int) -> list[dict]:
    """Per-request knobs: every strategy, with the default and a smaller step count."""
    half = max(1, block_length // 2)
    return [
        {"remasking_strategy": "sequential"},
        {"remasking_strategy": "low_confidence_static", "denoising_steps": half},
        {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.3},
        {"remasking_strategy": "entropy_bounded", "eb_threshold": 2.0},
        {"remasking_strategy": "low_confidence_static"},
        {"remasking_strategy": "low_confidence_dynamic", "denoising_steps": half},
        {"remasking_strategy": "entropy_bounded"},
        {"remasking_strategy": "sequential", "denoising_steps": 1},
    ]


def prompts_for(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


# Engines served by more than one module (conftest's `shared_server` starts each once per session).
SERVE_MAX_MODEL_LEN = 510  # block 4: a request holds at most 508 tokens (tests/test_vllm_serve.py)
# block diffusion through the plugin's default method (no "method" key), static remasking
SERVED_BLOCK_DIFFUSION = {"remasking_strategy": "low_confidence_static"}


def served_simsd_options(draft_dir: str) -> dict:
    """SimSD served with a separate draft (tests/test_vllm_simsd.py, tests/test_logprobs.py)."""
    return {"method": "simsd", "draft_model": draft_dir, "num_draft_blocks": 2,
            "remasking_strategy": "low_confidence_static"}
