"""SDAR-MoE (SDAR-30B-A3B-Chat, `SDARMoeForCausalLM`, Qwen3-MoE layers) on a tiny random replica
of the published layout (config.json without block_size / mask_token_id, as SDAR's script
expects): the replica's files, the reference MoE model against transformers' Qwen3-MoE, the
config hook with and without trust_remote_code (and its config pickled as for `vllm serve`'s
engine core), and real engines (`LLM`, float32, greedy) equal to their oracles for block diffusion, PSD and SimSD (an
MoE target with a dense draft sharing its tokenizer), tokens and forward counts, at TP=1 and
TP=2; a configuration vLLM's CPU MoE kernels refuse gives an error naming it."""
import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tolerances import assert_close  # noqa: E402
from vllm_dllm_spec.checkpoint import MASK_TOKEN  # noqa: E402
from vllm_dllm_spec.replicas import ENDOFTEXT, make_sdar_replica  # noqa: E402
from vllm_dllm_spec.testing import shutdown_llm  # noqa: E402
from vllm_helpers import prompts_for, request_configs  # noqa: E402

MOE = "SDAR-30B-A3B-Chat"
MOE_KEYS = {  # Qwen3-MoE's routing keys, on top of the dense SDAR key set (docs/CHECKPOINTS.md)
    "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size", "norm_topk_prob",
    "num_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
}
MAX_TOKENS = [23, 9, 30, 8, 17, 5, 25, 12]
BLOCK = 4  # resolved: the replica's config.json has no block_size
# 32 MiB of KV cache holds > 20k tokens of these tiny models: 1 GiB (VLLM_CPU_KVCACHE_SPACE)
# per engine and TP worker is memory a shared test machine pages in for nothing
KV_BYTES = 32 << 20


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """The MoE replica (no diffusion fields) and a dense SDAR-1.7B-Chat replica with the same
    tokenizer (the SimSD draft: same vocabulary and mask token)."""
    import vllm_dllm_spec

    vllm_dllm_spec.register()
    root = tmp_path_factory.mktemp("moe")
    return {"moe": make_sdar_replica(root / "moe", MOE, seed=21),
            "draft": make_sdar_replica(root / "draft", "SDAR-1.7B-Chat", seed=22)}


def _read(path: str, name: str) -> dict:
    return json.loads((Path(path) / name).read_text())


@pytest.fixture(scope="module")
def ids(paths) -> dict[str, int | list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["moe"])
    return {"mask": tok.convert_tokens_to_ids(MASK_TOKEN), "endoftext": tok.convert_tokens_to_ids(ENDOFTEXT),
            "eos": _read(paths["moe"], "generation_config.json")["eos_token_id"]}


_MODELS: dict = {}


def ref(path: str):
    from vllm_dllm_spec.reference import SDARModel

    if path not in _MODELS:
        _MODELS[path] = SDARModel.from_pretrained(path)
    return _MODELS[path]


def shortest(runs):
    """An oracle under an eos list: generation stops at whichever id comes first, i.e. the
    shortest of the one-eos runs."""
    return min(runs, key=lambda r: len(r.tokens))


# -- the replica and the reference model ---------------------------------------------------------

def qwen3_moe_config(cfg: dict):
    from transformers import Qwen3MoeConfig

    skip = ("auto_map", "model_type", "architectures", "attn_implementation")  # SDAR trains with flex attention
    return Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k not in skip}, attn_implementation="sdpa")


