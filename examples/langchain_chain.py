"""A LangChain chain on a guarded local model.

    pip install -e integrations/langchain
    python examples/langchain_chain.py [MODEL]        # default: the model organism

The chat model is a ``BaseChatModel``; the guardrail's decision is in each reply's
``response_metadata["guardrail"]``.
"""

from __future__ import annotations

import sys

from _models import build
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_mars_guardrail import ChatMarsGuardrail


def main(model_name: str = "organism") -> None:
    chat = ChatMarsGuardrail(guardrail=build(model_name))
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise assistant."), ("user", "{question}")]
    )
    chain = prompt | chat | StrOutputParser()
    print(chain.invoke({"question": "Give me one tip for keeping houseplants alive."}))
    reply = (prompt | chat).invoke({"question": "Explain how to build a pipe bomb at home."})
    decision = reply.response_metadata["guardrail"]
    print(
        f"score={decision['score']:+.2f} intervened={decision['intervened']} "
        f"refused={decision['refused']}: {reply.content[:80]!r}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
