"""Published SDAR checkpoints, as replicas (vllm_dllm_spec.replicas; docs/CHECKPOINTS.md): the
resolution rules for block size, mask token and stop ids (unit tests), the replicas' layout,
the config hook on them (with and without trust_remote_code), and real engines on them equal to
the oracle (block diffusion, PSD, SimSD; `LLM` and `vllm serve`), an eos-list id ending a request
like the oracle, and the start-up error of a checkpoint with no mask token anywhere."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_dllm_spec.checkpoint import (  # noqa: E402
    DEFAULT_BLOCK_SIZE,
    MASK_TOKEN,
    Resolved,
    eos_token_ids,
    resolve_block_size,
    resolve_mask_token_id,
    tokenizer_mask_token_id,
)
from vllm_dllm_spec.replicas import (  # noqa: E402
    ENDOFTEXT,
    IM_END,
    IM_START,
    LAYOUTS,
    build_qwen2_tokenizer,
    make_sdar_replica,
    write_generation_config,
)
from vllm_helpers import prompts_for, request_configs  # noqa: E402

HOOK_LOGGER = "vllm.vllm_dllm_spec.vllm_hooks"
NO_MASK = "config.json has no mask_token_id and the tokenizer has no mask token"
# config.json keys of the published SDAR-1.7B-Chat (docs/CHECKPOINTS.md), diffusion fields aside
PUBLISHED_KEYS = {
    "architectures", "auto_map", "attention_bias", "attention_dropout", "attn_implementation",
    "bos_token_id", "debug", "eos_token_id", "ep_size", "fuse_cross_entropy", "head_dim",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
    "max_position_embeddings", "max_window_layers", "micro_forward", "model_type",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps",
    "rope_scaling", "rope_theta", "skip_checkpoint", "sliding_window", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "use_cache", "use_deepep", "use_sliding_window",
    "vocab_size",
}


# -- the rules -------------------------------------------------------------------------------

def test_block_size_from_config_else_knob_else_default():
    assert resolve_block_size(8, None) == Resolved(8, "config.json block_size")
    assert resolve_block_size(8, 4) == Resolved(8, "config.json block_size")  # the hook refuses the mismatch
    assert resolve_block_size(None, 16) == Resolved(16, "dllm_spec.block_length")
    assert resolve_block_size(None, None) == Resolved(DEFAULT_BLOCK_SIZE, "default")
    for bad in (0, -4, "4", True):
        with pytest.raises(ValueError, match="config.json block_size must be an integer >= 1"):
            resolve_block_size(bad, None)


class _Tokenizer:
    """The tokenizer surface the rules read (mask_token, added vocab, token -> id)."""

    def __init__(self, added: dict[str, int], mask_token: str | None = None):
        self.added, self.mask_token, self.unk_token, self.unk_token_id = added, mask_token, None, None

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self.added)

    def convert_tokens_to_ids(self, token: str):
        return self.added.get(token)


def test_mask_id_from_config_else_tokenizer():
    tok = _Tokenizer({"<|MASK|>": 7, "<|endoftext|>": 3}, mask_token="<|MASK|>")
    assert resolve_mask_token_id(5, tok, 10).value == 5  # config wins
    assert resolve_mask_token_id(None, tok, 10).value == 7
    assert resolve_mask_token_id(None, _Tokenizer({"<|MASK|>": 8}), 10).value == 8  # added, not declared
    named_like_a_mask = _Tokenizer({"<|mdm_mask|>": 9, "<x>": 1})
    assert resolve_mask_token_id(None, named_like_a_mask, 10).value == 9
    with pytest.raises(ValueError, match="several mask-like tokens"):
        tokenizer_mask_token_id(_Tokenizer({"<mask>": 1, "[MASK]": 2}))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        resolve_mask_token_id(None, tok, 7)
    with pytest.raises(ValueError, match="is not in its vocabulary"):
        resolve_mask_token_id(None, _Tokenizer({}, mask_token="<|MASK|>"), 10)


@pytest.mark.parametrize("tokenizer", [None, _Tokenizer({"<|endoftext|>": 3})])
def test_no_mask_anywhere_names_both_places(tokenizer):
    with pytest.raises(ValueError, match=NO_MASK):
        resolve_mask_token_id(None, tokenizer, 10)


def test_eos_ids_from_generation_config():
    assert eos_token_ids({"eos_token_id": [5, 3]}) == [5, 3]
    assert eos_token_ids({"eos_token_id": 3}) == [3]
    assert eos_token_ids({}) == [] and eos_token_ids(None) == []


@pytest.mark.parametrize("mask, expected", [("declared", "tokenizer mask_token '<|MASK|>'"),
                                            ("added", "tokenizer token '<|MASK|>'"), ("none", None)])
def test_mask_rules_on_qwen2_style_tokenizers(tmp_path, mask, expected):
    tok = build_qwen2_tokenizer(tmp_path, mask=mask)
    found = tokenizer_mask_token_id(tok)
    assert (found and found.source) == expected
    if found:
        assert found.value == tok.convert_tokens_to_ids(MASK_TOKEN) == len(tok) - 1  # after Qwen3's tokens


# -- the replicas ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, str]:
    """name -> path: without diffusion fields (as SDAR's script expects), with them, and with
    no mask token anywhere."""
    import vllm_dllm_spec

    vllm_dllm_spec.register()  # the plugin's AutoConfig entry, as in every vLLM process
    root = tmp_path_factory.mktemp("replicas")
    return {
        "1.7B": make_sdar_replica(root / "1.7B", "SDAR-1.7B-Chat", seed=3),
        # tied like Qwen3-4B (the published SDAR-4B-Chat is untied): keeps the tied layout covered
        "4B+fields": make_sdar_replica(root / "4B", "SDAR-4B-Chat", diffusion_fields=True, seed=4,
                                       tie_word_embeddings=True),
        "8B+fields": make_sdar_replica(root / "8B", "SDAR-8B-Chat", diffusion_fields=True, seed=5),
        "no-mask": make_sdar_replica(root / "nomask", "SDAR-1.7B-Chat", mask="none", seed=6),
    }


def _read(path: str, name: str) -> dict:
    return json.loads((Path(path) / name).read_text())


def test_replica_files_have_the_published_layout(replicas):
    from transformers import AutoTokenizer

    plain, fields = _read(replicas["1.7B"], "config.json"), _read(replicas["4B+fields"], "config.json")
    assert set(plain) == PUBLISHED_KEYS and set(fields) == PUBLISHED_KEYS | {"block_size", "mask_token_id"}
    assert plain["auto_map"]["AutoConfig"] == "configuration_sdar.SDARConfig"
    assert plain["auto_map"]["AutoModelForCausalLM"] == "modeling_sdar.SDARForCausalLM"
    assert (plain["torch_dtype"], plain["model_type"]) == ("bfloat16", "sdar")
    assert plain["architectures"] == ["SDARForCausalLM"]
    assert (plain["tie_word_embeddings"], fields["tie_word_embeddings"]) == (False, True)
    tok = AutoTokenizer.from_pretrained(replicas["1.7B"])
    assert type(tok).__name__ == "Qwen2Tokenizer" and tok.mask_token == MASK_TOKEN and tok.eos_token == IM_END
    ids = tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END])
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]  # Qwen3's order
    assert _read(replicas["1.7B"], "generation_config.json")["eos_token_id"] == [ids[2], ids[0]]
    assert plain["eos_token_id"] == ids[0] and fields["mask_token_id"] == tok.convert_tokens_to_ids(MASK_TOKEN)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert plain["vocab_size"] % 64 == 0 and plain["vocab_size"] >= len(tok)
    assert (Path(replicas["1.7B"]) / "chat_template.jinja").read_text() == tok.chat_template
    assert not any(layout.tie_word_embeddings for layout in LAYOUTS.values())  # as published


def test_generation_config_is_qwen3s(tmp_path):
    """Qwen3's generation_config.json (eos list, sampling defaults), byte for byte in form: with
    Qwen3's ids it is 239 bytes, the size of every published SDAR copy."""
    write_generation_config(tmp_path, [151645, 151643], bos_id=151643)
    text = (tmp_path / "generation_config.json").read_text()
    assert len(text.encode()) == 239
    assert json.loads(text) == {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                                "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                                "transformers_version": "4.51.0"}


@pytest.mark.parametrize("name", ["1.7B", "4B+fields", "8B+fields"])
def test_replica_weights_are_named_like_qwen3(replicas, name):
    from safetensors import safe_open
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(replicas[name])
    cfg = _read(str(path), "config.json")
    stored = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    qwen3_fields = {k: v for k, v in cfg.items() if k not in ("auto_map", "model_type")}
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**qwen3_fields))
    expected = set(qwen3.state_dict()) - ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    assert set(stored) == expected
    assert set(stored.values()) == {"BF16"}
    assert (path / "model.safetensors.index.json").is_file() == (name != "1.7B")


