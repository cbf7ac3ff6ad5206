"""The reference PyTorch loop (what a user of SDAR's own generate script gets: one prompt at a
time, a separate commit forward per block) against the plugin inside vLLM, same prompts and
settings, in one run.

    python benchmarks/reference_vs_vllm.py [--preset smoke|default] [--model DIR] [--out FILE.json]

Reports tokens/s of both, the ratio, forwards per token of both, and how many outputs are
identical token for token (greedy: all must be, the plugin fuses the commit but keeps tokens).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRESETS = {
    "smoke": dict(num_prompts=4, gen_length=16),
    "default": dict(num_prompts=32, gen_length=64),
}
KNOBS = {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.85}


def main(argv=None) -> dict:
    args = common.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    model_dir = args.model or common.default_model()
    prompts = common.prompts(model_dir, preset["num_prompts"])
    n = preset["gen_length"]

    model = SDARModel.from_pretrained(model_dir)
    ref_out = []
    start = time.perf_counter()
    for p in tqdm(prompts, desc="reference", unit="prompt"):
        ref_out.append(generate(model, p, gen_length=n, eos_token_id=-1, **KNOBS))
    ref_s = time.perf_counter() - start

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=len(prompts), seed=0, additional_config={"dllm_spec": KNOBS})
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    vllm_s = time.perf_counter() - start

    ref_tokens = sum(len(o.tokens) for o in ref_out)
    vllm_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    identical = sum(list(o.outputs[0].token_ids) == r.tokens for o, r in zip(outs, ref_out))
    vllm_forwards = sum(o.kv_transfer_params["dllm_spec"]["num_forwards"] for o in outs)
    figures = {
        "preset": args.preset, "model": model_dir, "knobs": KNOBS, "num_prompts": len(prompts),
        "gen_length": n,
        "reference": {"seconds": ref_s, "tokens_per_s": ref_tokens / ref_s,
                      "forwards_per_token": sum(o.num_forwards for o in ref_out) / ref_tokens},
        "vllm": {"seconds": vllm_s, "tokens_per_s": vllm_tokens / vllm_s,
                 "forwards_per_token": vllm_forwards / vllm_tokens},
        "identical_outputs": identical,
    }
    figures["throughput_ratio"] = figures["vllm"]["tokens_per_s"] / figures["reference"]["tokens_per_s"]
    path = common.write_json("reference_vs_vllm", figures, args.out)
    print(f"SUMMARY reference_vs_vllm prompts={len(prompts)} gen={n}: reference "
          f"{figures['reference']['tokens_per_s']:.0f} tok/s, vllm {figures['vllm']['tokens_per_s']:.0f} "
          f"tok/s, ratio {figures['throughput_ratio']:.2f}x, identical {identical}/{len(prompts)}; json={path}")
    return figures


if __name__ == "__main__":
    main()
