"""MARS refusal steering inside vLLM's engine (see ``GuardedLLM``)."""

from vllm_mars_guardrail._compat import SUPPORTED_VLLM, check_vllm_version
from vllm_mars_guardrail.llm import Decision, GuardedLLM, GuardedOutput

__all__ = ["SUPPORTED_VLLM", "Decision", "GuardedLLM", "GuardedOutput", "check_vllm_version"]