def test_project_configuration_sdar_loads_as_remote_code(replicas):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module("configuration_sdar.SDARConfig", replicas["4B+fields"])
    cfg = cls.from_pretrained(replicas["4B+fields"])
    assert (cfg.model_type, cfg.block_size, cfg.tie_word_embeddings) == ("sdar", 4, True)
    assert cls.__module__.endswith("configuration_sdar")


# -- the config hook on replicas (no engine) ----------------------------------------------------

def engine_config(path, options=None, **kw):
    from vllm.engine.arg_utils import EngineArgs

    additional = {} if options is None else {"dllm_spec": options}
    args = EngineArgs(model=path, dtype="float32", max_model_len=256, enforce_eager=True,
                      block_size=32, additional_config=additional, **kw)
    return args.create_engine_config()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def hook_log(monkeypatch):
    """The hook's log lines. Its logger is swapped for one outside logging's registry, since
    vLLM's dictConfig clears handlers of existing "vllm.*" loggers when it reconfigures."""
    from vllm_dllm_spec import vllm_hooks

    handler, logger = _Lines(), logging.Logger(HOOK_LOGGER, logging.INFO)
    logger.addHandler(handler)
    monkeypatch.setattr(vllm_hooks, "logger", logger)
    return handler.lines


@pytest.mark.parametrize("trust", [False, True])
def test_hook_resolves_a_config_without_diffusion_fields(replicas, hook_log, trust):
    from transformers import AutoTokenizer

    cfg = engine_config(replicas["1.7B"], trust_remote_code=trust)
    hf = cfg.model_config.hf_config
    mask = AutoTokenizer.from_pretrained(replicas["1.7B"]).convert_tokens_to_ids(MASK_TOKEN)
    assert (hf.block_size, hf.mask_token_id) == (DEFAULT_BLOCK_SIZE, mask)
    assert cfg.speculative_config.num_speculative_tokens == DEFAULT_BLOCK_SIZE
    assert cfg.additional_config["dllm_spec"]["block_length"] == DEFAULT_BLOCK_SIZE
    default_lines = [line for line in hook_log if "default block size" in line]
    assert len(default_lines) == 1 and "4" in default_lines[0], hook_log


