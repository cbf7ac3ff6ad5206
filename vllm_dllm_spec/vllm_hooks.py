"""The one module that touches vLLM internals. Checks the vLLM version and fails loudly on a
mismatch (the internals it uses are not a public API).

What `install()` does (called by the plugin's `register()` in every vLLM process):
- `_CONFIG_REGISTRY["sdar"] = SDARConfig`, `["sdar_moe"] = SDARMoeConfig`: SDAR checkpoints
  (dense and MoE) load without trust_remote_code.
- `ModelRegistry.register_model(...)` for `SDARForCausalLM` and `SDARMoeForCausalLM` (lazy, by
  name).
- `MODELS_CONFIG_MAP[<each architecture>] = SDARConfigHook`: vLLM calls the hook from
  `VllmConfig.__post_init__`; it reads `additional_config["dllm_spec"]` (defaults when absent),
  resolves the checkpoint's block size and mask token id where config.json lacks them
  (`checkpoint.py` rules; the tokenizer through vLLM's `cached_get_tokenizer`) and writes them
  onto `hf_config`, validates the option against the model, and sets the scheduler, worker
  and speculative config.
- Wraps `InputProcessor._validate_prompt_len` (the front end's prompt-length check, offline and
  server alike): an SDAR engine also refuses a prompt that leaves no room for one step of its
  method (`methods.max_total_tokens`, stored by the hook under `ROOM_KEY`), with a clear
  message, so such a request never reaches the engine.
"""
from __future__ import annotations

import logging
import math

logger = logging.getLogger("vllm.vllm_dllm_spec.vllm_hooks")

SUPPORTED_VLLM = ("0.32.",)
ARCHITECTURE = "SDARForCausalLM"
MOE_ARCHITECTURE = "SDARMoeForCausalLM"
# architecture -> the plugin's vLLM model class (both run through the same config hook)
MODEL_CLASSES = {
    ARCHITECTURE: "vllm_dllm_spec.model:SDARForCausalLM",
    MOE_ARCHITECTURE: "vllm_dllm_spec.model:SDARMoeForCausalLM",
}
PROPOSER_CLS = "vllm_dllm_spec.denoise.BlockDiffusionProposer"
VALIDATOR_CLS = "vllm_dllm_spec.denoise:RequestKnobsValidator"
# additional_config key: most tokens (prompt + output) one request can reach in this engine
ROOM_KEY = "dllm_spec_max_total_tokens"
FIRST_STEP_KEY = "dllm_spec_first_step_tokens"  # MethodPlan.first_step_tokens, for the scheduler


def _check_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm_dllm_spec supports vLLM {SUPPORTED_VLLM}, found {version}: the "
            "internals it patches (MODELS_CONFIG_MAP, _CONFIG_REGISTRY, "
            "InputProcessor._validate_prompt_len, tokenizers.registry.cached_get_tokenizer) "
            "may have moved"
        )
    return version


