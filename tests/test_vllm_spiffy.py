"""Spiffy inside vLLM (real engine, in-process, float32) against the pure-PyTorch oracle
(`reference.spiffy.spiffy_generate`): tokens, step_map and forwards of a mixed batch (8 prompts
with per-request strategies, each once greedy and once sampled with its own seed, temperature,
top_k / top_p) in ONE generate call, block 4 and 8, prefix caching off and on, budgets 2..6;
TP=2; the context limit and logprobs; bad knobs (start-up errors, 400s on a served engine that keeps
serving). The oracle equals plain decoding seed for seed (tests/test_spiffy_reference.py), so
these outputs are plain block diffusion's, with fewer forwards."""
import os
import random

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_dllm_spec.methods import max_total_tokens  # noqa: E402
from vllm_dllm_spec.reference import SDARModel, generate  # noqa: E402
from vllm_dllm_spec.reference.spiffy import DraftGraph, spiffy_generate  # noqa: E402
from vllm_dllm_spec.testing import VLLMServer, shutdown_llm  # noqa: E402
from test_logprobs import check_offline  # noqa: E402
from vllm_helpers import prompts_for, request_configs  # noqa: E402

MAX_TOKENS = [23, 9, 30, 8, 17, 5, 25, 12]
# the sampled copy of request i: (temperature, top_k, top_p, seed)
SAMPLING = [(0.7, 0, 1.0, 11), (1.0, 20, 1.0, 12), (0.7, 0, 0.9, 13), (1.0, 0, 1.0, 14),
            (1.0, 5, 0.8, 15), (0.7, 0, 1.0, 16), (1.0, 0, 0.95, 17), (0.7, 3, 1.0, 18)]


def dag(block_length: int) -> DraftGraph:
    """A draft graph with branching over positions and tokens, several ways into one state
    (multi-parent), a duplicate formula's state, an impossible formula late in a block, and
    complete-state formulas near a block's end."""
    nodes = [((1, 1),), ((1, 1), (2, 1)), ((1, 2),), ((2, 1),), ((1, 1), (2, 1), (3, 1)),
             ((1, 1), (2, 2)), ((1, 1), (3, 1)), ((2, 1), (3, 1)), ((1, 1), (2, 1), (3, 1), (4, 1))]
    return DraftGraph(tuple(nodes), block_length, {"kind": "test dag"})


@pytest.fixture(scope="module")
def ckpt_b8(tmp_path_factory) -> str:
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    return make_random_sdar_checkpoint(tmp_path_factory.mktemp("tiny_sdar_b8_spiffy"), block_size=8, seed=2)


@pytest.fixture(scope="module")
def bundled_ckpt() -> str:
    import vllm_dllm_spec

    return vllm_dllm_spec.bundled_model_path()


@pytest.fixture(scope="module")
def graph_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    paths = {}
    for B in (4, 8):
        paths[B] = str(out / f"dag_b{B}.json")
        dag(B).to_json(paths[B])
    return paths


CASES = [  # (checkpoint fixture, graph budget, prefix caching); budget 4: TP=2 and the served engine
    ("tiny_ckpt", 2, True),
    ("ckpt_b8", 6, True),
    ("ckpt_b8", 3, False),
    ("bundled_ckpt", 5, True),  # the trained target: drafts are accepted often
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-N{c[1]}-pc{int(c[2])}")
def engine(request, graph_files):
    from vllm import LLM

    name, budget, prefix_caching = request.param
    path = request.getfixturevalue(name)
    model = SDARModel.from_pretrained(path)
    graph_path = graph_files[model.config.block_size]
    llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=32, block_size=32,
              enable_prefix_caching=prefix_caching, seed=0,
              additional_config={"dllm_spec": {"method": "spiffy", "draft_graph": graph_path,
                                               "graph_budget": budget}})
    yield name, model, budget, prefix_caching, llm
    shutdown_llm(llm)


def batch(vocab_size: int, B: int):
    """(prompts, per-request knobs, max_tokens, sampling) of the 16-request batch."""
    prompts, configs = prompts_for(vocab_size), request_configs(B)
    sampling = [(0.0, 0, 1.0, None)] * len(prompts) + SAMPLING
    return prompts * 2, configs * 2, MAX_TOKENS * 2, sampling