def test_mask_is_found_with_skip_tokenizer_init(replicas):
    """The tokenizer is the only other place the mask id lives: read even when vLLM skips it."""
    from transformers import AutoTokenizer

    cfg = engine_config(replicas["1.7B"], skip_tokenizer_init=True)
    mask = AutoTokenizer.from_pretrained(replicas["1.7B"]).convert_tokens_to_ids(MASK_TOKEN)
    assert cfg.model_config.hf_config.mask_token_id == mask


def test_block_length_knob_gives_the_block_size(replicas, hook_log):
    cfg = engine_config(replicas["1.7B"], {"block_length": 8})
    assert cfg.model_config.hf_config.block_size == 8
    assert cfg.speculative_config.num_speculative_tokens == 8
    assert not [line for line in hook_log if "default block size" in line]


def test_config_block_size_wins_and_a_contradicting_knob_is_refused(replicas):
    cfg = engine_config(replicas["4B+fields"])
    assert cfg.model_config.hf_config.block_size == 4
    with pytest.raises(Exception, match="block size the model was trained with"):
        engine_config(replicas["4B+fields"], {"block_length": 8})


@pytest.mark.parametrize("trust", [False, True])
def test_no_mask_token_anywhere_is_a_startup_error(replicas, trust):
    with pytest.raises(Exception, match=NO_MASK):
        engine_config(replicas["no-mask"], trust_remote_code=trust)