def configure(vllm_config) -> None:
    """Applies the `dllm_spec` option (or its defaults) to a VllmConfig. Raises ValueError on a
    bad option, naming the parameter and its allowed values."""
    from vllm.config import SpeculativeConfig
    from vllm.platforms import current_platform

    from vllm_dllm_spec.config import DLLMSpecConfig
    from vllm_dllm_spec.methods import max_total_tokens

    model_config = vllm_config.model_config
    hf = model_config.hf_config
    additional = vllm_config.additional_config
    if additional is None:
        additional = {}
    if not isinstance(additional, dict):
        raise ValueError(f"additional_config must be a dict, got {type(additional).__name__}")
    options = additional.get("dllm_spec") or {}
    if not isinstance(options, dict):
        raise ValueError(f"additional_config['dllm_spec'] must be a dict, got {options!r}")
    cfg = DLLMSpecConfig.from_dict(options)
    # sample logprobs are computed by the plugin (logprobs.py) from the committing step's raw
    # logits; the other modes describe vLLM's sampler pipeline, which SDAR decoding bypasses
    mode = getattr(model_config, "logprobs_mode", "raw_logprobs")
    if mode != "raw_logprobs":
        raise ValueError(f"SDAR models report logprobs_mode 'raw_logprobs' only (the log-softmax of "
                         f"the logits each token was committed from), got {mode!r}")
    model_block = resolve_checkpoint_fields(model_config, cfg.block_length)
    params = cfg.denoise_params(model_block)
    if params.block_length != model_block:
        raise ValueError(
            f"dllm_spec.block_length must be the block size the model was trained with "
            f"({model_block}), got {params.block_length}"
        )
    # normalized, so every process (scheduler, workers) reads the same resolved knobs
    additional["dllm_spec"] = {
        "method": cfg.method,
        "block_length": params.block_length,
        "denoising_steps": params.denoising_steps,
        "remasking_strategy": params.remasking_strategy,
        "confidence_threshold": params.confidence_threshold,
        "eb_threshold": params.eb_threshold,
    }
    from vllm_dllm_spec.methods import get_method

    plan = get_method(cfg.method).plan(cfg, model_block, hf)
    additional["dllm_spec"].update(plan.options)
    scheduler_cls, num_spec = plan.scheduler_cls, plan.num_speculative_tokens
    room = max_total_tokens(model_config.max_model_len, model_block, num_spec)
    if room < 2:  # not even a 1-token prompt and 1 output token
        raise ValueError(
            f"max_model_len ({model_config.max_model_len}) is too small for method {cfg.method!r}: "
            f"one step feeds {num_spec} positions from an SDAR block start (block length "
            f"{model_block}); use max_model_len >= {num_spec + max(0, 2 - model_block)}")
    additional[ROOM_KEY] = room
    additional[FIRST_STEP_KEY] = num_spec if plan.first_step_tokens is None else plan.first_step_tokens
    vllm_config.additional_config = additional

    worker_cls = configure_platform(vllm_config, current_platform, plan, cfg.method, model_block)
    cache_block = vllm_config.cache_config.block_size
    if cache_block is not None and cache_block % model_block:
        raise ValueError(
            f"the KV cache block size ({cache_block}) must be a multiple of the SDAR block "
            f"length ({model_block})"
        )
    sched = vllm_config.scheduler_config
    # A running request feeds up to `num_spec` tokens from its in-progress block's start (block
    # diffusion: the block; SimSD: the verify region) plus the commit of what finished since (at
    # most as many again), and must never be cut there; a request finishing its prompt gets up to
    # `num_spec` slots on top of its prompt tokens.
    needed = 3 * num_spec * sched.max_num_seqs
    if sched.max_num_batched_tokens < needed:
        logger.info("dllm_spec: raising max_num_batched_tokens from %d to %d (3 * %d tokens per "
                    "step * max_num_seqs)", sched.max_num_batched_tokens, needed, num_spec)
        sched.max_num_batched_tokens = needed
    if sched.scheduler_cls is None or sched.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler":
        sched.scheduler_cls = scheduler_cls
    if vllm_config.parallel_config.worker_cls == "auto":
        vllm_config.parallel_config.worker_cls = worker_cls
    spec = vllm_config.speculative_config
    if spec is not None and not (spec.method == "custom_class" and spec.model == PROPOSER_CLS):
        raise ValueError(
            "SDAR models run block diffusion through vLLM's speculative-decoding slot; do not "
            "pass a speculative config (choose the method with additional_config['dllm_spec'])"
        )
    if spec is None:
        vllm_config.speculative_config = SpeculativeConfig(
            method="custom_class",
            model=PROPOSER_CLS,
            num_speculative_tokens=num_spec,
            target_model_config=model_config,
            target_parallel_config=vllm_config.parallel_config,
        )
    from vllm_dllm_spec.denoise import RequestKnobsValidator

    RequestKnobsValidator.context = (dict(additional["dllm_spec"]), model_block)
    procs = list(model_config.logits_processors or [])
    if VALIDATOR_CLS not in procs:
        model_config.logits_processors = procs + [VALIDATOR_CLS]


KERNEL_BLOCK = 16  # FA and Triton kernels take cache blocks in multiples of 16


def configure_platform(vllm_config, platform, plan, method: str, model_block: int) -> str:
    """The platform-specific part of the hook. Returns the worker class for `platform`.
    CPU: the CPU worker. CUDA: the GPU worker, FLASH_ATTN or TRITON_ATTN preferred over
    FlashInfer (`use_non_causal`), PIECEWISE CUDA graphs when the mode is unset (the block-causal
    builder supports no full graphs), and a cache block size that both a kernel (multiple of 16)
    and the SDAR block divide. Raises ValueError naming the setting for what cannot run."""
    if platform.is_cpu():
        return plan.worker_cls
    if not platform.is_cuda():
        raise NotImplementedError(
            f"vllm_dllm_spec: SDAR models run on the CPU and CUDA platforms, not on "
            f"{getattr(platform, 'device_name', platform)!r}")
    from vllm.config import CUDAGraphMode

    from vllm_dllm_spec.attention import SUPPORTED_BACKENDS

    gpu_backends = tuple(name for name in SUPPORTED_BACKENDS if name != "CPU_ATTN")
    if plan.gpu_worker_cls is None:
        raise ValueError(f"dllm_spec.method {method!r} has no GPU runner; run it on the CPU platform")
    attention = vllm_config.attention_config
    if attention.backend is not None and attention.backend.name not in gpu_backends:
        raise ValueError(
            f"attention backend {attention.backend.name} cannot run SDAR's block-causal attention; "
            f"use --attention-backend {' or '.join(gpu_backends)} (or leave it unset)")
    # the default order on sm_100 puts FlashInfer first unless the model is non-causal
    attention.use_non_causal = True
    parallel = vllm_config.parallel_config
    for knob in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, knob, 1) > 1:
            raise ValueError(f"{knob} must be 1 for SDAR models (block-causal attention splits "
                             f"requests; context parallelism is not supported), got {getattr(parallel, knob)}")
    compilation = vllm_config.compilation_config
    mode = compilation.cudagraph_mode
    if mode is None:
        if not vllm_config.model_config.enforce_eager:
            compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
            logger.info("dllm_spec: cudagraph_mode PIECEWISE (block-causal attention runs eagerly "
                        "between the captured pieces)")
    elif mode.has_full_cudagraphs():
        raise ValueError(
            f"cudagraph_mode {mode.name} is not supported for SDAR models: the block-causal "
            f"attention splits each step into a varying number of virtual requests, which a full "
            f"CUDA graph cannot replay; use PIECEWISE or NONE (or leave it unset)")
    cache = vllm_config.cache_config
    if not cache.user_specified_block_size and KERNEL_BLOCK % model_block:
        block = math.lcm(model_block, KERNEL_BLOCK)
        logger.info("dllm_spec: KV cache block size %d (a multiple of the SDAR block length %d "
                    "and of the kernels' 16)", block, model_block)
        cache.block_size = block
        cache.user_specified_block_size = True  # the platform must not pick another
    return plan.gpu_worker_cls