def run(llm, prompts, configs, max_tokens, sampling):
    from vllm import SamplingParams

    sps = [SamplingParams(max_tokens=m, temperature=t, top_k=k, top_p=p, seed=s, extra_args=c)
           for c, m, (t, k, p, s) in zip(configs, max_tokens, sampling)]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)


def test_batch_equals_oracle(engine):
    name, model, budget, prefix_caching, llm = engine
    B = model.config.block_size
    graph = dag(B)
    prompts, configs, max_tokens, sampling = batch(model.config.vocab_size, B)
    outputs = run(llm, prompts, configs, max_tokens, sampling)
    mismatches, forwards, plain_forwards = [], 0, 0
    for p, c, m, (t, k, tp, s), o in zip(prompts, configs, max_tokens, sampling, outputs):
        r = spiffy_generate(model, p, gen_length=m, graph=graph, graph_budget=budget, temperature=t, top_k=k,
                            top_p=tp, seed=s, **c)
        record = o.kv_transfer_params["dllm_spec"]
        got = (list(o.outputs[0].token_ids), record["step_map"], record["num_forwards"])
        if got != (r.tokens, r.step_map, r.num_forwards):
            mismatches.append((len(p), c, (t, k, tp, s), got, (r.tokens, r.step_map, r.num_forwards)))
        if t == 0.0 and name == "bundled_ckpt":
            forwards += r.num_forwards
            plain_forwards += generate(model, p, gen_length=m, fuse_commit=True, **c).num_forwards
    assert not mismatches, "\n".join(map(str, mismatches))
    assert forwards < plain_forwards or name != "bundled_ckpt"  # the trained target accepts drafts
    if prefix_caching:  # the same batch again, from the cache: still exact
        again = run(llm, prompts, configs, max_tokens, sampling)
        assert [list(o.outputs[0].token_ids) for o in again] == [list(o.outputs[0].token_ids) for o in outputs]


# ----------------------------------------------------------------------------------------------
# start-up errors, TP=2, the context limit, a served engine
# ----------------------------------------------------------------------------------------------
def test_bad_engine_knobs_are_startup_errors(tiny_ckpt, graph_files, tmp_path):
    from vllm import LLM

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"format": "vllm_dllm_spec.draft_graph", "version": 99}')
    for options, message in [
        ({"draft_graph": graph_files[8]}, "is for block_length 8"),
        ({"draft_graph": str(tmp_path / "missing.json")}, "cannot be read"),
        ({"draft_graph": str(bad_json)}, "unsupported version 99"),
        ({"draft_graph": "default"}, "draft_graph 'default': no graph ships for block_length 4"),
        ({"draft_graph": graph_files[4], "graph_budget": 0}, "graph_budget must be an integer >= 1"),
    ]:
        with pytest.raises(Exception, match=message):
            LLM(model=tiny_ckpt, dtype="float32", max_model_len=128, enforce_eager=True, block_size=32,
                additional_config={"dllm_spec": {"method": "spiffy", **options}})


