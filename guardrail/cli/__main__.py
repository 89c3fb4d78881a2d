"""``python -m guardrail.cli``: the same as the ``guardrail`` command."""

from guardrail.cli import main

raise SystemExit(main())