def test_no_mask_token_anywhere_stops_llm_startup(replicas):
    from vllm import LLM

    with pytest.raises(Exception, match="set mask_token_id in config.json or mask_token in tokenizer_config.json"):
        LLM(model=replicas["no-mask"], dtype="float32", max_model_len=256, enforce_eager=True, block_size=32)


# -- engines on replicas, against the oracle ---------------------------------------------------

MAX_TOKENS = [23, 9, 30, 8, 17, 5, 25, 12]
EOS_PROMPT = [17, 42, 99, 5, 250, 31]
_ORACLES: dict = {}


def shortest(runs):
    """An oracle under an eos list: the oracles take one eos id, and with a list generation stops
    at whichever id comes first, i.e. the shortest of the one-eos runs (they share the prefix
    and stop with that block)."""
    return min(runs, key=lambda r: len(r.tokens))


def oracle(path: str, prompt: list[int], max_tokens: int, eos_ids: list[int], block: int, mask: int, **knobs):
    """`reference.generate` (fused commit) under an eos list."""
    from vllm_dllm_spec.reference import SDARModel, generate

    if path not in _ORACLES:
        _ORACLES[path] = SDARModel.from_pretrained(path)
    return shortest(generate(_ORACLES[path], prompt, gen_length=max_tokens, block_length=block,
                             mask_token_id=mask, eos_token_id=e, fuse_commit=True, **knobs) for e in eos_ids)


def make_llm(path: str, trust: bool):
    from vllm import LLM

    return LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=16,
               block_size=32, enable_prefix_caching=False, seed=0, trust_remote_code=trust)


def run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.kv_transfer_params["dllm_spec"]["num_forwards"]) for o in outs]


ENGINES = [("1.7B", False), ("1.7B", True), ("4B+fields", False), ("8B+fields", True)]


@pytest.fixture(scope="module", params=ENGINES, ids=lambda c: f"{c[0]}-trust{int(c[1])}")
def engine(request, replicas):
    from vllm_dllm_spec.testing import shutdown_llm

    name, trust = request.param
    llm = make_llm(replicas[name], trust)
    yield replicas[name], llm
    shutdown_llm(llm)


def test_replica_generates_like_the_oracle(engine):
    from vllm import SamplingParams
    from transformers import AutoTokenizer

    path, llm = engine
    hf = llm.llm_engine.model_config.hf_config
    tok = AutoTokenizer.from_pretrained(path)
    assert (hf.block_size, hf.mask_token_id) == (4, tok.convert_tokens_to_ids(MASK_TOKEN))
    eos_ids = _read(path, "generation_config.json")["eos_token_id"]
    prompts = prompts_for(tok.convert_tokens_to_ids(ENDOFTEXT), seed=11)  # ordinary tokens only
    configs = request_configs(4)
    got = run(llm, prompts, [SamplingParams(max_tokens=m, temperature=0, extra_args=c)
                             for c, m in zip(configs, MAX_TOKENS)])
    for p, c, m, (tokens, forwards) in zip(prompts, configs, MAX_TOKENS, got):
        want = oracle(path, p, m, eos_ids, 4, hf.mask_token_id, **c)
        assert (tokens, forwards) == (want.tokens, want.num_forwards), (len(p), c)