def resolve_checkpoint_fields(model_config, block_length_knob: int | None) -> int:
    """Resolves the SDAR block size and mask token id of a checkpoint that may not carry them
    (published SDAR configs need not: docs/CHECKPOINTS.md) and writes them onto `hf_config`, so
    every process and component (scheduler, runner, attention, proposer) reads the same values
    from the config it is given. Returns the block size. Idempotent: a second call finds both
    fields set and logs nothing."""
    from vllm_dllm_spec.checkpoint import resolve_block_size, resolve_mask_token_id

    hf = model_config.hf_config
    block = resolve_block_size(getattr(hf, "block_size", None), block_length_knob)
    if block.source == "default":
        logger.info("dllm_spec: config.json has no block_size and no dllm_spec.block_length was "
                    "given: using SDAR's default block size %d", block.value)
    mask_id = getattr(hf, "mask_token_id", None)
    tokenizer = None if mask_id is not None else _checkpoint_tokenizer(model_config)
    mask = resolve_mask_token_id(mask_id, tokenizer, int(hf.vocab_size))
    if mask_id is None:
        logger.info("dllm_spec: mask token id %d from the %s", mask.value, mask.source)
    hf.block_size, hf.mask_token_id = block.value, mask.value
    return block.value


def _checkpoint_tokenizer(model_config):
    """The engine's tokenizer (vLLM's cached instance, so the front end does not load it twice),
    or None when it cannot be loaded; loaded even with skip_tokenizer_init, since it is the
    only other place a checkpoint keeps its mask token."""
    from vllm.tokenizers.registry import cached_get_tokenizer

    try:
        return cached_get_tokenizer(
            model_config.tokenizer,
            runner_type=model_config.runner_type,
            tokenizer_mode=model_config.tokenizer_mode,
            revision=model_config.tokenizer_revision,
            trust_remote_code=model_config.trust_remote_code,
        )
    except Exception as err:  # the caller's error names both places; say why this one failed
        logger.warning("dllm_spec: could not load the tokenizer of %s to find its mask token: %s",
                       model_config.tokenizer, err)
        return None


def _refuse_prompts_without_room() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    vllm_check = InputProcessor._validate_prompt_len
    if getattr(vllm_check, "dllm_spec_wrapped", False):
        return

    def _validate_prompt_len(self, prompt_len: int, prompt_type):
        vllm_check(self, prompt_len, prompt_type)
        room = (self.vllm_config.additional_config or {}).get(ROOM_KEY)
        if room is not None and prompt_type == "decoder" and prompt_len >= room:
            method = self.vllm_config.additional_config["dllm_spec"]["method"]
            raise VLLMValidationError(
                f"The prompt (length {prompt_len}) leaves no room to generate with {method!r}: a "
                f"step feeds whole SDAR blocks (SimSD: its verify region) that must fit in "
                f"max_model_len ({self.model_config.max_model_len}), so a request holds at most "
                f"{room} tokens; use a prompt of at most {room - 1} tokens or a larger max_model_len",
                parameter="prompt", value=prompt_len)

    _validate_prompt_len.dllm_spec_wrapped = True
    InputProcessor._validate_prompt_len = _validate_prompt_len


def install() -> None:
    _check_version()
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from vllm_dllm_spec.hf_config import CONFIG_CLASSES

    class SDARConfigHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            configure(vllm_config)

    _CONFIG_REGISTRY.update(CONFIG_CLASSES)
    for architecture, model_cls in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, model_cls)
        MODELS_CONFIG_MAP[architecture] = SDARConfigHook
    _refuse_prompts_without_room()
