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


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """`shared_server(model_dir, dllm_spec, **VLLMServer kwargs)` -> a running `vllm serve`, started
    once per distinct argument set for the whole session: modules that serve the same engine share
    one process (a start costs ~30 s). Tests that break a server's state start their own."""
    import json
    from contextlib import ExitStack

    from vllm_dllm_spec.testing import VLLMServer

    servers: dict[str, VLLMServer] = {}
    with ExitStack() as stack:
        def get(model_dir: str, dllm_spec: dict | None, **kwargs) -> VLLMServer:
            key = json.dumps([str(model_dir), dllm_spec, kwargs], sort_keys=True)
            if key not in servers:
                log = tmp_path_factory.mktemp("shared_serve") / "serve.log"
                servers[key] = stack.enter_context(VLLMServer(model_dir, log, dllm_spec, **kwargs))
            return servers[key]

        yield get
