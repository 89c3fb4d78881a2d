"""``guardrail serve``: an OpenAI-compatible chat server with the guardrail in the loop.

Needs the ``serve`` extra (``pip install "mars-guardrail[serve]"``). The layers, top
down: :mod:`~guardrail.serve.app` (HTTP routes, errors, access logs, traces),
:mod:`~guardrail.serve.admin` (rollout changes behind a bearer token),
:mod:`~guardrail.serve.metrics` (Prometheus), :mod:`~guardrail.serve.engine` (the
:class:`ChatEngine` protocol and the micro-batching transformers engine),
:mod:`~guardrail.serve.batching`, :mod:`~guardrail.serve.streaming`,
:mod:`~guardrail.serve.schema` (the OpenAI wire format) and
:mod:`~guardrail.serve.errors`. Nothing else in the SDK imports this package.

    from guardrail.serve import ServeConfig, TransformersEngine, create_app
    app = create_app(TransformersEngine(guard), ServeConfig(model_name="organism"))
"""

from guardrail.serve.app import KEY_HEADER, ServeConfig, create_app
from guardrail.serve.engine import BatchRecord, ChatEngine, EngineRequest, TransformersEngine
from guardrail.serve.schema import GenerationSettings

__all__ = [
    "KEY_HEADER",
    "BatchRecord",
    "ChatEngine",
    "EngineRequest",
    "GenerationSettings",
    "ServeConfig",
    "TransformersEngine",
    "create_app",
]
