"""Scale-out on Ray Serve: the same FastAPI app on N replicas, one rollout for all of them.

Needs the ``ray`` extra (``pip install 'mars-guardrail[ray]'``). Each replica is a Ray
Serve deployment replica that builds its own model, :class:`~guardrail.Guardrail` and
:class:`~guardrail.serve.engine.TransformersEngine` from a small picklable
:class:`RaySpec`, and serves :func:`~guardrail.serve.app.create_app`'s app behind
Serve's HTTP proxy::

    import ray
    from guardrail.serve.ray_app import RaySpec, deploy

    ray.init()
    spec = RaySpec.create("organism", policy="./bundle", admin_token=token)
    url = deploy(spec, num_replicas=4, port=8000)

or, without the CLI, ``serve run guardrail.serve.ray_app:app_builder model=organism
replicas=2`` (:func:`app_builder`), or ``guardrail serve --ray --replicas 4``.

Every response carries ``X-Guardrail-Replica`` (the replica that served it) and
``X-Guardrail-Rollout-Version`` (the version of the shared rollout it serves);
``GET /ready`` adds a ``replica`` object with the same and the replica's sync state.

**One rollout for every replica.** A named, detached Ray actor (the *rollout store*)
holds the current rollout entry and a version counter. An admin change that reaches
any replica is verified there first (``Guardrail.set_rollout``, as on a single
server: integrity, signature, fit to the model); only then is it written to the
store, with a compare-and-set on the version the replica had seen. Every replica
polls the store every ``poll_interval_s`` and applies a newer entry through its own
``set_rollout``. The consistency window: once the admin call has returned, every
healthy replica serves the change within ``poll_interval_s`` plus the time to load
the bundles (milliseconds); requests in flight finish under the rollout they
started with. Two admin changes racing on two replicas: the first write wins, the
second gets 409 and its replica goes back to the stored rollout.

**Failing closed.** A replica that cannot apply the stored rollout (a bundle path
missing on its node, a registry it cannot reach, a signature its trust store
rejects) does not go on serving the old one: it answers ``/ready`` and chat
completions with 503 naming the version and the reason, logs
``guardrail.ray.rollout_apply_failed``, and retries at every poll. A replica that
cannot reach the store keeps serving the version it applied and reports
``store_error`` in ``/ready``; admin changes on it are refused (503) since they
could not reach the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from guardrail.errors import GuardrailError, InputError
from guardrail.logs import get_logger

__all__ = [
    "REPLICA_HEADER",
    "ROLLOUT_VERSION_HEADER",
    "STORE_NAMESPACE",
    "GuardrailReplica",
    "RaySpec",
    "app_builder",
    "build_app",
    "deploy",
    "require_ray",
    "reset_rollout_store",
    "rollout_store",
]

REPLICA_HEADER = "x-guardrail-replica"
ROLLOUT_VERSION_HEADER = "x-guardrail-rollout-version"
STORE_NAMESPACE = "guardrail"
DEPLOYMENT_NAME = "GuardrailReplica"
READY_TIMEOUT_S = 300.0
STORE_TIMEOUT_S = 10.0
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def require_ray() -> None:
    """Raise :class:`GuardrailError` naming the extra when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise GuardrailError(
            f"scale-out on Ray Serve needs ray[serve] ({exc.name or exc} is not importable); "
            "install the extra: pip install 'mars-guardrail[ray]'"
        ) from None


