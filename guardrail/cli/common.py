"""What every command shares: exit codes, argument types, JSON output, model loading."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from guardrail.errors import PolicyCompatibilityError, PolicyIntegrityError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTEGRITY, EXIT_COMPATIBILITY = 0, 1, 2, 3, 4
EXIT_CANARY_FLAGGED = 5


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an error (see :mod:`guardrail.cli`)."""
    if isinstance(exc, PolicyCompatibilityError):
        return EXIT_COMPATIBILITY
    if isinstance(exc, PolicyIntegrityError):
        return EXIT_INTEGRITY
    return EXIT_ERROR


def csv_of(kind: type[Any], what: str) -> Any:
    """An argparse type: a comma-separated list of ``kind`` (a usage error otherwise)."""

    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            values = [kind(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, e.g. {'1,2,4' if kind is float else '8,12'}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what[:-1]}")
        return values

    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return value


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from guardrail.models.loading import load_model

    return load_model(
        args.model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None)
    )


def model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--dtype``."""
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory, or 'organism' / 'smollm2' / 'tiny-<arch>'",
    )
    p.add_argument("--device", default=None, help="torch device (default: CPU)")
    p.add_argument("--dtype", default=None, help="torch dtype name, e.g. bfloat16")
