"""The one module that touches vLLM internals. Checks the vLLM version and fails loudly on a
mismatch (the internals it uses are not a public API)."""
from __future__ import annotations

SUPPORTED_VLLM = ("0.32.",)


def _check_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm_dllm_spec supports vLLM {SUPPORTED_VLLM}, found {version}: the internal "
            "registries it patches (MODELS_CONFIG_MAP, _CONFIG_REGISTRY) may have moved"
        )
    return version


def install() -> None:
    _check_version()
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from vllm_dllm_spec.hf_config import SDARConfig

    _CONFIG_REGISTRY["sdar"] = SDARConfig
