"""Checked by mypy in tests/test_typing.py (never executed): the public entry points'
return types follow their arguments."""

from typing import assert_type

from guardrail import Guardrail, GuardrailResult


async def check(guard: Guardrail) -> None:
    conversation = [{"role": "user", "content": "Hi"}]
    assert_type(guard.generate(conversation), GuardrailResult)
    assert_type(guard.generate("Hi"), GuardrailResult)
    assert_type(guard.generate({"role": "user", "content": "Hi"}), GuardrailResult)
    assert_type(guard.generate([conversation, conversation]), list[GuardrailResult])
    assert_type(await guard.agenerate(conversation), GuardrailResult)
    assert_type(await guard.agenerate([conversation]), list[GuardrailResult])
    assert_type(guard.score(conversation), float)
    assert_type(guard.score([conversation, "Hi"]), list[float])
