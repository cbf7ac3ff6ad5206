"""Writes the README's "Performance" section from the benchmarks' JSON (no hand-typed figures).

    python benchmarks/report.py [--results benchmarks/results] [--readme README.md]

Replaces the text between `<!-- perf:start -->` and `<!-- perf:end -->` and copies the plots to
docs/perf/. A benchmark whose JSON is absent keeps its subsection from the README as it was (so
re-running one benchmark regenerates only its figures). Figures taken on a GPU machine are marked
as such; everything else says which CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def where(data: dict) -> str:
    m = data["machine"]
    kind = f"GPU figures: {m['gpu']}" if m.get("gpu") else f"CPU figures: {m['cpu']}, {m['cores']} cores"
    load = m.get("load_avg_at_start")
    return f"{kind}; run {data['created']}, preset `{data['preset']}`" + (
        f", load average at start {load[0]:.1f}" if load else "")


def phases_lines(data: dict, plot_rel: str | None) -> list[str]:
    rows = [r for r in data["results"] if "phases_ms_per_step" in r]
    if not rows:
        return []
    phases = list(rows[0]["phases_ms_per_step"])
    lines = ["", "Time per engine step by phase (ms, exclusive, one profiled run after the timed ones; "
             "`benchmarks/phases.py`):", "",
             "| block | batch | method | " + " | ".join(phases) + " | step |",
             "|---|---|---|" + "---|" * (len(phases) + 1)]
    for r in rows:
        values = r["phases_ms_per_step"]
        lines.append(f"| {r['block']} | {r['batch']} | {r['method']} | "
                     + " | ".join(f"{values[p]:.1f}" for p in phases) + f" | {sum(values.values()):.1f} |")
    if plot_rel:
        lines += ["", f"![time per step by phase]({plot_rel})"]
    return lines


def throughput_section(data: dict, plot_rel: str | None, phases_plot_rel: str | None = None) -> list[str]:
    reps = {r["batch"]: r["repetitions"] for r in data["results"] if "repetitions" in r}
    reps_text = ("; tokens/s is the median of the methods' interleaved runs ("
                 + ", ".join(f"{n} at batch {b}" for b, n in sorted(reps.items())) + ")") if reps else ""
    lines = ["### Offline throughput (`benchmarks/throughput.py`)", "",
             where(data) + f"; generation length {data['gen_length']}{reps_text}.", "",
             "| block | batch | method | tokens/s | tokens/forward | forwards/request | draft fwd/token | "
             "accepted/round | vs ar | vs dynamic | vs vllm_ar |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        accepted = r.get("accepted_per_round")
        lines.append(f"| {r['block']} | {r['batch']} | {r['method']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_forward']:.2f} | {r['mean_forwards_per_request']:.1f} | "
                     f"{r.get('draft_forwards_per_token', 0):.2f} | "
                     f"{'-' if accepted is None else f'{accepted:.2f}'} | "
                     f"{r['ratio_vs_ar']:.2f}x | {r['ratio_vs_dynamic']:.2f}x | "
                     f"{'-' if 'ratio_vs_vllm_ar' not in r else format(r['ratio_vs_vllm_ar'], '.2f') + 'x'} |")
    lines += ["", "tokens/forward counts target forwards; SimSD also pays the draft forwards "
              "(another, smaller model for `simsd`; the target itself for `simsd_self`). `vllm_ar` is the same "
              "weights served by vLLM itself as an autoregressive Qwen3 model (no plugin code): "
              "plugin `ar` against it is the plugin's own overhead."]
    if plot_rel:
        lines += ["", f"![throughput]({plot_rel})"]
    return lines + phases_lines(data, phases_plot_rel) + [""]


def reference_section(data: dict) -> list[str]:
    ref, vl = data["reference"], data["vllm"]
    return ["### Reference loop vs the plugin (`benchmarks/reference_vs_vllm.py`)", "", where(data) + ".", "",
            f"{data['num_prompts']} prompts, {data['gen_length']} tokens each, knobs {data['knobs']}: "
            f"reference loop {ref['tokens_per_s']:.0f} tokens/s ({ref['forwards_per_token']:.2f} forwards/token), "
            f"plugin in vLLM {vl['tokens_per_s']:.0f} tokens/s ({vl['forwards_per_token']:.2f} forwards/token): "
            f"**{data['throughput_ratio']:.1f}x**; identical outputs {data['identical_outputs']}/{data['num_prompts']}.", ""]


def simsd_section(data: dict) -> list[str]:
    lines = ["### SimSD on held-out prompts (`benchmarks/simsd_quality.py`)", "", where(data) + ".", "",
             f"{data['num_prompts']} held-out prompts, {data['gen_length']} tokens, policy {data['policy']} "
             "(the draft's for SimSD); oracle runs, equal to the vLLM path token for token.", "",
             "| method | target forwards/token | fewer target forwards | draft forwards/token | "
             "accepted/round | agreement with plain greedy (same position) | output before the first "
             "difference | identical outputs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in data["results"].items():
        accepted = r["accepted_per_round"]
        lines.append(f"| {name} | {r['target_forwards_per_token']:.3f} | {r['target_forward_reduction']:.2f}x | "
                     f"{r['draft_forwards_per_token']:.2f} | {'-' if accepted is None else f'{accepted:.2f}'} | "
                     f"{r['token_agreement']:.0%} | {r.get('matched_prefix', float('nan')):.0%} | "
                     f"{r['exact_outputs']:.0%} |")
    return lines + [""]


def psd_section(data: dict) -> list[str]:
    lines = ["### Lossless speculation, oracles: PSD and Spiffy (`benchmarks/psd_oracle.py`)", "", where(data) + ".", "",
             f"{data['num_prompts']} held-out prompts, {data['gen_length']} tokens, greedy; pure-PyTorch oracles "
             "(`reference.psd.psd_generate`, `reference.spiffy.spiffy_generate`; the vLLM methods equal them, "
             "their tokens/s are in the throughput table). Copies = block copies per verification forward (PSD's "
             "draft depth, Spiffy's graph_budget); Spiffy's graphs were calibrated on other prompts. Lossless: "
             "every output equals plain block diffusion's, step_map included. Pareto plot: "
             "`benchmarks/results/psd_oracle_pareto.png`.", "",
             "| B | strategy | method | copies | tokens/forward | vs plain | block copies/token | "
             "accepted steps/verification | identical to plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        acc = r["accepted_per_verification"]
        lines.append(f"| {r.get('block_length', '-')} | {r['strategy']} | {r['method']} | {r['draft_depth'] or '-'} | "
                     f"{r['tokens_per_forward']:.2f} | {r['forward_reduction']:.2f}x | {r['block_copies_per_token']:.2f} | "
                     f"{'-' if acc is None else f'{acc:.2f}'} | {r['identical_to_plain']:.0%} |")
    for b in data.get("bars", []):
        lines.append(f"\nSpiffy bar, B={b['block_length']} at {b['copies']} copies: {b['spiffy_tpf']:.3f} tokens/forward "
                     f"vs PSD {b['psd_tpf']:.3f} ({b['ratio']:.3f}x), copies/token {b['spiffy_copies_per_token']:.3f} "
                     f"vs {b['psd_copies_per_token']:.3f}: {'met' if b['met'] else 'missed'}.")
    return lines + [""]


def quality_section(data: dict) -> list[str]:
    lines = ["### Quality against the true continuation (`benchmarks/quality.py`)", "", where(data) + ".", "",
             f"{data['num_prompts']} held-out prompts, {data['gen_length']} tokens, greedy; oracle runs (equal to the "
             "vLLM path token for token). Edit similarity of the decoded text to the file's real continuation, "
             "exact match of the first line, distinct token 4-grams per output (the truth's: "
             f"{data['truth_distinct_4grams']:.2f}). `compareN:` rows are other target checkpoints "
             f"({', '.join(f'`{c}`' for c in data['compare']) or 'none'}) in the same run.", "",
             "| method | edit similarity | vs dynamic@0.85 | first line exact | distinct 4-grams | "
             "tokens / target forward |",
             "|---|---|---|---|---|---|"]
    for name, r in data["results"].items():
        lines.append(f"| {name} | {r['edit_similarity']:.3f} | {r['similarity_vs_dynamic@0.85']:.2f}x | "
                     f"{r['first_line_exact']:.0%} | {r['distinct_4grams']:.2f} | {r['tokens_per_forward']:.2f} |")
    return lines + [""]


def serve_section(data: dict) -> list[str]:
    lines = ["### Serving (`benchmarks/serve.py`)", "", where(data) + f"; generation length {data['gen_length']}; "
             f"load generator: {data.get('load_generator', 'the benchmark own client')}.", "",
             "| rate (req/s) | method | tokens/s | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) | TPOT p50 (ms) |",
             "|---|---|---|---|---|---|"]

    def ms(*values):
        return " / ".join("-" if v is None else f"{v * 1000:.0f}" for v in values)

    for r in data["results"]:
        lines.append(f"| {r['rate']:g} | {r['method']} | {r['tokens_per_s']:.0f} | "
                     f"{ms(r['ttft_p50'], r['ttft_p90'], r['ttft_p99'])} | {ms(r['itl_p50'], r['itl_p90'], r['itl_p99'])} | {ms(r.get('tpot_p50'))} |")
    return lines + [""]


def previous_subsections(section: str) -> dict[str, str]:
    """The README's current Performance subsections by benchmark name (`benchmarks/<name>.py` in
    their heading)."""
    found = {}
    for chunk in section.split("\n### ")[1:]:
        heading = chunk.split("\n", 1)[0]
        if "`benchmarks/" in heading:
            name = heading.split("`benchmarks/", 1)[1].split(".py", 1)[0]
            found[name] = "### " + chunk.rstrip() + "\n"
    return found


def render(results: Path, docs: Path, previous: dict[str, str] | None = None) -> str:
    previous = previous or {}
    out = ["## Performance", "",
           "Generated by `python benchmarks/report.py` from the JSON the benchmarks write; ratios are "
           "measured side by side in one run. This CPU machine is shared and noisy: read the ratios, "
           "not the absolute times.", ""]
    found = False
    path = results / "throughput.json"
    if path.is_file():
        found = True
        rels = []
        for plot in (path.with_suffix(".png"), path.with_name("throughput_phases.png")):
            rel = None
            if plot.is_file():
                docs.mkdir(parents=True, exist_ok=True)
                shutil.copy(plot, docs / plot.name)
                rel = str((docs / plot.name).relative_to(ROOT))
            rels.append(rel)
        out += throughput_section(json.loads(path.read_text()), *rels)
    elif "throughput" in previous:
        found = True
        out += previous["throughput"].splitlines() + [""]
    for name, section in (("reference_vs_vllm", reference_section), ("quality", quality_section),
                          ("simsd_quality", simsd_section), ("psd_oracle", psd_section), ("serve", serve_section)):
        path = results / f"{name}.json"
        if path.is_file():
            found = True
            out += section(json.loads(path.read_text()))
        elif name in previous:
            found = True
            out += previous[name].splitlines() + [""]
    if not found:
        out.append("No benchmark results yet: run the benchmarks, then this script.")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "perf"))
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    previous = previous_subsections(text.split(START, 1)[1].split(END, 1)[0]) if START in text and END in text else {}
    section = render(Path(args.results), Path(args.docs), previous)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + START + "\n" + section + END + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{START}\n{section}{END}\n"
    readme.write_text(text)
    print(f"SUMMARY report: wrote the Performance section of {readme}")


if __name__ == "__main__":
    main()