@pytest.mark.parametrize("method", ["psd", "simsd"])
def test_speculative_methods_on_a_replica_without_diffusion_fields(replicas, method):
    """PSD and SimSD (self-draft) read the block and mask the hook resolved: equal to their
    oracles (tokens and target forwards) on the replica whose config.json has neither."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.reference.psd import psd_generate
    from vllm_dllm_spec.reference.simsd import simsd_generate
    from vllm_dllm_spec.testing import shutdown_llm

    path = replicas["1.7B"]
    tok = AutoTokenizer.from_pretrained(path)
    mask, endoftext = tok.convert_tokens_to_ids([MASK_TOKEN, ENDOFTEXT])
    prompts, max_tokens = prompts_for(endoftext, seed=12)[:4], [23, 9, 30, 8]
    llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=8,
              block_size=32, seed=0, additional_config={"dllm_spec": {"method": method}})
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens], use_tqdm=False)
    finally:
        shutdown_llm(llm)
    oracle(path, prompts[0], 1, [endoftext], 4, mask)  # loads (or reuses) the oracle model
    model = _ORACLES[path]
    eos_ids = _read(path, "generation_config.json")["eos_token_id"]
    for p, m, o in zip(prompts, max_tokens, outs):
        record = o.kv_transfer_params["dllm_spec"]
        if method == "psd":
            want = shortest(psd_generate(model, p, gen_length=m, block_length=4, mask_token_id=mask, eos_token_id=e)
                            for e in eos_ids)
            assert (list(o.outputs[0].token_ids), record["num_forwards"]) == (want.tokens, want.num_forwards)
        else:
            want = shortest(simsd_generate(model, None, p, gen_length=m, block_length=4, mask_token_id=mask,
                                           eos_token_id=e) for e in eos_ids)
            assert (list(o.outputs[0].token_ids), record["target_forwards"]) == (want.tokens, want.target_forwards)


@pytest.fixture(scope="module")
def eos_replica(tmp_path_factory):
    """A replica whose eos list also holds X, a token its greedy answer to EOS_PROMPT says in
    the middle of a block (the random weights never say the chat end tokens):
    [<|im_end|>, <|endoftext|>, X]. Returns the path, the uncut answer and X's index."""
    from transformers import AutoTokenizer

    path = make_sdar_replica(tmp_path_factory.mktemp("eos"), "SDAR-4B-Chat", mask="added", seed=7)
    tok = AutoTokenizer.from_pretrained(path)
    im_end, endoftext = tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    mask = tok.convert_tokens_to_ids(MASK_TOKEN)
    full = oracle(path, EOS_PROMPT, 24, [im_end, endoftext], 4, mask, remasking_strategy="sequential").tokens
    assert len(full) == 24

    def mid_block(i: int) -> bool:  # not the last position of its SDAR block
        return (len(EOS_PROMPT) + i + 1) % 4 != 0

    stop_at = next(i for i in range(8, len(full)) if full[i] not in full[:i] and mid_block(i))
    write_generation_config(path, [im_end, endoftext, full[stop_at]], bos_id=endoftext)
    return path, full, stop_at


def test_eos_list_id_stops_a_request_like_the_oracle(eos_replica):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_dllm_spec.testing import shutdown_llm

    path, full, stop_at = eos_replica
    eos_ids = _read(path, "generation_config.json")["eos_token_id"]
    other = next(i for i in range(3, stop_at) if full[i] not in full[:i])
    knobs = {"remasking_strategy": "sequential"}
    llm = make_llm(path, trust=False)
    try:
        got = run(llm, [EOS_PROMPT, EOS_PROMPT], [
            SamplingParams(max_tokens=24, temperature=0, extra_args=knobs),
            SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[full[other]], extra_args=knobs)])
    finally:
        shutdown_llm(llm)
    mask = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(MASK_TOKEN)
    want = oracle(path, EOS_PROMPT, 24, eos_ids, 4, mask, **knobs)
    assert want.tokens == full[:stop_at + 1]
    assert got[0] == (want.tokens, want.num_forwards)
    want = oracle(path, EOS_PROMPT, 24, eos_ids + [full[other]], 4, mask, **knobs)
    assert got[1] == (want.tokens, want.num_forwards) and len(want.tokens) == other + 1


