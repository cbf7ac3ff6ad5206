"""Tiny random SDAR checkpoints in HF format, for tests and examples.

Real files on the real loading path: config.json (model_type "sdar"), model.safetensors, and a
byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with a chat template).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TOKENIZER_TEXT = """
def block_diffusion(model, prompt, steps):
    for block in range(num_blocks):
        logits = model(tokens, positions, mask)
        confidence, token = logits.softmax(-1).max(-1)
    return tokens
The quick brown fox jumps over the lazy dog. Speculative decoding drafts tokens and verifies
them in one forward. class Request: def __init__(self, prompt): self.prompt = prompt
import torch, json, os; print("hello world", 42, [1, 2, 3], {"key": "value"})
"""


def build_tokenizer(out_dir: str | Path, texts: list[str] | None = None, vocab_size: int = 512):
    """Byte-level BPE trained on `texts` (default: a small built-in snippet), with eos (id 0)
    and a dedicated mask token (id 1) and the chat template; saves the HF tokenizer files to
    out_dir and returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [_TOKENIZER_TEXT] * 4 if texts is None else texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
    )
    fast.chat_template = CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def sdar_config_dict(
    vocab_size: int,
    eos_token_id: int,
    mask_token_id: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 32,
    block_size: int = 4,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
) -> dict:
    return {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "block_size": block_size,
        "mask_token_id": mask_token_id,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "torch_dtype": dtype,
    }


def write_checkpoint(out_dir: str | Path, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def make_random_sdar_checkpoint(
    out_dir: str | Path,
    *,
    block_size: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    weight_std: float = 0.2,
    **arch,
) -> str:
    """Writes a tiny random SDAR checkpoint; returns its path. Weights are drawn with a large
    std so logits are peaked (greedy argmax ties are then practically impossible)."""
    out = Path(out_dir)
    tok = build_tokenizer(out)
    cfg = sdar_config_dict(
        len(tok),
        tok.convert_tokens_to_ids(EOS_TOKEN),
        tok.convert_tokens_to_ids(MASK_TOKEN),
        block_size=block_size,
        tie_word_embeddings=tie_word_embeddings,
        **arch,
    )
    write_checkpoint(out, cfg, random_state_dict(cfg, seed=seed, weight_std=weight_std))
    return str(out)


def random_state_dict(cfg: dict, *, seed: int = 0, weight_std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights for an SDAR config dict, named exactly as Qwen3's (the reference model's
    parameter names). Norm weights are near 1, the rest has a large std (peaked logits)."""
    from vllm_dllm_spec.reference.model import SDARArchConfig, SDARModel

    gen = torch.Generator().manual_seed(seed)
    model = SDARModel(SDARArchConfig.from_dict(cfg))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
        else:
            state[name] = weight_std * torch.randn(tensor.shape, generator=gen)
    return state


def shutdown_llm(llm) -> None:
    """Frees an in-process `LLM` before the next one starts (its KV cache is large)."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # already down
        pass
    del llm
    gc.collect()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real `vllm serve` of an SDAR directory on 127.0.0.1 (served model name "sdar").

        with VLLMServer(model_dir, log_path, {"remasking_strategy": ...}) as server:
            OpenAI(base_url=server.base_url, api_key="none")

    `start()` and `wait_ready()` split `__enter__`, so several servers can start at once (a
    start is ~30 s of mostly single-threaded work).
    """

    def __init__(self, model_dir: str, log_path: str | Path, dllm_spec: dict | None = None, *,
                 max_num_seqs: int = 8, max_model_len: int = 512, startup_timeout_s: float = 300.0,
                 extra_args: tuple = (), env: dict | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = dict(env or {})
        vllm = Path(__import__("sys").executable).with_name("vllm")
        self.cmd = [str(vllm), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                    "--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager", "--block-size", "32",
                    "--max-num-seqs", str(max_num_seqs), "--served-model-name", "sdar", *extra_args]
        if dllm_spec is not None:
            self.cmd += ["--additional-config", json.dumps({"dllm_spec": dllm_spec})]
        self.proc = None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text()[-tail:]

    def start(self) -> "VLLMServer":
        """Launches the process; returns at once."""
        import os
        import subprocess

        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", **self.extra_env)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's usual multiprocess engine
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._deadline = time.monotonic() + self.startup_timeout_s
        return self

    def wait_ready(self) -> "VLLMServer":
        """Blocks until /health answers; a server that exits or misses its deadline raises (with its log)."""
        import urllib.request

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > self._deadline:
                    self.__exit__()
                    raise TimeoutError(f"vllm serve not ready after {self.startup_timeout_s} s:\n{self.log()}")
                time.sleep(0.5)

    def __enter__(self) -> "VLLMServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None


# Replicas of the published SDAR checkpoints (docs/CHECKPOINTS.md) live in their own module.
from vllm_dllm_spec.replicas import make_sdar_replica  # noqa: E402,F401