# ----------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class RaySpec:
    """What each replica builds its model, guardrail and engine from (picklable).

    ``model`` is a name or path as :func:`guardrail.models.loading.load_model` takes it
    (``"organism"``, ``"tiny-llama"``, a checkpoint directory present on every node);
    ``policy`` a bundle directory or a registry reference; ``rollout`` the start-up
    rollout entry (see :meth:`create`); paths must exist on every node. Build it with
    :meth:`create`, which makes paths absolute and parses the rollout file.
    """

    model: str
    policy: str | None = None
    rollout: dict[str, Any] | None = None  # {"config": {...}, "base_dir": "/abs"}
    registry: str | None = None
    trust_store: str | None = None
    mode: str = "enforce"
    device: str | None = None
    dtype: str | None = None
    served_model_name: str | None = None
    max_new_tokens: int = 128
    max_tokens_limit: int = 1024
    request_timeout_s: float = 60.0
    allow_remote_images: bool = False
    max_batch_size: int = 8
    batch_window_s: float = 0.005
    max_queue: int = 64
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    poll_interval_s: float = 0.5
    store_name: str = "guardrail-rollout"

    @classmethod
    def create(
        cls,
        model: str,
        *,
        policy: str | os.PathLike[str] | None = None,
        rollout: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        registry: str | os.PathLike[str] | None = None,
        trust_store: str | os.PathLike[str] | None = None,
        **settings: Any,
    ) -> RaySpec:
        """A spec with absolute paths (replicas do not share the caller's working
        directory). ``rollout`` is a ``.json``/``.yaml`` file (relative bundle paths are
        relative to it, as for a single server) or a config mapping (relative to the
        current directory); it is parsed here, so a bad one fails before any replica
        starts. ``settings`` are the other fields."""
        from guardrail.policy.rollout import RolloutConfig, is_path_like

        entry: dict[str, Any] | None = None
        if rollout is not None:
            if isinstance(rollout, Mapping):
                config = RolloutConfig.parse(rollout)
                base = Path.cwd()
            else:
                config = RolloutConfig.from_file(rollout)
                base = Path(rollout).expanduser().resolve().parent
            entry = {"config": config.model_dump(mode="json"), "base_dir": str(base)}
        policy_text = None if policy is None else os.fspath(policy)
        if policy_text is not None and (is_path_like(policy_text) or Path(policy_text).is_dir()):
            policy_text = str(Path(policy_text).expanduser().resolve())
        model_text = os.fspath(model)
        if Path(model_text).is_dir():
            model_text = str(Path(model_text).resolve())
        return cls(
            model=model_text,
            policy=policy_text,
            rollout=entry,
            registry=_absolute(registry),
            trust_store=_absolute(trust_store),
            **settings,
        )


def _absolute(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


# ----------------------------------------------------------------------------- the store


class _RolloutStore:
    """The shared rollout: one entry, a version counter and an epoch (a Ray actor).

    An entry is ``{"config": <RolloutConfig as JSON> | None, "base_dir": str | None}``;
    version 0 holds ``None``: the deployment's start-up rollout. The epoch changes when
    the store is created again, so replicas never mistake a new, empty store for an
    order to go back to the start-up rollout.
    """

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.version = 0
        self.entry: dict[str, Any] | None = None

    def get(self) -> tuple[str, int, dict[str, Any] | None]:
        return self.epoch, self.version, self.entry

    def newer(self, epoch: str | None, version: int) -> tuple[str, int, Any] | None:
        if epoch == self.epoch and version == self.version:
            return None
        return self.epoch, self.version, self.entry

    def put(
        self, entry: dict[str, Any] | None, epoch: str | None, version: int
    ) -> tuple[bool, str, int, dict[str, Any] | None]:
        """Compare-and-set: written only when the caller had seen the current version."""
        if epoch != self.epoch or version != self.version:
            return False, self.epoch, self.version, self.entry
        self.version += 1
        self.entry = entry
        return True, self.epoch, self.version, self.entry


def rollout_store(name: str = "guardrail-rollout", *, create: bool = True) -> Any:
    """The rollout store's actor handle (created, detached, when missing and ``create``)."""
    import ray

    if not create:
        return ray.get_actor(name, namespace=STORE_NAMESPACE)
    actor = ray.remote(_RolloutStore).options(
        name=name,
        namespace=STORE_NAMESPACE,
        lifetime="detached",  # replicas come and go; the store must outlive each of them
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=1,
    )
    return actor.remote()


def reset_rollout_store(name: str = "guardrail-rollout") -> Any:
    """Replace the store with a fresh one (version 0: the start-up rollout). Called by
    :func:`deploy` and :func:`app_builder`, so a new deployment does not inherit the
    admin changes of an old one with the same name."""
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=STORE_NAMESPACE), no_restart=True)
    except ValueError:  # none yet
        pass
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get_actor(name, namespace=STORE_NAMESPACE)
        except ValueError:
            break
        if time.monotonic() > deadline:
            raise GuardrailError(f"the old rollout store {name!r} did not go away within 30 s")
        time.sleep(0.05)
    store = rollout_store(name)
    ray.get(store.get.remote(), timeout=60)
    return store


# ----------------------------------------------------------------------------- one replica's sync


def _entry_of(guard: Any) -> dict[str, Any]:
    rollout = guard.rollout
    if rollout is None:
        return {"config": None, "base_dir": None}
    base = rollout.base_dir if rollout.base_dir is not None else Path.cwd()
    return {"config": rollout.config.model_dump(mode="json"), "base_dir": str(base)}


