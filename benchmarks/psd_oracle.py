"""The lossless speculative oracles against plain greedy block diffusion on held-out prompts, one
run: PSD-style self-speculation (`reference.psd.psd_generate`, draft depth D = block copies per
verification) and Spiffy over a calibrated draft graph (`reference.spiffy.spiffy_generate`,
graph_budget = block copies per verification). Per row: tokens per forward, block copies
evaluated per token (the verification's extra work), steps accepted per verification, and a
check that every output is identical to plain decoding (the methods are lossless). A PNG
Pareto plot (tokens/forward against copies/token) lies next to the JSON.

    python benchmarks/psd_oracle.py [--preset smoke|default] [--model DIR] [--out FILE.json]

Spiffy's graphs: the `draft_graph_b{B}.json` next to the model's weights when it was calibrated
for the panel's knobs (the bundled target ships dynamic 0.85 at B 4 and 8; for another model, put
`tools.calibrate_graph` outputs there), else calibrated here (`tools.calibrate_graph.calibrate`,
same code as the CLI) on the held-out windows AFTER the ones measured here: calibration and
measurement never share a prompt.
Oracle runs (pure PyTorch, one prompt at a time): forward counts are the methods', not a
throughput (the vLLM methods equal these oracles; tokens/s: benchmarks/throughput.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRESETS = {
    "smoke": dict(num_prompts=2, gen_length=12, panels=[(4, "low_confidence_dynamic")], depths=[1, 3],
                  budgets=[2, 3]),
    "default": dict(num_prompts=16, gen_length=64, depths=list(range(2, 9)), budgets=list(range(2, 9)),
                    panels=[(4, "low_confidence_dynamic"), (8, "low_confidence_dynamic"),
                            (8, "low_confidence_static")]),
}
# the issue's bars: (block length, copies, TPF ratio to PSD at equal copies, absolute TPF, copies/token <= PSD's)
BARS = [(8, 4, 1.06, None, True), (8, 6, 1.10, 1.62, False), (4, 6, None, 1.46, False)]


def graph_for(model_dir: str, config, block_length: int, strategy: str, prompts: list, gen_length: int):
    """The graph next to the model's weights (`draft_graph_b{B}.json`, e.g. the bundled target's
    defaults or a `tools.calibrate_graph` output put there) when it was calibrated for this run's
    knobs; else one calibrated here on `prompts`."""
    from dataclasses import asdict

    from vllm_dllm_spec.reference.generate import block_params
    from vllm_dllm_spec.reference.spiffy import default_graph_path, load_graph
    from vllm_dllm_spec.tools.calibrate_graph import calibrate

    budget = 8
    knobs = asdict(block_params(config, block_length, None, strategy, 0.85, 0.35))
    path = default_graph_path(block_length, model_dir)
    if path.is_file():
        graph = load_graph(str(path), block_length)
        if graph.meta.get("knobs") == knobs:  # a graph for other knobs would measure the wrong thing
            return graph, f"{path.name} next to the weights ({graph.meta.get('calibration', {}).get('prompts')})"
    return calibrate(model_dir, block_length=block_length, remasking_strategy=strategy, budget=budget,
                     prompts=prompts, gen_length=gen_length), f"calibrated on {len(prompts)} other prompts"


def pareto_plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return

    panels = sorted({(r["block_length"], r["strategy"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (B, strategy) in zip(axes[0], panels):
        for method, style in (("plain", "ks"), ("psd", "o-"), ("spiffy", "^-")):
            pts = [r for r in rows if (r["block_length"], r["strategy"], r["method"]) == (B, strategy, method)]
            if not pts:
                continue
            ax.plot([r["block_copies_per_token"] for r in pts], [r["tokens_per_forward"] for r in pts], style,
                    label=method)
            for r in pts:
                if r["draft_depth"]:
                    ax.annotate(str(r["draft_depth"]), (r["block_copies_per_token"], r["tokens_per_forward"]),
                                fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(title=f"B={B}, {strategy}", xlabel="block copies / token", ylabel="tokens / forward")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Lossless oracles: forwards saved vs copies spent (labels: copies per verification)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars(rows: list[dict]) -> list[dict]:
    out = []
    for B, copies, ratio, absolute, fewer_copies in BARS:
        def row(method):
            return next((r for r in rows if r["block_length"] == B and r["method"] == method
                         and r["draft_depth"] == copies and r["strategy"] == "low_confidence_dynamic"), None)

        spiffy, psd = row("spiffy"), row("psd")
        if spiffy is None or psd is None:
            continue
        got = spiffy["tokens_per_forward"] / psd["tokens_per_forward"]
        met = ((ratio is None or got >= ratio) and (absolute is None or spiffy["tokens_per_forward"] >= absolute)
               and (not fewer_copies or spiffy["block_copies_per_token"] <= psd["block_copies_per_token"]))
        out.append({"block_length": B, "copies": copies, "spiffy_tpf": spiffy["tokens_per_forward"],
                    "psd_tpf": psd["tokens_per_forward"], "ratio": got, "ratio_bar": ratio, "tpf_bar": absolute,
                    "spiffy_copies_per_token": spiffy["block_copies_per_token"],
                    "psd_copies_per_token": psd["block_copies_per_token"], "copies_bar": fewer_copies, "met": met})
    return out


def main(argv=None) -> list[dict]:
    args = common.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    import torch
    from tqdm import tqdm

    from vllm_dllm_spec.reference import SDARModel, generate
    from vllm_dllm_spec.reference.psd import psd_generate
    from vllm_dllm_spec.reference.spiffy import spiffy_generate

    torch.set_num_threads(1)  # tiny matrices, one prompt at a time: one thread is fastest
    model_dir = args.model or common.default_model()
    model = SDARModel.from_pretrained(model_dir)
    n_prompts, n = preset["num_prompts"], preset["gen_length"]
    both = common.prompts(model_dir, 2 * n_prompts)
    prompts, calibration = both[:n_prompts], both[n_prompts:]  # disjoint when enough windows exist
    rows, graphs = [], {}
    work = [(B, s, m, k) for B, s in preset["panels"]
            for m, ks in (("plain", [0]), ("psd", preset["depths"]), ("spiffy", preset["budgets"])) for k in ks]
    plain = {}
    for B, strategy, method, knob in tqdm(work, desc="psd_oracle", unit="config"):
        knobs = dict(gen_length=n, block_length=B, remasking_strategy=strategy)
        if method == "plain":
            outs = plain[B, strategy] = [generate(model, p, fuse_commit=True, **knobs) for p in prompts]
        elif method == "psd":
            outs = [psd_generate(model, p, draft_depth=knob, **knobs) for p in prompts]
        else:
            if (B, strategy) not in graphs:
                graphs[B, strategy] = graph_for(model_dir, model.config, B, strategy, calibration, n)
            graph = graphs[B, strategy][0]
            outs = [spiffy_generate(model, p, graph=graph, graph_budget=knob, **knobs) for p in prompts]
        tokens = sum(len(o.tokens) for o in outs)
        forwards = sum(o.num_forwards for o in outs)
        evals = forwards if method == "plain" else sum(o.num_state_evals for o in outs)
        acc = [a for o in outs for a in getattr(o, "accepted_per_verification", [])]
        rows.append({
            "block_length": B, "strategy": strategy, "method": method, "draft_depth": knob,
            "tokens_per_forward": tokens / forwards,
            "block_copies_per_token": evals / tokens,
            "accepted_per_verification": sum(acc) / len(acc) if acc else None,
            "identical_to_plain": sum(o.tokens == q.tokens and o.step_map == q.step_map
                                      for o, q in zip(outs, plain[B, strategy])) / len(outs),
        })
    for r in rows:
        base = next(b for b in rows if (b["block_length"], b["strategy"], b["method"])
                    == (r["block_length"], r["strategy"], "plain"))
        r["forward_reduction"] = r["tokens_per_forward"] / base["tokens_per_forward"]
    met = bars(rows)
    graph_info = {f"B{B} {s}": {"source": src, "nodes": [list(map(list, q)) for q in g.nodes]}
                  for (B, s), (g, src) in graphs.items()}
    path = common.write_json("psd_oracle", {"preset": args.preset, "model": model_dir, "num_prompts": len(prompts),
                                            "gen_length": n, "graphs": graph_info, "bars": met,
                                            "results": rows}, args.out)
    plot = path.with_name(path.stem + "_pareto.png")
    pareto_plot(rows, plot)
    best = {}
    for r in rows:
        key = (r["block_length"], r["strategy"], r["method"])
        if r["method"] != "plain" and (key not in best or r["tokens_per_forward"] > best[key]["tokens_per_forward"]):
            best[key] = r
    print("SUMMARY psd_oracle " + ", ".join(
        f"B{B} {s} {m}: {r['tokens_per_forward']:.2f} tok/fwd at {r['draft_depth']} copies "
        f"({r['forward_reduction']:.2f}x plain)" for (B, s, m), r in best.items())
        + "".join(f"; bar B{b['block_length']}@{b['copies']}: spiffy {b['spiffy_tpf']:.3f} vs psd {b['psd_tpf']:.3f} "
                  f"({b['ratio']:.3f}x), copies/token {b['spiffy_copies_per_token']:.3f} vs "
                  f"{b['psd_copies_per_token']:.3f}: {'met' if b['met'] else 'MISSED'}" for b in met)
        + f"; identical to plain {min(r['identical_to_plain'] for r in rows):.0%}; json={path}; plot={plot}")
    return rows


if __name__ == "__main__":
    main()
