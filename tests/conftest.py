"""Shared fixtures: tiny random models of real architectures, built once per session."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from guardrail.testing import random_policy as _tiny_random_policy


@functools.cache
def tiny(arch: str, seed: int = 0) -> tuple[Any, Any]:
    from guardrail.testing import tiny_model

    return tiny_model(arch, seed=seed)


random_policy = _tiny_random_policy

# make test runs the suite on pytest-xdist workers, one test module per worker at a time
# (--dist loadfile --no-loadscope-reorder). The modules with the long real-weight
# measurements go first, so that no worker is left alone with one of them at the end.
LONG_MODULES = ("test_organism_guarded.py", "test_organism.py", "test_smollm2.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order inside each module is kept


@pytest.fixture(scope="session")
def tiny_llama() -> tuple[Any, Any]:
    return tiny("llama")
