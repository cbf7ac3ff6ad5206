"""SimSD inside vLLM (real engine, in-process, float32) against the pure-PyTorch SimSD oracle
(`reference.simsd.simsd_generate`): tokens, target forwards, draft forwards and accepted tokens
per round, for a mixed-length batch of 8 prompts with per-request draft knobs, block 4 and 8,
prefix caching off and on, self-draft and a separate draft model (other weights AND another
architecture: hidden 128, GQA 4:1, tied embeddings), 1 to 3 draft blocks per round; MRS with
seeds (exact too: vLLM's per-request generator is the oracle's generator) and MRS keeping the
target's distribution at block length 1; rope_copy off (exact, and the acceptance collapses)."""
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_dllm_spec.reference import SDARModel  # noqa: E402
from vllm_dllm_spec.testing import shutdown_llm as shutdown  # noqa: E402
from vllm_helpers import SERVE_MAX_MODEL_LEN, prompts_for, request_configs, served_simsd_options  # noqa: E402
from vllm_dllm_spec.reference.simsd import simsd_generate  # noqa: E402

MAX_TOKENS = [23, 9, 30, 8, 17, 5, 25, 12]


def make_llm(path: str, *, prefix_caching: bool, options: dict, **kw):
    from vllm import LLM

    kw.setdefault("max_num_seqs", 32)
    return LLM(
        model=path, dtype="float32", max_model_len=512, enforce_eager=True,
        block_size=32, enable_prefix_caching=prefix_caching, seed=0,
        additional_config={"dllm_spec": {"method": "simsd", **options}}, **kw,
    )


def oracle_kwargs(config: dict) -> dict:
    names = {"remasking_strategy": "draft_remasking_strategy", "denoising_steps": "draft_denoising_steps"}
    return {names.get(k, k): v for k, v in config.items()}


def run_batch(llm, prompts, configs, max_tokens, temperature=0.0, seeds=None):
    from vllm import SamplingParams

    seeds = seeds or [None] * len(prompts)
    sps = [SamplingParams(max_tokens=m, temperature=temperature, seed=s, extra_args=c)
           for c, m, s in zip(configs, max_tokens, seeds)]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)


def check_against_oracle(target, draft, options, prompts, configs, max_tokens, outputs,
                         temperature=0.0, seeds=None):
    seeds = seeds or [None] * len(prompts)
    engine_kw = {k: v for k, v in options.items() if k in ("num_draft_blocks", "verification", "rope_copy")}
    mismatches, records = [], []
    for p, c, m, s, o in zip(prompts, configs, max_tokens, seeds, outputs):
        r = simsd_generate(target, draft, p, gen_length=m, temperature=temperature, seed=s,
                           **engine_kw, **oracle_kwargs(c))
        got = list(o.outputs[0].token_ids)
        rec = (o.kv_transfer_params or {}).get("dllm_spec")
        assert rec is not None and rec["method"] == "simsd", "every request carries its record"
        records.append(rec)
        mine = (got, rec["target_forwards"], rec["draft_forwards"], rec["accepted_per_round"],
                rec["drafted_per_round"])
        want = (r.tokens, r.target_forwards, r.draft_forwards, r.accepted_per_round, r.drafted_per_round)
        if mine != want:
            mismatches.append((len(p), c, mine, want))
        assert rec["acceptance_histogram"] == {int(k): v for k, v in r.acceptance_histogram.items()}
    assert not mismatches, "\n".join(map(str, mismatches))
    return records


@pytest.fixture(scope="module")
def ckpt_b8(tmp_path_factory) -> str:
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(tmp_path_factory.mktemp("simsd_b8"), block_size=8, seed=2)


@pytest.fixture(scope="module")
def draft_b8(tmp_path_factory) -> str:
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(
        tmp_path_factory.mktemp("simsd_draft_b8"), block_size=8, seed=3, tie_word_embeddings=True,
        num_attention_heads=4, num_key_value_heads=1, hidden_size=128)


@pytest.fixture(scope="module")
def bundled_target() -> str:
    import vllm_dllm_spec

    return vllm_dllm_spec.bundled_model_path()


@pytest.fixture(scope="module")
def bundled_draft() -> str:
    import vllm_dllm_spec

    return vllm_dllm_spec.bundled_model_path("draft")


CASES = [  # (target fixture, draft fixture or None = self-draft, B, prefix caching, K)
    ("bundled_target", "bundled_draft", 4, True, 1),  # the trained pair (bf16 files, run in fp32)
    ("bundled_target", None, 4, False, 2),
    ("tiny_ckpt", None, 4, False, 1),
    ("tiny_ckpt", "tiny_tied_ckpt", 4, True, 2),
    ("ckpt_b8", None, 8, True, 1),
    ("ckpt_b8", "draft_b8", 8, False, 3),
]


