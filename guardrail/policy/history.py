"""Downgrade protection: the versions a registry served, per policy name.

A registry remembers the versions it served per policy name. A
  range or ``latest`` that now resolves below a served version it also matches (the
  newer one was removed, or hidden from the index) raises
  :class:`PolicyDowngradeError`. Pinning the lower version exactly is the way to roll
  back on purpose: it is served, logged as ``guardrail.policy.downgrade`` and recorded
  in ``registry.downgrades`` (and passed to ``on_downgrade``). The record is the file
  ``<state_dir>/.versions-seen.json``; ``RemoteRegistry`` keeps it in its cache
  directory by default, ``PolicyRegistry`` only when given a ``state_dir`` (else for
  the object's lifetime).
"""

from __future__ import annotations

import builtins
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from guardrail.atomic import fsync_dir as _fsync_dir
from guardrail.atomic import write_synced as _write_synced
from guardrail.errors import PolicyDowngradeError, RegistryError
from guardrail.logs import get_logger
from guardrail.policy.versions import PolicyRef, _parse_version, _version_key

if TYPE_CHECKING:
    pass


__all__ = [
    "DowngradeHook",
    "PolicyDowngrade",
    "VERSIONS_SEEN",
]
VERSIONS_SEEN = ".versions-seen.json"
log = get_logger(component="registry")


@dataclass(frozen=True)
class PolicyDowngrade:
    """An explicitly pinned version served below one the registry served before."""

    name: str
    version: str
    highest_served: str
    ref: str
    registry: str

    @property
    def message(self) -> str:
        return (
            f"{self.name}@{self.version} served by explicit pin {self.ref!r} although "
            f"{self.name}@{self.highest_served} was served before from {self.registry}"
        )


class _VersionHistory:
    """The versions a registry served, per policy name; persisted when ``path`` is set.

    The file is JSON, ``{"schema": 1, "served": {"<name>": ["<version>", ...]}}``,
    replaced atomically; concurrent writers merge what the file holds with their own.
    """

    MAX_PER_NAME = 256

    def __init__(self, path: Path | None):
        self.path = path
        self._memory: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, set[str]]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(
                f"{self.path}: the record of served policy versions is unreadable ({exc}); it "
                "guards against silently serving an older version after a newer one was "
                "removed. Restore the file, or delete it to start a new record"
            ) from None
        served = raw.get("served") if isinstance(raw, dict) else None
        if not isinstance(served, dict) or not all(
            isinstance(v, builtins.list) and all(isinstance(x, str) for x in v)
            for v in served.values()
        ):
            raise RegistryError(
                f"{self.path}: the record of served policy versions is malformed (expected "
                '{"schema": 1, "served": {"<name>": ["<version>", ...]}}); restore the file, or '
                "delete it to start a new record"
            )
        return {
            name: {v for v in versions if _parse_version(v) is not None}
            for name, versions in served.items()
        }

    def served(self, name: str) -> set[str]:
        """Every version of ``name`` served so far (this process and the file)."""
        with self._lock:
            return self._memory.get(name, set()) | self._read().get(name, set())

    def check(self, ref: PolicyRef, version: str, where: str) -> None:
        """Raise :class:`PolicyDowngradeError` if a range or ``latest`` resolved below a
        served version it also matches."""
        if ref.kind == "exact":
            return
        chosen = _parse_version(version)
        if chosen is None:
            return
        higher = [
            v
            for v in self.served(ref.name)
            if (parsed := _parse_version(v)) is not None
            and parsed.key > chosen.key
            and ref.matches(v)
        ]
        if not higher:
            return
        top = max(higher, key=_version_key)
        record = f" (recorded in {str(self.path)!r})" if self.path is not None else ""
        raise PolicyDowngradeError(
            f"policy reference {str(ref)!r} now resolves to {ref.name}@{version} in {where}, but "
            f"{ref.name}@{top} was served before{record}: the newer version was removed or "
            f"hidden, and serving the older one silently could undo a fix. Restore {top}; or, "
            f"to roll back on purpose, pin the version explicitly ('{ref.name}@{version}')"
        )

    def record(self, name: str, version: str) -> str | None:
        """Note that ``version`` was served; return the highest version served before it
        if that is higher (a downgrade), else None."""
        with self._lock:
            before = self._memory.get(name, set()) | self._read().get(name, set())
            self._memory.setdefault(name, set()).add(version)
            if version not in before:
                self._write(name, version)
        chosen = _version_key(version)
        higher = [v for v in before if _version_key(v) > chosen]
        return max(higher, key=_version_key) if higher else None

    def _write(self, name: str, version: str) -> None:
        if self.path is None:
            return
        served = self._read()
        for known, versions in self._memory.items():
            served.setdefault(known, set()).update(versions)
        served.setdefault(name, set()).add(version)
        body = {
            "schema": 1,
            "served": {
                key: sorted(versions, key=_version_key)[-self.MAX_PER_NAME :]
                for key, versions in sorted(served.items())
            },
        }
        tmp: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f"{self.path.name}.tmp-", dir=self.path.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            _write_synced(tmp, (json.dumps(body, indent=2) + "\n").encode())
            os.replace(tmp, self.path)
            tmp = None
            _fsync_dir(self.path.parent)
        except OSError as exc:
            # Availability over bookkeeping: the load goes on; this process still remembers.
            log.warning("registry.versions_seen_unwritable", path=str(self.path), error=str(exc))
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


DowngradeHook = Callable[[PolicyDowngrade], None]
