"""SDAR block diffusion inside vLLM, offline.

    python examples/offline_block_diffusion.py [SDAR_DIR]

Without SDAR_DIR a tiny random SDAR checkpoint is written to a temp dir (the output is noise,
the mechanics are real). Prints each output with its forwards and step_map, then checks it
against the pure-PyTorch reference.
"""
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate

    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from vllm_dllm_spec.testing import make_random_sdar_checkpoint

        path = make_random_sdar_checkpoint(tempfile.mkdtemp(prefix="sdar_"), block_size=4)
    knobs = {"denoising_steps": 2, "remasking_strategy": "low_confidence_dynamic",
             "confidence_threshold": 0.85}
    llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True,
              additional_config={"dllm_spec": knobs})
    prompts = ["The quick brown fox", "def block_diffusion(model", "hello"]
    params = [SamplingParams(temperature=0, max_tokens=16),
              SamplingParams(temperature=0, max_tokens=16,
                             extra_args={"remasking_strategy": "sequential"}),  # per request
              SamplingParams(temperature=0, max_tokens=7)]
    outputs = llm.generate(prompts, params)
    ref = SDARModel.from_pretrained(path)
    for out, sp in zip(outputs, params):
        record = out.kv_transfer_params["dllm_spec"]
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
        print(f"   forwards={record['num_forwards']} step_map={record['step_map']} "
              f"tokens/forward={record['tokens_per_forward']}")
        r = generate(ref, out.prompt_token_ids, gen_length=sp.max_tokens, fuse_commit=True,
                     **{**knobs, **(sp.extra_args or {})})
        assert list(out.outputs[0].token_ids) == r.tokens and record["num_forwards"] == r.num_forwards
    print("all outputs equal the reference")


if __name__ == "__main__":
    main()
