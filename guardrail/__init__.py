"""mars-guardrail: modality-agnostic refusal steering for local multimodal LLMs."""

__version__ = "0.1.0"