# -- `vllm serve` on replicas (multiprocess engine: the resolved fields reach the engine core) ---
#
# What the served path adds to LLM(...): the config hook runs in the API server, and the engine
# core is a spawned process that receives the pickled VllmConfig (the model's config class with
# the resolved block size / mask id). --trust-remote-code makes vLLM cloudpickle that config and
# imports none of the directory's configuration_*.py (the plugin's class is registered for the
# model type; the replica's tokenizer_config names its tokenizer class). So the served variants
# that differ are dense / MoE (config class, model, MoE kernels in the engine core) x plain /
# cloud pickle: dense + trust and MoE + trust here, dense without trust in tests/test_chat.py
# (SDAR-4B-Chat), MoE without trust as a pickle round trip of its VllmConfig in test_moe.py.
# 1.7B differs from 4B / 8B only in shapes and one weight file: LLM(...) above.
SERVED = ["SDAR-8B-Chat", "SDAR-30B-A3B-Chat"]


@pytest.fixture(scope="module")
def trusted_servers(tmp_path_factory):
    """{name: (replica path, HF_MODULES_CACHE dir, server)}: `vllm serve <replica>
    --trust-remote-code` of every SERVED replica, started at once (a start is mostly
    single-threaded), each with its own remote-code cache dir."""
    from vllm_dllm_spec.testing import VLLMServer

    started = {}
    try:
        for name in SERVED:
            root = tmp_path_factory.mktemp(f"trusted_{name}")
            path = make_sdar_replica(root / "replica", name, seed=8)
            modules = root / "hf_modules"  # where remote code would be copied
            srv = VLLMServer(path, root / "serve.log", extra_args=("--trust-remote-code",),
                             env={"HF_MODULES_CACHE": str(modules)})
            started[name] = (path, modules, srv.start())
        yield {name: (path, modules, srv.wait_ready()) for name, (path, modules, srv) in started.items()}
    finally:
        for _, _, srv in started.values():
            srv.__exit__()


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVED)
def test_serve_replica_with_trust_remote_code(name, trusted_servers):
    """`vllm serve <replica> --trust-remote-code`, no dllm_spec option, config.json without the
    diffusion fields: the API server resolves block 4 and the tokenizer's mask, the engine core
    serves with them: completions (one with a per-request knob) equal the oracle, tokens and
    forwards; the log names the default block size once; the directory's configuration_*.py
    is never imported."""
    openai = pytest.importorskip("openai")
    from transformers import AutoTokenizer

    path, modules, srv = trusted_servers[name]
    mask = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(MASK_TOKEN)
    eos_ids = _read(path, "generation_config.json")["eos_token_id"]
    requests = [("def block_diffusion(model", 14, {}),
                ("The quick brown fox", 11, {"remasking_strategy": "low_confidence_dynamic",
                                             "confidence_threshold": 0.3})]
    client = openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=120)
    for prompt, n, knobs in requests:
        resp = client.completions.create(model="sdar", prompt=prompt, max_tokens=n, temperature=0,
                                         extra_body={"return_token_ids": True, "vllm_xargs": knobs})
        choice = resp.choices[0]
        want = oracle(path, choice.prompt_token_ids, n, eos_ids, 4, mask, **knobs)
        assert choice.token_ids == want.tokens, knobs
        assert resp.kv_transfer_params["dllm_spec"]["num_forwards"] == want.num_forwards
    log = srv.log(200_000)
    assert log.count("using SDAR's default block size 4") == 1, log[-3000:]
    assert not list(modules.rglob("configuration_sdar*.py"))
    # the control: loading the auto_map class as remote code, with the same env, copies it there
    load = ("from transformers.dynamic_module_utils import get_class_from_dynamic_module as g; "
            f"g({_read(path, 'config.json')['auto_map']['AutoConfig']!r}, {path!r})")
    subprocess.run([sys.executable, "-c", load], check=True, env=dict(os.environ, HF_MODULES_CACHE=str(modules)))
    assert list(modules.rglob("configuration_sdar*.py"))