@pytest.mark.slow
def test_tp2_equals_oracle(tiny_tied_ckpt, graph_files, monkeypatch):
    """TP=2: the copies' region attention runs on each rank's heads, the walk on every rank
    alike; tokens, step_map and forwards equal the oracle, greedy and seeded."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    import vllm.envs
    from vllm import LLM

    vllm.envs.disable_envs_cache()  # an earlier in-process engine froze vLLM's env reads
    llm = LLM(model=tiny_tied_ckpt, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=8,
              block_size=32, tensor_parallel_size=2, distributed_executor_backend="mp", seed=0,
              additional_config={"dllm_spec": {"method": "spiffy", "draft_graph": graph_files[4],
                                               "graph_budget": 4}})
    model = SDARModel.from_pretrained(tiny_tied_ckpt)
    prompts = [p for p in prompts_for(model.config.vocab_size, seed=7)[:4]] * 2
    configs = request_configs(4)[:4] * 2
    sampling = [(0.0, 0, 1.0, None)] * 4 + SAMPLING[:4]
    try:
        outs = run(llm, prompts, configs, [14] * 8, sampling)
    finally:
        shutdown_llm(llm)
    for p, c, (t, k, tp, s), o in zip(prompts, configs, sampling, outs):
        r = spiffy_generate(model, p, gen_length=14, graph=dag(4), graph_budget=4, temperature=t, top_k=k, top_p=tp,
                            seed=s, **c)
        record = o.kv_transfer_params["dllm_spec"]
        assert (list(o.outputs[0].token_ids), record["step_map"], record["num_forwards"]) == (
            r.tokens, r.step_map, r.num_forwards), (len(p), c, t)


def test_context_limit(tiny_ckpt, graph_files):
    """max_model_len 64, 3 copies of block 4 per step: a request holds at most 56 tokens; without
    max_tokens the output is cut there ("length") exactly like the oracle's; a prompt without
    room is refused and the engine keeps serving (with logprobs equal to the oracle's)."""
    from vllm import LLM
    from vllm.exceptions import VLLMValidationError

    room = max_total_tokens(64, 4, 3 * 4)
    llm = LLM(model=tiny_ckpt, dtype="float32", max_model_len=64, enforce_eager=True, block_size=32, seed=0,
              additional_config={"dllm_spec": {"method": "spiffy", "draft_graph": graph_files[4],
                                               "graph_budget": 3}})
    model = SDARModel.from_pretrained(tiny_ckpt)
    rng = random.Random(4)
    prompts = [[rng.randrange(2, 64) for _ in range(n)] for n in (30, 45, 52, 55)]
    try:
        outs = run(llm, prompts, [None] * 4, [None] * 4, [(0.0, 0, 1.0, None)] * 2 + SAMPLING[:2])
        for p, o, (t, k, tp, s) in zip(prompts, outs, [(0.0, 0, 1.0, None)] * 2 + SAMPLING[:2]):
            r = spiffy_generate(model, p, gen_length=room - len(p), graph=dag(4), graph_budget=3, temperature=t,
                                top_k=k, top_p=tp, seed=s)
            assert list(o.outputs[0].token_ids) == r.tokens and o.outputs[0].finish_reason == "length"
            assert o.kv_transfer_params["dllm_spec"]["num_forwards"] == r.num_forwards
        with pytest.raises(VLLMValidationError, match=rf"at most {room - 1} tokens"):
            run(llm, [[5] * room], [None], [None], [(0.0, 0, 1.0, None)])
        # still serving; sample logprobs (greedy and seeded) are the oracle's
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=9, temperature=0, logprobs=2),
                  SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=3, logprobs=3)]
        outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2, params, use_tqdm=False)
        for o, sp in zip(outs, params):
            want = spiffy_generate(model, [5, 6, 7], gen_length=sp.max_tokens, graph=dag(4), graph_budget=3,
                                   temperature=sp.temperature, top_k=sp.top_k, seed=sp.seed)
            check_offline(o.outputs[0], want, sp.logprobs)
    finally:
        shutdown_llm(llm)


def test_served_bad_knobs_are_400s_and_the_server_keeps_serving(tiny_ckpt, graph_files, tmp_path):
    openai = pytest.importorskip("openai")
    model = SDARModel.from_pretrained(tiny_ckpt)
    options = {"method": "spiffy", "draft_graph": graph_files[4], "graph_budget": 4}
    with VLLMServer(tiny_ckpt, tmp_path / "serve.log", options, max_model_len=256) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=120)

        def complete(max_tokens, temperature=0.0, seed=None, xargs=None):
            body = {"return_token_ids": True} | ({"vllm_xargs": xargs} if xargs else {})
            return client.completions.create(model="sdar", prompt=[5, 6, 7], max_tokens=max_tokens,
                                             temperature=temperature, seed=seed, extra_body=body)

        knobs = {"remasking_strategy": "sequential", "denoising_steps": 2}
        want = spiffy_generate(model, [5, 6, 7], gen_length=9, graph=dag(4), graph_budget=4, **knobs).tokens
        assert complete(9, xargs=knobs).choices[0].token_ids == want
        sampled = spiffy_generate(model, [5, 6, 7], gen_length=9, graph=dag(4), graph_budget=4, temperature=1.0,
                                  seed=3).tokens
        assert complete(9, temperature=1.0, seed=3).choices[0].token_ids == sampled
        for bad, message in [({"remasking_strategy": "nope"}, "remasking_strategy must be one of"),
                             ({"graph_budget": 2}, "graph_budget is chosen per engine"),
                             ({"draft_graph": "default"}, "draft_graph is chosen per engine"),
                             ({"block_length": 8}, "block_length must be the model's trained block size 4"),
                             ({"method": "psd"}, "this engine runs 'spiffy'")]:
            with pytest.raises(openai.BadRequestError, match=message):
                complete(4, xargs=bad)
        assert complete(9, xargs=knobs).choices[0].token_ids == want  # still serving, and exact
