"""Rolling out a new policy version: a registry, a rollout file, promote and rollback.

    python examples/rollout.py [MODEL]        # default: tiny-llama (a smoke run)

Builds a throw-away registry with three versions of one policy (random statistics on
a tiny model here; your calibrated bundles in practice), serves ``rollout.yaml``
from it, and shows which arm and version served each user, then promotes the canary.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

from guardrail import Guardrail
from guardrail.models.loading import load_model
from guardrail.policy.registry import PolicyRegistry
from guardrail.testing import tiny_policy

HERE = Path(__file__).resolve().parent


def main(model_name: str = "tiny-llama") -> None:
    model, processor = load_model(model_name)
    registry = PolicyRegistry(tempfile.mkdtemp())
    for seed, version in enumerate(("1.0.0", "1.1.0", "2.0.0-rc.1")):
        bundle = tiny_policy(model, processor, name="mymodel", version=version, seed=seed)
        registry.publish(bundle)
    guard = Guardrail(
        model, processor, registry=registry, rollout=HERE / "rollout.yaml", max_new_tokens=4
    )
    served = Counter()
    for user in range(40):
        result = guard.generate("Hello there", key=f"user-{user}")
        served[result.rollout_arm, result.policy_version] += 1
        assert [s.policy_version for s in result.shadow] == ["2.0.0-rc.1"]
    print("served:", dict(served))
    guard.rollout.promote()  # the canary becomes stable: a pointer swap, no reload
    result = guard.generate("Hello there", key="user-1")
    print("after promote:", result.rollout_arm, result.policy_version)


if __name__ == "__main__":
    main(*sys.argv[1:])
