"""The exception hierarchy of the SDK.

Every error the SDK raises on purpose derives from :class:`GuardrailError`, so a
caller can catch one type. Messages name the problem, the offending value and
the fix.
"""

from __future__ import annotations


class GuardrailError(Exception):
    """Base class of every error raised by ``guardrail``."""


class InputError(GuardrailError, ValueError):
    """A request, message, image, video or data file is malformed or unsupported."""


class PolicyError(GuardrailError):
    """Base class of policy bundle problems."""


class PolicyIntegrityError(PolicyError):
    """A bundle is corrupt, tampered with, incomplete or holds invalid values."""


class BundleNotFoundError(PolicyError, FileNotFoundError):
    """A policy bundle path does not exist or is not a directory (nothing was verified)."""


class PolicyCompatibilityError(PolicyError):
    """A bundle was calibrated for a different model than the one it is attached to."""


class PolicySignatureError(PolicyIntegrityError):
    """A bundle is unsigned or its signature does not verify against the trust store."""


class UnsupportedModelError(GuardrailError, TypeError):
    """No architecture adapter knows how to handle a model."""


class SteeringError(GuardrailError, RuntimeError):
    """The steering hook could not be applied to a forward pass as planned."""


# Registries (guardrail.policy.registry, guardrail.policy.remote)


class RegistryError(PolicyError):
    """A registry cannot list, resolve, fetch or publish a policy bundle."""


class PolicyReferenceError(RegistryError, ValueError):
    """A policy reference such as ``name@^1.2`` is malformed."""


class PolicyNotFoundError(RegistryError, LookupError):
    """No bundle of that name, or no version matching the constraint."""


class RegistryUnavailableError(RegistryError):
    """A remote registry could not be reached (after retries) or missed the deadline."""


class PolicyDowngradeError(RegistryError):
    """A range or ``latest`` resolved below a version this registry served before."""


class InsecureRegistryError(RegistryError):
    """A plain-http registry was asked for a bundle without a trust store or opt-in."""
