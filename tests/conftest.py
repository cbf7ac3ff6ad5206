import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """Random tiny SDAR checkpoint, block size 4, untied embeddings."""
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(tmp_path_factory.mktemp("tiny_sdar"), seed=0)


@pytest.fixture(scope="session")
def tiny_tied_ckpt(tmp_path_factory) -> str:
    """Random tiny SDAR checkpoint with tied embeddings and GQA 4:1."""
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(
        tmp_path_factory.mktemp("tiny_sdar_tied"),
        seed=1,
        tie_word_embeddings=True,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_size=128,
    )