class _Sync:
    """Keeps one replica's guardrail on the store's rollout (poll thread + admin hook)."""

    def __init__(self, guard: Any, spec: RaySpec, log: Any, replica: str, actor: str):
        self.guard = guard
        self.spec = spec
        self.log = log
        self.replica = replica
        self.actor = actor
        self.lock = threading.Lock()
        self.applied: tuple[str | None, int] = (None, -1)  # (epoch, version) serving now
        self.seen: tuple[str | None, int] = (None, -1)  # the newest the store showed us
        self.entry: dict[str, Any] | None = None
        self.error: str | None = None  # the stored rollout could not be applied here
        self.store_error: str | None = None  # the store cannot be reached
        self.stale_store: str | None = None  # the store was made again, empty
        self._store: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the store

    def store(self) -> Any:
        if self._store is None:
            self._store = rollout_store(self.spec.store_name)
        return self._store

    def _store_failed(self, exc: BaseException) -> None:
        message = (
            f"the rollout store {self.spec.store_name!r} cannot be reached "
            f"({type(exc).__name__}: {exc}); serving rollout version {self.applied[1]}"
        )
        if message != self.store_error:
            self.log.error("guardrail.ray.store_unreachable", error=message)
        self.store_error = message
        self._store = None  # look it up again next time

    # -- applying

    def _apply(self, entry: dict[str, Any] | None) -> None:
        """Verify and serve ``entry`` (None: the start-up rollout) through set_rollout."""
        from guardrail.policy.rollout import Rollout

        if entry is None:
            entry = self.spec.rollout or {"config": None, "base_dir": None}
        config = entry.get("config")
        if config is None:
            self.guard.set_rollout(None)
            return
        rollout = Rollout(
            config,
            self.guard.registry,
            trust_store=self.guard.trust_store,
            adapter=self.guard.adapter,
            base_dir=entry.get("base_dir"),
        )
        self.guard.set_rollout(rollout)  # the guardrail's own gate, as on one server

    def adopt(self, epoch: str, version: int, entry: dict[str, Any] | None) -> bool:
        """Apply the store's ``version`` (lock held). On failure the replica fails closed."""
        self.seen = (epoch, version)
        if self.applied[0] is not None and epoch != self.applied[0] and version == 0:
            # A new, empty store (its actor was lost and made again, or a redeploy):
            # keep serving what was applied rather than fall back to the start-up rollout.
            message = (
                f"the rollout store {self.spec.store_name!r} was created again and holds no "
                f"change; this replica keeps rollout version {self.applied[1]} of the old "
                "store; PUT /admin/rollout (or redeploy) to bring every replica onto one rollout"
            )
            if message != self.stale_store:
                self.log.error("guardrail.ray.store_replaced", error=message)
            self.stale_store = message
            return False
        try:
            self._apply(entry)
        except Exception as exc:
            message = f"cannot apply rollout version {version} from the rollout store: {exc}"
            if message != self.error:
                self.log.error("guardrail.ray.rollout_apply_failed", version=version, error=message)
            self.error = message
            return False
        self.applied, self.entry, self.error = (epoch, version), entry, None
        self.stale_store = None
        self.log.info(
            "guardrail.ray.rollout_applied", version=version, rollout=repr(self.guard.rollout)
        )
        return True

    def poll_locked(self) -> None:
        """One look at the store (lock held): apply a newer entry, or retry a failed one."""
        import ray

        since = self.seen if self.error is None else (self.seen[0], -1)
        try:
            got = ray.get(self.store().newer.remote(*since), timeout=STORE_TIMEOUT_S)
        except Exception as exc:
            self._store_failed(exc)
            return
        if self.store_error is not None:
            self.log.info("guardrail.ray.store_reachable")
            self.store_error = None
        if got is not None:
            self.adopt(*got)

    def first_sync(self) -> None:
        """At start-up: the store's rollout, or the start-up one when the store is out."""
        with self.lock:
            self.poll_locked()
            if self.applied[1] < 0 and self.error is None:
                try:
                    self._apply(None)
                except Exception as exc:
                    self.error = f"cannot apply the start-up rollout: {exc}"
                    self.log.error("guardrail.ray.rollout_apply_failed", error=self.error)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="guardrail-rollout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.wait(self.spec.poll_interval_s):
            try:
                with self.lock:
                    self.poll_locked()
            except Exception as exc:  # never let the thread die silently
                self.log.error("guardrail.ray.poll_failed", error=repr(exc))

    # -- an admin change on this replica

    async def publish(self) -> tuple[int, str | None]:
        """After a verified local change (lock held): write it to the store.

        Returns ``(status, message)``: 200 and None when written; 409 when another
        replica wrote first (this one goes back to the stored rollout); 503 when the
        store is out (the change is undone here)."""
        entry = _entry_of(self.guard)
        try:
            written, epoch, version, stored = await asyncio.wait_for(
                self.store().put.remote(entry, *self.seen), STORE_TIMEOUT_S
            )
        except Exception as exc:
            self._store_failed(exc)
            await asyncio.to_thread(self._undo)
            return 503, (
                f"the rollout store cannot be reached ({type(exc).__name__}), so the change "
                "could not reach the other replicas; it was undone on this one. Retry when "
                "GET /ready shows no store_error"
            )
        if written:
            self.seen = self.applied = (epoch, version)
            self.entry, self.error, self.stale_store = entry, None, None
            self.log.info("guardrail.ray.rollout_published", version=version)
            return 200, None
        await asyncio.to_thread(self.adopt, epoch, version, stored)
        return 409, (
            f"another replica changed the rollout first (now version {version}); this "
            "change was not applied. GET /admin/rollout and retry"
        )

    def _undo(self) -> None:
        try:
            self._apply(self.entry)
        except Exception as exc:
            self.error = f"cannot restore rollout version {self.applied[1]}: {exc}"
            self.log.error("guardrail.ray.rollout_apply_failed", error=self.error)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.replica,
            "actor": self.actor,
            "rollout_version": self.applied[1],
            "store_version": self.seen[1],
            "sync_error": self.error,
            "store_error": self.store_error or self.stale_store,
        }


