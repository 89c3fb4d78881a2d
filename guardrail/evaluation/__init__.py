"""Evaluation: measuring a guardrail and comparing rollout arms.

- :mod:`.evaluate` - refusal rates of guarded and unguarded answers on prompt sets
  (``guardrail eval``), with the refusal judge;
- :mod:`.rollout_report` - per-arm rates from event logs (``guardrail rollout report``).
"""