def test_moe_replica_has_the_published_layout(paths):
    from safetensors import safe_open
    from transformers import Qwen3MoeForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    moe, dense = _read(paths["moe"], "config.json"), _read(paths["draft"], "config.json")
    assert set(moe) == set(dense) | MOE_KEYS and "block_size" not in moe and "mask_token_id" not in moe
    assert (moe["architectures"], moe["model_type"]) == (["SDARMoeForCausalLM"], "sdar_moe")
    assert moe["auto_map"] == {"AutoConfig": "configuration_sdar_moe.SDARMoeConfig",
                               "AutoModel": "modeling_sdar_moe.SDARMoeModel",
                               "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM"}
    assert (moe["norm_topk_prob"], moe["decoder_sparse_step"], moe["mlp_only_layers"]) == (True, 1, [])
    assert moe["vocab_size"] == dense["vocab_size"]  # the SimSD draft shares the tokenizer
    path = Path(paths["moe"])
    stored = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert set(stored.values()) == {"BF16"} and (path / "model.safetensors.index.json").is_file()
    experts = {f"model.layers.{i}.mlp.experts.{e}.{w}_proj.weight"
               for i in range(moe["num_hidden_layers"]) for e in range(moe["num_experts"]) for w in ("gate", "up", "down")}
    assert experts | {"model.layers.1.mlp.gate.weight"} <= set(stored)
    # transformers' Qwen3-MoE loads the files as they are: no missing or unexpected weight
    _, info = Qwen3MoeForCausalLM.from_pretrained(str(path), config=qwen3_moe_config(moe), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cls = get_class_from_dynamic_module("configuration_sdar_moe.SDARMoeConfig", paths["moe"])
    cfg = cls.from_pretrained(paths["moe"])
    assert (cfg.model_type, cfg.num_experts, cfg.block_size) == ("sdar_moe", moe["num_experts"], None)


def test_reference_moe_equals_transformers_qwen3_moe(paths):
    """The oracle's sparse MLP (router softmax, top-k, norm_topk_prob, experts) against
    transformers' Qwen3-MoE on the replica's weights: causal logits, and a block-causal mask."""
    from transformers import Qwen3MoeForCausalLM

    from vllm_dllm_spec.reference import block_causal_mask

    ours = ref(paths["moe"])
    hf = Qwen3MoeForCausalLM.from_pretrained(paths["moe"], config=qwen3_moe_config(_read(paths["moe"], "config.json")),
                                             dtype=torch.float32).eval()
    n = 14
    ids = torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        assert_close(ours(ids, torch.arange(n).expand(2, n), causal.expand(2, n, n)), hf(input_ids=ids).logits)
        block = block_causal_mask(0, n, BLOCK)
        assert_close(ours(ids[:1], torch.arange(n)[None], block[None]),
                     hf(input_ids=ids[:1], attention_mask=block[None, None]).logits)
    assert all(type(layer.mlp).__name__ == "SparseMoeBlock" for layer in ours.model.layers)


def test_reference_dense_fallback_layers(tmp_path):
    """Qwen3-MoE's layer rule in the oracle: mlp_only_layers and decoder_sparse_step give dense MLPs."""
    from vllm_dllm_spec.reference.model import MLP, SDARArchConfig, SDARModel, SparseMoeBlock

    cfg = {**_read(make_sdar_replica(tmp_path, MOE, num_hidden_layers=4), "config.json"),
           "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    kinds = [type(layer.mlp) for layer in SDARModel(SDARArchConfig.from_dict(cfg)).model.layers]
    assert kinds == [MLP, SparseMoeBlock, MLP, MLP]


# -- start-up with and without trust_remote_code (what `vllm serve` hands its engine core) --------

@pytest.mark.parametrize("trust", [False, True])
def test_moe_config_resolves_and_pickles_for_the_engine_core(paths, ids, trust):
    """The config hook on the MoE replica with and without trust_remote_code: the plugin's
    SDARMoeConfig (never the directory's remote class), block 4, the tokenizer's mask; and the
    VllmConfig as `vllm serve` sends it to its spawned engine core (multiprocessing's pickler;
    with trust_remote_code vLLM registers cloudpickle for it) keeps all three. The served
    MoE path with --trust-remote-code runs in tests/test_checkpoints.py."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=paths["moe"], dtype="float32", max_model_len=256, enforce_eager=True, block_size=32,
                     trust_remote_code=trust).create_engine_config()
    for config in (cfg, pickle.loads(ForkingPickler.dumps(cfg))):
        hf = config.model_config.hf_config
        assert (type(hf).__module__, type(hf).__name__) == ("vllm_dllm_spec.hf_config", "SDARMoeConfig")
        assert (hf.block_size, hf.mask_token_id) == (BLOCK, ids["mask"])
        assert config.speculative_config.num_speculative_tokens == BLOCK


# -- engines against the oracles (TP=1) -----------------------------------------------------------

METHODS = ["block_diffusion", "psd", "simsd"]


def options_for(method: str, paths) -> dict:
    return {"method": method, **({"draft_model": paths["draft"]} if method == "simsd" else {})}


@pytest.fixture(scope="module", params=METHODS)
def engine(request, paths):
    from vllm import LLM

    method = request.param
    llm = LLM(model=paths["moe"], dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=16,
              block_size=32, seed=0, kv_cache_memory_bytes=KV_BYTES,
              additional_config={"dllm_spec": options_for(method, paths)})
    yield method, llm
    shutdown_llm(llm)


def check_against_oracle(method, paths, ids, prompts, max_tokens, outs, knobs=None):
    from vllm_dllm_spec.reference import generate
    from vllm_dllm_spec.reference.psd import psd_generate
    from vllm_dllm_spec.reference.simsd import simsd_generate

    target = ref(paths["moe"])
    common = dict(block_length=BLOCK, mask_token_id=ids["mask"])
    knobs = knobs or [{}] * len(prompts)
    for p, m, k, o in zip(prompts, max_tokens, knobs, outs):
        record = o.kv_transfer_params["dllm_spec"]
        got = list(o.outputs[0].token_ids)
        if method == "block_diffusion":
            want = shortest(generate(target, p, gen_length=m, fuse_commit=True, eos_token_id=e, **common, **k)
                            for e in ids["eos"])
            assert (got, record["num_forwards"], record["step_map"]) == (
                want.tokens, want.num_forwards, want.step_map), (len(p), k)
        elif method == "psd":
            want = shortest(psd_generate(target, p, gen_length=m, eos_token_id=e, **common) for e in ids["eos"])
            assert (got, record["num_forwards"], record["step_map"]) == (
                want.tokens, want.num_forwards, want.step_map), len(p)
        else:
            want = shortest(simsd_generate(target, ref(paths["draft"]), p, gen_length=m, eos_token_id=e, **common)
                            for e in ids["eos"])
            assert (got, record["target_forwards"], record["draft_forwards"], record["accepted_per_round"]) == (
                want.tokens, want.target_forwards, want.draft_forwards, want.accepted_per_round), len(p)


def test_moe_engine_equals_oracle(engine, paths, ids):
    from vllm import SamplingParams

    method, llm = engine
    hf = llm.llm_engine.model_config.hf_config
    assert (type(hf).__name__, hf.block_size, hf.mask_token_id) == ("SDARMoeConfig", BLOCK, ids["mask"])
    prompts = prompts_for(ids["endoftext"], seed=31)  # ordinary tokens only
    knobs = request_configs(BLOCK) if method == "block_diffusion" else None
    if method != "block_diffusion":  # PSD / SimSD: half the batch, engine knobs
        prompts = prompts[::2]
    max_tokens = MAX_TOKENS[:len(prompts)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(max_tokens=m, temperature=0, extra_args=k)
                         for m, k in zip(max_tokens, knobs or [None] * len(prompts))], use_tqdm=False)
    check_against_oracle(method, paths, ids, prompts, max_tokens, outs, knobs)


# -- what vLLM's CPU MoE kernels refuse ------------------------------------------------------------

def test_refused_moe_configuration_is_named(tmp_path):
    """vLLM's CPU fused-MoE kernel needs hidden_size divisible by 32; its own error says only "No
    Unquantized MoE backend supports the deployment configuration": the plugin's names it."""
    from vllm import LLM

    path = make_sdar_replica(tmp_path, MOE, hidden_size=48, seed=23)
    with pytest.raises(NotImplementedError, match=r"refuse this SDAR-MoE configuration: hidden_size=48, "
                       r"moe_intermediate_size=32 \(32 per rank at tensor parallel size 1\), num_experts=8, "
                       r"num_experts_per_tok=2, dtype=torch.float32; vLLM's CPU MoE kernel needs hidden_size "
                       r"divisible by 32"):
        LLM(model=path, dtype="float32", max_model_len=256, enforce_eager=True, block_size=32)


# -- TP=2 -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_moe_tp2_equals_oracle(paths, ids, method, monkeypatch):
    """TP=2 (two worker processes, gloo): attention heads and each expert's width are sharded
    (the router is replicated); tokens and forward counts equal the oracle."""
    import vllm.envs
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "1")  # not the 5 s grace at shutdown
    vllm.envs.disable_envs_cache()  # an earlier in-process engine froze vLLM's env reads
    llm = LLM(model=paths["moe"], dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=8,
              block_size=32, tensor_parallel_size=2, distributed_executor_backend="mp", seed=0,
              kv_cache_memory_bytes=KV_BYTES, additional_config={"dllm_spec": options_for(method, paths)})
    rng = random.Random(41)
    prompts = [[rng.randrange(2, ids["endoftext"]) for _ in range(n)] for n in (2, 7, 12)]
    max_tokens = [14, 9, 14]
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens], use_tqdm=False)
    finally:
        shutdown_llm(llm)
    check_against_oracle(method, paths, ids, prompts, max_tokens, outs)