# ----------------------------------------------------------------------------- HTTP around the app


class _ReplicaMiddleware:
    """Replica headers on every response; 503 for chat and /ready while the replica
    cannot serve the stored rollout; admin changes written through to the store."""

    def __init__(self, app: Any, sync: _Sync):
        self.app = app
        self.sync = sync

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (REPLICA_HEADER.encode(), self.sync.replica.encode("latin-1")),
            (ROLLOUT_VERSION_HEADER.encode(), str(self.sync.applied[1]).encode()),
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path.startswith("/admin/") and method in _MUTATING:
            await self._admin_change(scope, receive, send)
            return
        if self.sync.error is not None and (path == "/ready" or path.startswith("/v1/chat/")):
            await self._refuse(send)
            return
        if path == "/ready":
            await self._ready(scope, receive, send)
            return

        async def send_tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self._headers()]
            await send(message)

        await self.app(scope, receive, send_tagged)

    async def _respond(
        self,
        send: Any,
        status: int,
        body: dict[str, Any],
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        data = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *self._headers(),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _refuse(self, send: Any) -> None:
        from guardrail.serve.errors import error_body

        message = (
            f"this replica does not serve the current rollout: {self.sync.error}. It retries "
            f"every {self.sync.spec.poll_interval_s:g} s; retry the request (another replica "
            "may serve it) or fix the rollout through the admin API"
        )
        body = error_body(message, "service_unavailable", code="RolloutSyncError")
        body["replica"] = self.sync.describe()
        await self._respond(send, 503, body, ((b"retry-after", b"1"),))

    async def _buffered(self, scope: Any, receive: Any) -> tuple[int, list[Any], bytes]:
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def keep(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, keep)
        return int(start.get("status", 500)), list(start.get("headers", [])), b"".join(chunks)

    async def _ready(self, scope: Any, receive: Any, send: Any) -> None:
        status, headers, data = await self._buffered(scope, receive)
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if isinstance(body, dict):
            body["replica"] = self.sync.describe()
            data = json.dumps(body).encode()
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(data)).encode()), *self._headers()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _admin_change(self, scope: Any, receive: Any, send: Any) -> None:
        from guardrail.serve.errors import error_body

        sync = self.sync
        path, method = scope.get("path", ""), scope.get("method", "")
        acquiring = asyncio.ensure_future(asyncio.to_thread(sync.lock.acquire))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:  # release the lock once the thread has it
            acquiring.add_done_callback(lambda _: sync.lock.release())
            raise
        try:
            # Catch up first, so a change applies to the current rollout, not a stale one.
            await asyncio.to_thread(sync.poll_locked)
            if sync.store_error is not None:
                message = (
                    f"{sync.store_error}; an admin change now would reach this replica only, "
                    "so it is refused. Retry when GET /ready shows no store_error"
                )
                await self._respond(send, 503, error_body(message, "service_unavailable"))
                return
            if sync.error is not None and not (path == "/admin/rollout" and method == "PUT"):
                # An arm change would act on the rollout this replica still holds, not on
                # the stored one it failed to apply; a whole new rollout is the fix.
                message = (
                    f"this replica does not serve the current rollout ({sync.error}); PUT "
                    "/admin/rollout with a rollout every replica can load, or retry (another "
                    "replica may take the change)"
                )
                await self._respond(send, 503, error_body(message, "service_unavailable"))
                return
            status, headers, data = await self._buffered(scope, receive)
            if 200 <= status < 300:
                status_now, problem = await sync.publish()
                if problem is not None:
                    kind = "conflict_error" if status_now == 409 else "service_unavailable"
                    await self._respond(send, status_now, error_body(problem, kind))
                    return
            headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length",)] + [
                (b"content-length", str(len(data)).encode()),
                *self._headers(),
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": data})
        finally:
            sync.lock.release()


