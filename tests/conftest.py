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


@pytest.fixture(scope="session")
def tiny_llama() -> tuple[Any, Any]:
    return tiny("llama")
