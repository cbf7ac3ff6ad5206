"""A bf16 SDAR checkpoint (bf16 safetensors, torch_dtype bfloat16) loads through vLLM's weight
loader and runs block diffusion in bf16 on the CPU kernel. bf16 is not bit-exact with the fp32
reference, so this checks the mechanics: lengths, forwards accounting, and that greedy output
agrees with the reference run in bf16 on most tokens."""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_dllm_spec.testing import shutdown_llm

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def test_bf16_checkpoint(tmp_path):
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.reference import SDARModel, generate
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    path = Path(make_random_sdar_checkpoint(tmp_path / "bf16", seed=3, tie_word_embeddings=True))
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg))

    llm = LLM(model=str(path), max_model_len=256, enforce_eager=True, max_num_seqs=4,
              block_size=32, seed=0)
    try:
        assert llm.llm_engine.model_config.dtype == torch.bfloat16
        prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
        knobs = {"remasking_strategy": "sequential"}
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                           extra_args=knobs), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    ref = SDARModel.from_pretrained(str(path), dtype=torch.bfloat16)
    agree = total = 0
    for p, o in zip(prompts, outs):
        got = list(o.outputs[0].token_ids)
        assert len(got) == 12
        record = o.kv_transfer_params["dllm_spec"]
        r = generate(ref, p, gen_length=12, fuse_commit=True, eos_token_id=-1, **knobs)
        # sequential with steps = B: the forward count depends on lengths only, not on values
        assert record["num_forwards"] == r.num_forwards
        agree += sum(a == b for a, b in zip(got, r.tokens))
        total += len(r.tokens)
    assert agree >= 0.75 * total