# ----------------------------------------------------------------------------- the deployment


class GuardrailReplica:
    """One Ray Serve replica: its own model, guardrail, engine and app (see the module).

    Ray Serve wraps it with ``serve.ingress()``; the app comes from
    ``__serve_build_asgi_app__``. Not meant to be built outside a Serve replica."""

    def __init__(self, spec: RaySpec):
        from ray import serve

        from guardrail.guardrail import Guardrail
        from guardrail.limits import InputLimits
        from guardrail.models.loading import load_model
        from guardrail.serve.app import ServeConfig, create_app
        from guardrail.serve.engine import TransformersEngine

        context = serve.get_replica_context()
        replica = context.replica_id.unique_id
        log = get_logger(component="serve.ray", replica=replica)
        registry = trust_store = None
        if spec.registry:
            from guardrail.policy.registry import PolicyRegistry

            registry = PolicyRegistry(spec.registry)
        if spec.trust_store:
            from guardrail.policy.signing import TrustStore

            trust_store = TrustStore.from_dir(spec.trust_store)
        model, processor = load_model(spec.model, device=spec.device, dtype=spec.dtype)
        guard = Guardrail(
            model,
            processor,
            spec.policy,
            mode=spec.mode,  # type: ignore[arg-type]
            trust_store=trust_store,
            registry=registry,
            max_new_tokens=spec.max_new_tokens,
            limits=InputLimits(allow_paths=False),
        )
        engine = TransformersEngine(
            guard,
            max_batch_size=spec.max_batch_size,
            batch_window_s=spec.batch_window_s,
            max_queue=spec.max_queue,
        )
        config = ServeConfig(
            model_name=spec.served_model_name or spec.model,
            max_new_tokens=spec.max_new_tokens,
            max_tokens_limit=spec.max_tokens_limit,
            request_timeout_s=spec.request_timeout_s,
            allow_remote_images=spec.allow_remote_images,
            admin_token=spec.admin_token,
        )
        self.sync = _Sync(guard, spec, log, replica, context.replica_id.to_full_id_str())
        app = create_app(engine, config, logger=log)
        _wrap_lifespan(app, self.sync, log)
        app.add_middleware(_ReplicaMiddleware, sync=self.sync)
        self._app = app

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose rollout poller died is replaced."""
        if not self.sync.alive():
            raise RuntimeError("the rollout poll thread stopped; the replica is replaced")

    def __del__(self) -> None:
        sync = getattr(self, "sync", None)
        if sync is not None:
            sync.stop()


def _wrap_lifespan(app: Any, sync: _Sync, log: Any) -> None:
    """Start-up: the store's rollout first, then the app's own start-up, then wait for its
    self-test, so Serve routes no request to a replica that cannot answer it."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> Any:
        await asyncio.to_thread(sync.first_sync)
        async with inner(application) as state:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not application.state.ready:
                if application.state.ready_error is not None:
                    raise GuardrailError(
                        f"the replica's self-test failed: {application.state.ready_error}"
                    )
                if time.monotonic() > deadline:
                    raise GuardrailError(
                        f"the replica's self-test did not pass within {READY_TIMEOUT_S:g} s"
                    )
                await asyncio.sleep(0.02)
            sync.start()
            log.info("guardrail.ray.replica_ready", **sync.describe())
            try:
                yield state
            finally:
                sync.stop()

    app.router.lifespan_context = lifespan


