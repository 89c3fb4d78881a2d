"""mars-guardrail: modality-agnostic refusal steering for local multimodal LLMs.

The public surface::

    Guardrail, GuardrailResult        guarded generation
    PolicyBundle, SteeringParameters  versioned policy bundles
    calibrate, CalibrationTargets     building bundles from text-only prompt sets
    errors: GuardrailError, InputError, PolicyIntegrityError, PolicyCompatibilityError, ...

The package is layered (``docs/architecture.md``); imports point one way, down:
``cli`` -> ``evaluation`` -> ``calibration`` -> ``guardrail.py`` -> ``observability``
-> ``result`` -> ``policy`` -> ``adapters`` -> ``messages`` -> ``steering`` / ``models``
-> ``errors``.
"""

from guardrail._version import __version__
from guardrail.calibration import CalibrationTargets, calibrate
from guardrail.errors import (
    BundleNotFoundError,
    GuardrailError,
    InputError,
    InsecureRegistryError,
    PolicyCompatibilityError,
    PolicyDowngradeError,
    PolicyError,
    PolicyIntegrityError,
    PolicyNotFoundError,
    PolicySignatureError,
    RegistryError,
    RegistryUnavailableError,
    SteeringError,
    UnsupportedModelError,
)
from guardrail.guardrail import Guardrail
from guardrail.messages import InputLimits
from guardrail.policy import PolicyBundle, SteeringParameters
from guardrail.result import GuardrailResult, ShadowScore, Usage

__all__ = [
    "BundleNotFoundError",
    "CalibrationTargets",
    "Guardrail",
    "GuardrailError",
    "GuardrailResult",
    "InputError",
    "InputLimits",
    "InsecureRegistryError",
    "PolicyBundle",
    "PolicyCompatibilityError",
    "PolicyDowngradeError",
    "PolicyError",
    "PolicyIntegrityError",
    "PolicyNotFoundError",
    "PolicySignatureError",
    "RegistryError",
    "RegistryUnavailableError",
    "ShadowScore",
    "SteeringError",
    "SteeringParameters",
    "UnsupportedModelError",
    "Usage",
    "__version__",
    "calibrate",
]
