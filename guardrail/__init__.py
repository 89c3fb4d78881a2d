"""mars-guardrail: modality-agnostic refusal steering for local multimodal LLMs.

The public surface::

    Guardrail, GuardrailResult        guarded generation
    PolicyBundle, SteeringParameters  versioned policy bundles
    calibrate, CalibrationTargets     building bundles from text-only prompt sets
    errors: GuardrailError, InputError, PolicyIntegrityError, PolicyCompatibilityError, ...
"""

from __future__ import annotations

__version__ = "0.1.0"

# Bound after the submodule import so that ``guardrail.calibrate`` is the function.
from guardrail.calibrate import CalibrationTargets, calibrate  # noqa: E402, I001
from guardrail.errors import (  # noqa: E402
    BundleNotFoundError,
    GuardrailError,
    InputError,
    PolicyCompatibilityError,
    PolicyError,
    PolicyIntegrityError,
    PolicySignatureError,
    SteeringError,
    UnsupportedModelError,
)
from guardrail.guardrail import Guardrail, GuardrailResult  # noqa: E402
from guardrail.policy import PolicyBundle, SteeringParameters  # noqa: E402

__all__ = [
    "BundleNotFoundError",
    "CalibrationTargets",
    "Guardrail",
    "GuardrailError",
    "GuardrailResult",
    "InputError",
    "PolicyBundle",
    "PolicyCompatibilityError",
    "PolicyError",
    "PolicyIntegrityError",
    "PolicySignatureError",
    "SteeringError",
    "SteeringParameters",
    "UnsupportedModelError",
    "__version__",
    "calibrate",
]