def build_app(
    spec: RaySpec,
    *,
    num_replicas: int | None = 1,
    autoscaling_config: Mapping[str, Any] | None = None,
    ray_actor_options: Mapping[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    **deployment_options: Any,
) -> Any:
    """The Ray Serve application (a bound deployment) for ``spec``.

    ``num_replicas`` fixed replicas, or ``autoscaling_config`` (Serve's own dict:
    ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...; then
    ``num_replicas`` is ignored). ``ray_actor_options`` default to one CPU per replica;
    ``max_ongoing_requests`` defaults to twice the batch size, so a replica holds one
    batch running and one forming. Further ``deployment_options`` go to
    ``serve.deployment``.
    """
    require_ray()
    from ray import serve

    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": dict(ray_actor_options or {"num_cpus": 1}),
        "max_ongoing_requests": max_ongoing_requests or 2 * spec.max_batch_size,
        **deployment_options,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        if num_replicas is None or num_replicas < 1:
            raise InputError("num_replicas must be at least 1 (or pass autoscaling_config)")
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(**options)(serve.ingress()(GuardrailReplica))
    return deployment.bind(spec)


def deploy(
    spec: RaySpec,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    app_name: str = "guardrail",
    route_prefix: str = "/",
    **build: Any,
) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (in the connected Ray cluster, or a
    local one) and deploy ``spec`` as ``app_name``; returns the URL once every replica
    passed its self-test. ``build`` goes to :func:`build_app`."""
    require_ray()
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init()
    spec = dataclasses.replace(spec, store_name=f"guardrail-rollout-{app_name}")
    serve.start(http_options={"host": host, "port": port})
    reset_rollout_store(spec.store_name)
    serve.run(build_app(spec, **build), name=app_name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run guardrail.serve.ray_app:app_builder key=value ...`` (and Serve
    config files): ``model`` (required), ``policy``, ``rollout`` (a file), ``registry``,
    ``trust_store``, ``mode``, ``replicas`` (default 1), ``num_cpus`` (per replica,
    default 1), ``max_new_tokens``, ``max_batch_size``, ``batch_window_ms``,
    ``max_queue``, ``served_model_name``, ``admin_token_file`` (else
    ``$GUARDRAIL_ADMIN_TOKEN``), ``poll_interval_s``, ``store_name``."""
    from guardrail.serve.admin import load_admin_token

    known = {
        "model", "policy", "rollout", "registry", "trust_store", "mode", "replicas",
        "num_cpus", "max_new_tokens", "max_batch_size", "batch_window_ms", "max_queue",
        "served_model_name", "admin_token_file", "poll_interval_s", "store_name",
    }  # fmt: skip
    unknown = sorted(set(args) - known)
    if unknown:
        raise InputError(
            f"unknown app_builder argument(s) {', '.join(unknown)}; use {', '.join(sorted(known))}"
        )
    if not args.get("model"):
        raise InputError("app_builder needs model=<name or checkpoint>, e.g. model=organism")

    def number(key: str, kind: Any, default: Any) -> Any:
        try:
            return kind(args[key]) if key in args else default
        except ValueError:
            raise InputError(f"app_builder argument {key}={args[key]!r} is not a number") from None

    policy = args.get("policy")
    if policy is None and args.get("rollout") is None and args.get("mode", "enforce") != "off":
        if args["model"] != "organism":
            raise InputError("app_builder needs policy=... or rollout=... (or mode=off)")
        from guardrail.models import organism

        policy = str(organism.POLICY_DIR)
    spec = RaySpec.create(
        args["model"],
        policy=policy,
        rollout=args.get("rollout"),
        registry=args.get("registry"),
        trust_store=args.get("trust_store"),
        mode=args.get("mode", "enforce"),
        served_model_name=args.get("served_model_name"),
        max_new_tokens=number("max_new_tokens", int, 128),
        max_batch_size=number("max_batch_size", int, 8),
        batch_window_s=number("batch_window_ms", float, 5.0) / 1000.0,
        max_queue=number("max_queue", int, 64),
        admin_token=load_admin_token(args.get("admin_token_file")),
        poll_interval_s=number("poll_interval_s", float, 0.5),
        store_name=args.get("store_name", "guardrail-rollout"),
    )
    import ray

    if ray.is_initialized():  # serve run connects first; a fresh store for this deploy
        reset_rollout_store(spec.store_name)
    return build_app(
        spec,
        num_replicas=number("replicas", int, 1),
        ray_actor_options={"num_cpus": number("num_cpus", float, 1.0)},
    )
