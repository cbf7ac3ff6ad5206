"""The Spiffy calibration CLI (`tools.calibrate_graph`): the trace simulator is exact (its
forwards and copies equal `spiffy_generate`'s for any graph and budget), calibration is
deterministic, degree-1 graphs are connected, the shipped default graphs are for the bundled
target and reproduce their stored figures, and the CLI writes a graph `load_graph` reads."""
import json

import pytest

torch = pytest.importorskip("torch")

from vllm_dllm_spec import bundled_model_path  # noqa: E402
from vllm_dllm_spec.reference import SDARModel  # noqa: E402
from vllm_dllm_spec.reference.generate import block_params  # noqa: E402
from vllm_dllm_spec.reference.spiffy import DraftGraph, load_graph, spiffy_generate  # noqa: E402
from vllm_dllm_spec.tools import calibrate_graph as cg  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    return SDARModel.from_pretrained(bundled_model_path())


@pytest.fixture(scope="module")
def prompts():
    return cg.calibration_prompts(bundled_model_path(), 3)


@pytest.mark.parametrize("block_length,strategy", [(4, "low_confidence_dynamic"), (8, "low_confidence_dynamic"),
                                                   (8, "sequential"), (8, "entropy_bounded")])
def test_simulation_equals_spiffy_generate(bundled, prompts, block_length, strategy):
    params = block_params(bundled.config, block_length, None, strategy, 0.85, 0.35)
    traces = [cg.trace_prompt(bundled, p, gen_length=24, params=params, max_token_rank=3) for p in prompts]
    nodes = (((1, 1),), ((2, 1),), ((1, 1), (2, 1)), ((1, 2),), ((1, 1),), ((1, 1), (1, 2)), ((3, 1), (4, 3)),
             ((1, 1), (2, 1), (3, 1)), ((2, 2),))
    graph = DraftGraph(nodes, block_length)
    for budget in (1, 2, 4, 11):
        sim = cg.simulate(traces, graph.nodes, budget)
        outs = [spiffy_generate(bundled, p, gen_length=24, graph=graph, graph_budget=budget, block_length=block_length,
                                remasking_strategy=strategy) for p in prompts]
        assert sim["forwards"] == sum(o.num_forwards for o in outs)
        assert sim["block_copies"] == sum(o.num_state_evals for o in outs)
        assert sim["tokens"] == sum(len(o.tokens) for o in outs)


def test_calibration_is_deterministic_and_selectors_behave(prompts):
    kw = dict(block_length=8, budget=5, prompts=prompts, gen_length=24)
    a = cg.calibrate(bundled_model_path(), **kw)
    b = cg.calibrate(bundled_model_path(), **kw)
    assert a.to_dict() == b.to_dict()
    assert len(a.nodes) <= 4
    sim = a.meta["simulated"]
    # every node the greedy selector adds saves forwards on its own traces: never below plain
    for budget in sim["graph"]:
        assert sim["graph"][budget]["tokens_per_forward"] >= sim["plain"]["tokens_per_forward"]
    d1 = cg.calibrate(bundled_model_path(), selector="degree1", **kw)
    reached = {()}
    for q in d1.nodes:  # grown from the root: every node has a parent already in the graph
        assert any(p in reached for p in cg.parents(q))
        reached.add(q)


@pytest.mark.parametrize("block_length", [4, 8])
def test_shipped_default_graph_reproduces_its_figures(block_length):
    graph = load_graph("default", block_length)
    meta = graph.meta
    assert meta["model_sha256"] == cg.model_hash(bundled_model_path())
    assert meta["knobs"]["remasking_strategy"] == "low_confidence_dynamic"
    model = SDARModel.from_pretrained(bundled_model_path())
    params = block_params(model.config, block_length, None, "low_confidence_dynamic", 0.85, 0.35)
    prompts = cg.calibration_prompts(bundled_model_path(), meta["calibration"]["num_prompts"])
    traces = [cg.trace_prompt(model, p, gen_length=meta["calibration"]["gen_length"], params=params,
                              max_token_rank=meta["limits"]["max_token_rank"]) for p in prompts]
    for budget, stored in meta["simulated"]["graph"].items():
        again = cg.simulate(traces, graph.nodes, int(budget))
        assert again["tokens_per_forward"] == pytest.approx(stored["tokens_per_forward"], rel=1e-5)
        assert again["block_copies_per_token"] == pytest.approx(stored["block_copies_per_token"], rel=1e-5)


def test_cli_writes_a_loadable_graph(tmp_path, capsys):
    out = tmp_path / "g.json"
    cg.main(["--block-length", "4", "--budget", "3", "--prompts", "2", "--gen-length", "12", "--out", str(out)])
    graph = load_graph(str(out), 4)
    assert len(graph.nodes) <= 2 and graph.meta["calibration"]["num_prompts"] == 2
    assert json.loads(out.read_text())["version"] == 1
    assert "budget 3: graph" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--budget must be an integer >= 1"):
        cg.calibrate(bundled_model_path(), block_length=4, budget=0)
    with pytest.raises(ValueError, match="--prompts: only"):
        cg.calibration_prompts(bundled_model_path(), 1000)
