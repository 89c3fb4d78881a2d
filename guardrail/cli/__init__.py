"""The ``guardrail`` command line: one module per command group, registered here.

Exit codes: 0 success; 1 a guardrail error (bad input, a missing or unreadable
file, model, generation); 2 usage error (bad arguments, no traceback);
3 a policy bundle failed verification (integrity or signature);
4 a policy bundle does not fit the model; 5 ``guardrail rollout report`` flagged a
canary whose intervention or refusal rate differs from stable beyond the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from guardrail.cli import calibrate, demo, evaluate, export, generate, policy, rollout, serve
from guardrail.cli.common import (
    EXIT_CANARY_FLAGGED,
    EXIT_COMPATIBILITY,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_OK,
    EXIT_USAGE,
    exit_code,
)
from guardrail.errors import GuardrailError

__all__ = [
    "EXIT_CANARY_FLAGGED",
    "EXIT_COMPATIBILITY",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "exit_code",
    "main",
]

COMMANDS = (calibrate, generate, policy, rollout, demo, evaluate, serve, export)
"""Every command group; each module has ``add_parser(subparsers)``."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="guardrail", description="MARS refusal steering for local multimodal LLMs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """Usage errors as JSON on stdout too when ``--json`` was asked for."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            _print_error("UsageError", f"{self.prog}: {message}", EXIT_USAGE)
        super().error(message)


def _print_error(kind: str, message: str, code: int) -> None:
    json.dump({"error": {"type": kind, "message": message, "exit_code": code}}, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        _silence_stdout()
        return EXIT_OK
    except (GuardrailError, OSError) as exc:
        code = exit_code(exc)
        print(f"error: {exc}", file=sys.stderr)
        if as_json:
            _print_error(type(exc).__name__, str(exc), code)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
