"""MARS refusal steering inside vLLM's engine (``GuardedLLM``, ``GuardedAsyncLLM``)."""

from vllm_mars_guardrail._compat import SUPPORTED_VLLM, check_vllm_version
from vllm_mars_guardrail.async_llm import GuardedAsyncLLM, GuardedStreamOutput
from vllm_mars_guardrail.base import Decision, GuardedOutput
from vllm_mars_guardrail.llm import GuardedLLM

__all__ = [
    "SUPPORTED_VLLM",
    "Decision",
    "GuardedAsyncLLM",
    "GuardedLLM",
    "GuardedOutput",
    "GuardedStreamOutput",
    "check_vllm_version",
]
