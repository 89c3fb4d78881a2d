"""Fixtures of the vLLM parity suite (run in the vLLM venv: ``make test-vllm``).

One compiled, guarded vLLM engine serves the whole module (building one takes about
two minutes on two cores, most of it inductor compiling the graph). Its compile cache
lives in a directory of this session, shared on purpose with a plain engine built
first (the cache hazard test). The references are the HF guardrail on the same
weights, in the same process, one request at a time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# vLLM reads these when it starts an engine; they must be set before that.
_CACHE = Path(tempfile.mkdtemp(prefix="mars-vllm-cache-"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(_CACHE))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the organism needs little
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from guardrail.models import organism  # noqa: E402
from guardrail.models.export import export_for_vllm  # noqa: E402
from guardrail.policy import PolicyBundle  # noqa: E402


@pytest.fixture(scope="session")
def cache_root() -> Path:
    return Path(os.environ["VLLM_CACHE_ROOT"])


@pytest.fixture(scope="session")
def plain_organism():
    """The organism without its image-position adapters: the model vLLM can hold."""
    return organism.load(image_adapters=False)


@pytest.fixture(scope="session")
def exported(plain_organism, tmp_path_factory) -> Path:
    model, processor = plain_organism
    return export_for_vllm(model, processor, tmp_path_factory.mktemp("vllm") / "organism")


@pytest.fixture(scope="session")
def policy() -> PolicyBundle:
    return PolicyBundle.from_pretrained(organism.POLICY_DIR)
