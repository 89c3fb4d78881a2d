"""Policies: the bundle a calibration produces and everything that serves it.

- :mod:`.bundle` - :class:`PolicyBundle`, its manifest and on-disk format;
- :mod:`.plans` - a batch's bundles turned into per-layer steering plans (tensors);
- :mod:`.signing` - Ed25519 signatures and the trust store;
- :mod:`.registry` - local and remote registries of versioned bundles;
- :mod:`.rollout` - which bundle serves which request (stable, canary, shadow, kill switch).
"""

from guardrail.policy.bundle import (
    MANIFEST,
    MAX_KAPPA,
    SIGNATURE,
    TENSORS,
    Manifest,
    ModelFingerprint,
    PolicyBundle,
    SteeringParameters,
    parse_manifest,
)

__all__ = [
    "MANIFEST",
    "MAX_KAPPA",
    "SIGNATURE",
    "TENSORS",
    "Manifest",
    "ModelFingerprint",
    "PolicyBundle",
    "SteeringParameters",
    "parse_manifest",
]
