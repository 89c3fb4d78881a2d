"""Settings shared by ``guardrail eval`` and the claims benchmark
(``benchmarks/paper_claims.py``), so that their numbers are measured alike."""

from __future__ import annotations

import os

__all__ = ["BATCH_SIZE", "MAX_NEW_TOKENS", "SPLIT", "default_threads"]

MAX_NEW_TOKENS = 16
"""Tokens generated per answer: enough for the refusal phrases, which the judge reads
in the first 160 characters, and for the first-token log-odds; greedy decoding."""

BATCH_SIZE = 8
"""Conversations per ``generate`` call."""

SPLIT = "test"
"""The split of the shipped sets that is measured (never the calibration splits)."""


def default_threads() -> int:
    """Torch CPU threads for an evaluation run: half the CPUs this process may use, at
    least one.

    Torch's own default (every core) is often slower on a shared or hyper-threaded
    machine: on a busy 2-core machine one thread was 3-6x faster than two. Pass
    ``--threads`` to choose.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)
