"""Evaluation: measuring a guardrail and comparing rollout arms.

- :mod:`.evaluate` - refusal rates of guarded and unguarded answers on prompt sets
  (``guardrail eval``), with the refusal judge;
- :mod:`.formats` - public benchmark files as distributed (``--format``);
- :mod:`.rendering` - prompts drawn as images and videos, with their instructions;
- :mod:`.templates` - layout and instruction families (``project``, ``calibration``,
  ``heldout``: the robustness test);
- :mod:`.report` - the rates with Wilson intervals: tables, JSON, HTML, a chart;
- :mod:`.defaults` - settings shared with the claims benchmark;
- :mod:`.rollout_report` - per-arm rates from event logs (``guardrail rollout report``).
"""