@pytest.fixture(scope="module", params=CASES,
                ids=lambda c: f"{c[0]}-{c[1] or 'self'}-B{c[2]}-pc{int(c[3])}-K{c[4]}")
def engine(request):
    name, draft_name, B, prefix_caching, K = request.param
    path = request.getfixturevalue(name)
    draft_path = request.getfixturevalue(draft_name) if draft_name else None
    options = {"num_draft_blocks": K, "draft_model": draft_path}
    llm = make_llm(path, prefix_caching=prefix_caching, options=options)
    target = SDARModel.from_pretrained(path)
    draft = SDARModel.from_pretrained(draft_path) if draft_path else None
    yield llm, target, draft, options, B, prefix_caching
    shutdown(llm)


def test_greedy_batch_equals_oracle(engine):
    llm, target, draft, options, B, prefix_caching = engine
    prompts = prompts_for(target.config.vocab_size, seed=B)
    configs = request_configs(B)
    outputs = run_batch(llm, prompts, configs, MAX_TOKENS)
    check_against_oracle(target, draft, options, prompts, configs, MAX_TOKENS, outputs)
    rotated = configs[3:] + configs[:3]  # other knobs on other prompt lengths, same engine
    outputs = run_batch(llm, prompts, rotated, MAX_TOKENS)
    check_against_oracle(target, draft, options, prompts, rotated, MAX_TOKENS, outputs)
    if prefix_caching:  # the same prompts again: cached blocks reused, output still exact
        outputs = run_batch(llm, prompts, configs, MAX_TOKENS)
        check_against_oracle(target, draft, options, prompts, configs, MAX_TOKENS, outputs)
        hits = {len(p): o.num_cached_tokens for p, o in zip(prompts, outputs)}
        assert hits[70] >= 64 and hits[40] >= 32, hits


def _draft_wiring(worker) -> dict:
    """What the runner's draft is: checked in the worker (collective_rpc)."""
    from vllm_dllm_spec.model import SDARForCausalLM
    from vllm_dllm_spec.simsd.draft import DRAFT_PREFIX

    runner = worker.model_runner
    draft = runner.draft
    group = runner.kv_cache_config.kv_cache_groups
    target_layers = {n for g in runner.attn_groups[0] for n in g.layer_names}
    caches = runner.compilation_config.static_forward_context
    return {
        "vllm_class": isinstance(draft.model, SDARForCausalLM),
        "layers": list(draft.layer_names),
        "prefixed": all(n.startswith(DRAFT_PREFIX + ".") for n in draft.layer_names),
        "in_kv_group": len(group) == 1 and set(draft.layer_names) <= set(group[0].layer_names),
        "groups_split": not (target_layers & set(draft.layer_names))
        and {n for g in draft.attn_groups for n in g.layer_names} == set(draft.layer_names),
        "written": all(bool(caches[n].kv_cache.abs().sum() > 0) for n in draft.layer_names),
    }


def test_draft_runs_on_vllm_layers(engine):
    """The draft is the plugin's vLLM model class, its attention layers are in the engine's one
    KV-cache group (sized and bound by vLLM) and its forwards wrote their KV there."""
    llm, target, draft, options, B, _ = engine
    run_batch(llm, prompts_for(target.config.vocab_size, seed=B)[:2], request_configs(B)[:2], [8, 8])
    (info,) = llm.collective_rpc(_draft_wiring)
    num_layers = (draft or target).config.num_hidden_layers
    assert len(info.pop("layers")) == num_layers
    assert all(info.values()), info


def test_mrs_with_seeds_equals_oracle(engine):
    """temperature > 0: the engine's per-request generator (SamplingParams.seed) is consumed in
    the oracle's order (draft sampling, then the MRS uniforms), so even sampling is exact."""
    llm, target, draft, options, B, _ = engine
    if options["num_draft_blocks"] == 1 and draft is None:
        pytest.skip("covered by the other cases")
    prompts = prompts_for(target.config.vocab_size, seed=50 + B)
    configs = [{"remasking_strategy": "low_confidence_static"}] * len(prompts)
    seeds = list(range(100, 100 + len(prompts)))
    outputs = run_batch(llm, prompts, configs, MAX_TOKENS, temperature=0.8, seeds=seeds)
    # the engine runs greedy_match; MRS is per engine: compare against the oracle's greedy_match
    check_against_oracle(target, draft, options, prompts, configs, MAX_TOKENS, outputs,
                         temperature=0.8, seeds=seeds)


@pytest.fixture(scope="module")
def ckpt_b1(tmp_path_factory) -> str:
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(tmp_path_factory.mktemp("simsd_b1"), block_size=1, seed=0)


def test_mrs_engine_exact_and_keeps_target_distribution(ckpt_b1, tiny_tied_ckpt):
    """verification="mrs", block length 1 (where SimSD is exact): seeded requests equal the
    oracle; the first-token histogram over N=600 seeds matches the target's exact sampling
    distribution (temperature 1, top_k 8) within total variation 0.12 (noise ~ 0.05)."""
    options = {"num_draft_blocks": 2, "draft_model": tiny_tied_ckpt, "verification": "mrs"}
    llm = make_llm(ckpt_b1, prefix_caching=False, options=options, max_num_seqs=128)
    try:
        target = SDARModel.from_pretrained(ckpt_b1)
        draft = SDARModel.from_pretrained(tiny_tied_ckpt)
        prompts = prompts_for(target.config.vocab_size, seed=7)
        configs = [{}] * len(prompts)
        seeds = list(range(len(prompts)))
        outputs = run_batch(llm, prompts, configs, MAX_TOKENS, temperature=0.9, seeds=seeds)
        check_against_oracle(target, draft, options, prompts, configs, MAX_TOKENS, outputs,
                             temperature=0.9, seeds=seeds)

        from vllm import SamplingParams

        prompt, n, top_k = [5, 6, 7], 600, 8
        sps = [SamplingParams(max_tokens=1, temperature=1.0, top_k=top_k, seed=s) for s in range(n)]
        outs = llm.generate([{"prompt_token_ids": prompt}] * n, sps, use_tqdm=False)
        counts = torch.zeros(target.config.vocab_size)
        for o in outs:
            counts[o.outputs[0].token_ids[0]] += 1
        mask_id = target.config.mask_token_id
        ids = torch.tensor([prompt + [mask_id]])
        causal = torch.ones(4, 4, dtype=torch.bool).tril()[None]
        with torch.no_grad():
            logits = target(ids, torch.arange(4)[None], causal)[0, -1]
        logits[mask_id] = float("-inf")
        kth = logits.topk(top_k).values[-1]
        exact = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
        tv = 0.5 * (counts / n - exact).abs().sum()
        assert tv < 0.12, f"total variation {tv:.3f}"
    finally:
        shutdown(llm)


def test_rope_copy_off_exact_and_degrades(tiny_ckpt):
    """The paper's ablation inside vLLM: rope_copy off equals the oracle with rope_copy off,
    and self-draft acceptance collapses against rope_copy on."""
    target = SDARModel.from_pretrained(tiny_ckpt)
    prompts = prompts_for(target.config.vocab_size, seed=11)
    configs = [{"remasking_strategy": "low_confidence_static"}] * len(prompts)
    rates = {}
    for rope_copy in (True, False):
        options = {"num_draft_blocks": 1, "rope_copy": rope_copy}
        llm = make_llm(tiny_ckpt, prefix_caching=False, options=options)
        try:
            outputs = run_batch(llm, prompts, configs, MAX_TOKENS)
            records = check_against_oracle(target, None, options, prompts, configs, MAX_TOKENS, outputs)
        finally:
            shutdown(llm)
        rates[rope_copy] = (sum(sum(r["accepted_per_round"]) for r in records)
                            / sum(sum(r["drafted_per_round"]) for r in records))
    assert rates[True] > 0.5 and rates[True] > 2 * rates[False], rates


@pytest.fixture(scope="module")
def simsd_server(tiny_ckpt, tiny_tied_ckpt, shared_server):
    openai = pytest.importorskip("openai")
    options = served_simsd_options(tiny_tied_ckpt)
    srv = shared_server(tiny_ckpt, options, max_model_len=SERVE_MAX_MODEL_LEN)  # shared with test_logprobs
    return openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=120), options


def test_serve_openai_client(simsd_server, tiny_ckpt, tiny_tied_ckpt):
    client, options = simsd_server
    target = SDARModel.from_pretrained(tiny_ckpt)
    draft = SDARModel.from_pretrained(tiny_tied_ckpt)
    for prompt, n in [("The quick brown fox", 13), ("x", 9)]:
        resp = client.completions.create(model="sdar", prompt=prompt, max_tokens=n, temperature=0,
                                         extra_body={"return_token_ids": True})
        choice = resp.choices[0]
        r = simsd_generate(target, draft, choice.prompt_token_ids, gen_length=n,
                           num_draft_blocks=options["num_draft_blocks"],
                           draft_remasking_strategy=options["remasking_strategy"])
        assert choice.token_ids == r.tokens
        record = resp.kv_transfer_params["dllm_spec"]
        assert (record["target_forwards"], record["draft_forwards"], record["accepted_per_round"]) == (
            r.target_forwards, r.draft_forwards, r.accepted_per_round)
        stream = client.completions.create(model="sdar", prompt=prompt, max_tokens=n, temperature=0,
                                           stream=True, extra_body={"return_token_ids": True})
        ids = []
        for chunk in stream:
            if chunk.choices:
                ids += getattr(chunk.choices[0], "token_ids", None) or []
        assert ids == r.tokens
