"""Policy bundles: the versioned, verifiable artefact a guardrail runs on.

A bundle is a directory::

    manifest.json          pydantic Manifest: name, version, target model, layer,
                           parameters, calibration record, file hashes
    tensors.safetensors    u, mu_S, mu_H, p_S, g and one delta_<modality> per modality

:meth:`PolicyBundle.save_pretrained` writes atomically (a crash leaves the
previous bundle in place); :meth:`PolicyBundle.from_pretrained` reads each file
once into memory, checks its hash against the manifest, validates shapes and
values, and (given a model) checks the bundle was calibrated for that model.
The format is documented in ``policies/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from packaging.version import InvalidVersion, Version
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from guardrail.atomic import publish_dir, write_synced
from guardrail.errors import (
    BundleNotFoundError,
    InputError,
    PolicyCompatibilityError,
    PolicyIntegrityError,
)

if TYPE_CHECKING:
    from guardrail.adapters import ModelAdapter

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
SIGNATURE = "signature.json"  # optional, see guardrail.policy.signing
REQUIRED_TENSORS = ("u", "mu_S", "mu_H", "p_S", "g")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:[-+.][0-9A-Za-z.+-]+)?$")
PROBE_RTOL = 2e-2
MAX_KAPPA = 64.0
"""Upper bound of the trust-region radius ``kappa`` (in cluster gaps ``g``)."""


class ModelFingerprint(BaseModel):
    """Identity of the model a bundle was calibrated on."""

    model_config = ConfigDict(extra="forbid")

    architecture: str
    model_type: str
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    config_hash: str
    weight_probe: list[float] | None = None

    @classmethod
    def of(cls, adapter: ModelAdapter) -> ModelFingerprint:
        return cls(
            architecture=type(adapter.model).__name__,
            model_type=adapter.model_type,
            hidden_size=adapter.hidden_size,
            num_layers=adapter.num_layers,
            config_hash=adapter.config_hash(),
            weight_probe=adapter.weight_probe(),
        )


class SteeringParameters(BaseModel):
    """The gate and trust-region parameters of the MARS rule (see the method doc)."""

    model_config = ConfigDict(extra="forbid")

    tau: float = Field(0.5, description="gate: no steering below this score")
    lam: float = Field(1.0, ge=0, description="strength per unit of score above the gate")
    kappa: float = Field(
        1.0,
        ge=0,
        le=MAX_KAPPA,
        description=(
            "trust region radius in units of the gap g; at most MAX_KAPPA gaps, since a "
            "larger move takes the residual stream out of the model's range (garbled or "
            "empty text instead of a refusal)"
        ),
    )
    eta: float | None = Field(None, gt=0, description="optional bound a <= eta * |h|")
    recenter: Literal["full", "projection", "none"] = "full"
    apply_recentering_to_activation: bool | Literal["steered"] = Field(
        False,
        description=(
            "write the re-centred activation back: False scores with it only (h' = h + a u); "
            "'steered' writes h' = h_c + a u on the rows the gate opens and leaves the others "
            "untouched; True also writes h_c on rows below the gate"
        ),
    )
    score_positions: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "score the mean of the last k prompt positions (the chat template's tail) "
            "instead of t* alone; steering still acts at t* only. Fixed at calibration: "
            "the bundle's means are taken over the same positions"
        ),
    )

    tau_modalities: dict[Literal["image", "video"], float] = Field(
        default_factory=dict,
        description=(
            "per-modality gates: a row carrying media of one of these modalities is gated "
            "at that modality's value instead of tau (a row with several takes the lowest, "
            "the stricter guard); text-only rows and modalities not listed use tau"
        ),
    )

    @field_validator("tau", "lam", "kappa", "eta")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("tau_modalities")
    @classmethod
    def _finite_gates(cls, value: dict[str, float]) -> dict[str, float]:
        for modality, gate in value.items():
            if not math.isfinite(gate):
                raise ValueError(f"the {modality} gate must be a finite number")
        return value

    def gate(self, modalities: Iterable[str]) -> float:
        """The gate of a row with these input ``modalities`` (``tau`` for text only)."""
        table: dict[str, float] = {str(m): gate for m, gate in self.tau_modalities.items()}
        gates = [table.get(m, self.tau) for m in modalities if m != "text"]
        return min(gates) if gates else self.tau

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # score_positions and tau_modalities are written only when they are not the
        # default, so that bundles written before the options existed keep their
        # canonical bytes (digest, signature).
        data: dict[str, Any] = handler(self)
        if data.get("score_positions") == 1:
            del data["score_positions"]
        if not data.get("tau_modalities"):
            data.pop("tau_modalities", None)
        return data


class Manifest(BaseModel):
    """``manifest.json`` of a policy bundle."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    name: str
    version: str
    description: str = ""
    created: str = Field(default_factory=lambda: _now())
    model: ModelFingerprint
    layer: int = Field(ge=0)
    parameters: SteeringParameters = Field(default_factory=SteeringParameters)
    modalities: list[Literal["image", "video"]] = Field(default_factory=list)
    calibration: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    derived_from: dict[str, Any] | None = Field(
        None,
        description=(
            "for a version derived from another without recalibrating: the source's ref "
            "and digest, the parameters changed (old and new) and when"
        ),
    )
    digest: str | None = Field(
        None, description="sha256 of this manifest without the digest field; set on save"
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # derived_from is written only when set, so that bundles written before the
        # field existed keep their canonical bytes (digest, signature).
        data: dict[str, Any] = handler(self)
        if data.get("derived_from") is None:
            data.pop("derived_from", None)
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid policy name; use lowercase letters, digits, '.', '_' "
                "or '-', starting with a letter or digit (e.g. 'organism')"
            )
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        try:
            Version(value)
        except InvalidVersion:
            value = ""
        if not value or not _SEMVER.match(value):
            raise ValueError("must be a semantic version such as '1.0.0'")
        return value

    def canonical_bytes(self) -> bytes:
        """The exact bytes written to ``manifest.json`` (and signed)."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()

    def content_digest(self) -> str:
        """sha256 over the canonical JSON of every field but ``digest``."""
        body = json.dumps(self.model_dump(mode="json", exclude={"digest"}), sort_keys=True)
        return _sha256(body.encode())

    def sealed(self) -> Manifest:
        """A copy whose ``digest`` matches its content."""
        return self.model_copy(update={"digest": self.content_digest()})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class PolicyBundle:
    """A refusal direction, its statistics and the parameters to apply them."""

    def __init__(self, manifest: Manifest, tensors: Mapping[str, torch.Tensor]):
        self.manifest = manifest
        self.tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()
        }
        _validate_tensors(self.manifest, self.tensors)
        # Further files stored beside the manifest (e.g. a signature), name -> bytes.
        self.extra_files: dict[str, bytes] = {}

    # ------------------------------------------------------------- accessors

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def layer(self) -> int:
        return self.manifest.layer

    @property
    def parameters(self) -> SteeringParameters:
        return self.manifest.parameters

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.manifest.modalities)

    @property
    def u(self) -> torch.Tensor:
        return self.tensors["u"]

    @property
    def g(self) -> float:
        return float(self.tensors["g"])

    @property
    def p_S(self) -> float:
        return float(self.tensors["p_S"])

    def delta(self, modality: str) -> torch.Tensor | None:
        return self.tensors.get(f"delta_{modality}")

    def __repr__(self) -> str:
        p = self.parameters
        return (
            f"PolicyBundle({self.ref}, layer={self.layer}, tau={p.tau:g}, lam={p.lam:g}, "
            f"kappa={p.kappa:g}, recenter={p.recenter!r}, modalities={list(self.modalities)})"
        )

    # ------------------------------------------------------------- construction

    @classmethod
    def from_statistics(
        cls,
        *,
        name: str,
        version: str,
        layer: int,
        mu_H: torch.Tensor,
        mu_S: torch.Tensor,
        mu_modalities: Mapping[str, torch.Tensor] | None = None,
        model: ModelFingerprint,
        parameters: SteeringParameters | None = None,
        calibration: dict[str, Any] | None = None,
        description: str = "",
    ) -> PolicyBundle:
        """Build a bundle from the class means at one layer (the method's definitions)."""
        mu_H64, mu_S64 = mu_H.double(), mu_S.double()
        r = mu_H64 - mu_S64
        g = r.norm()
        if not torch.isfinite(g) or g <= 0:
            raise PolicyIntegrityError(
                f"layer {layer}: harmful and harmless means coincide (gap {float(g):g}); "
                "the prompt sets do not separate at this layer"
            )
        u = r / g
        tensors = {"u": u, "mu_S": mu_S64, "mu_H": mu_H64, "p_S": (mu_S64 @ u), "g": g}
        for modality, mu_m in (mu_modalities or {}).items():
            tensors[f"delta_{modality}"] = mu_m.double() - mu_S64
        manifest = Manifest(
            name=name,
            version=version,
            description=description,
            model=model,
            layer=layer,
            parameters=parameters or SteeringParameters(),
            modalities=sorted(mu_modalities or {}),
            calibration=calibration or {},
        )
        return cls(manifest, {k: v.float() for k, v in tensors.items()})

    def with_parameters(self, **changes: Any) -> PolicyBundle:
        """A copy with some steering parameters changed (for ablations and grids).

        ``score_positions`` cannot change: the bundle's statistics were collected over
        that many positions, so another value needs a new calibration.
        """
        k = changes.get("score_positions", self.parameters.score_positions)
        if k != self.parameters.score_positions:
            raise InputError(
                f"policy {self.ref}: its statistics were collected over "
                f"score_positions={self.parameters.score_positions}; a bundle scoring "
                f"{k} positions needs its own calibration (guardrail calibrate "
                f"--score-positions {k})"
            )
        unknown = sorted(set(changes) - set(SteeringParameters.model_fields))
        if unknown:
            raise InputError(
                f"policy {self.ref}: unknown steering parameter(s) {unknown}; use one of "
                f"{sorted(SteeringParameters.model_fields)}"
            )
        try:
            params = SteeringParameters.model_validate({**self.parameters.model_dump(), **changes})
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise InputError(f"policy {self.ref}: invalid parameters ({details})") from None
        manifest = self.manifest.model_copy(update={"parameters": params, "digest": None})
        return PolicyBundle(manifest, self.tensors)

    def with_version(self, version: str, **updates: Any) -> PolicyBundle:
        """A copy under another version, created now (``updates``: other manifest fields)."""
        manifest = Manifest.model_validate(
            {
                **self.manifest.model_dump(),
                "version": version,
                "created": _now(),
                "files": {},
                "digest": None,
                **updates,
            }
        )
        return PolicyBundle(manifest, self.tensors)

    def derive(
        self, version: str, *, description: str | None = None, **parameters: Any
    ) -> PolicyBundle:
        """A new version with some steering parameters changed and the same statistics.

        The new manifest has its own creation time and records the derivation in
        ``derived_from`` (the source's ref and digest, each changed parameter's old and
        new value), so ``guardrail policy diff`` and audits see what changed; the
        calibration record stays, as the statistics are still that calibration's.
        """
        if version == self.version:
            raise InputError(
                f"policy {self.ref}: a derived bundle needs a new version (released versions "
                "are immutable); pass e.g. version='1.1.0'"
            )
        changed = self.with_parameters(**parameters).parameters
        # every field, defaults included (the dump leaves some out), so that going back
        # to a default (e.g. removing the per-modality gates) is a change too
        old, new = dict(self.parameters), dict(changed)
        changes = {k: [old[k], new[k]] for k in new if old[k] != new[k]}
        if not changes:
            raise InputError(
                f"policy {self.ref}: nothing to derive, the parameters are unchanged; pass "
                "e.g. tau=0.45"
            )
        now = _now()
        return self.with_version(
            version,
            parameters=new,
            description=self.manifest.description if description is None else description,
            derived_from={
                "ref": self.ref,
                "digest": self.sealed_manifest().digest,
                "changes": changes,
                "created": now,
            },
        )

    def _tensor_blob(self) -> bytes:
        return save_safetensors(dict(self.tensors), metadata={"format": "pt"})

    def sealed_manifest(self) -> Manifest:
        """The manifest exactly as :meth:`save_pretrained` writes it (tensor hash and
        digest set): what identifies this bundle's content."""
        files = {TENSORS: _sha256(self._tensor_blob())}
        return self.manifest.model_copy(update={"files": files}).sealed()

    def verify_integrity(self) -> None:
        """Check that a sealed bundle (one with a manifest digest, e.g. loaded from disk
        or saved) is still what its manifest says: the digest matches the manifest's
        content and the tensors hash to the manifest's ``files`` entry. An unsealed
        bundle (built in memory and never saved) has nothing to check beyond the value
        checks done when it was built.

        Raises:
            PolicyIntegrityError: the manifest or the tensors changed after sealing.
        """
        manifest = self.manifest
        if manifest.digest is None:
            return
        if manifest.digest != manifest.content_digest():
            raise PolicyIntegrityError(
                f"policy {self.ref}: the manifest digest does not match its content; the "
                "manifest was changed after the bundle was sealed. Derive changes with "
                "with_parameters() / with_version() instead of editing the manifest"
            )
        expected = manifest.files.get(TENSORS)
        if expected is not None and _sha256(self._tensor_blob()) != expected:
            raise PolicyIntegrityError(
                f"policy {self.ref}: the tensors do not match the manifest's hash; they were "
                "changed after the bundle was sealed. Reload the bundle from its directory"
            )
        _validate_tensors(manifest, self.tensors)

    # ------------------------------------------------------------- compatibility

    def check_compatible(self, adapter: ModelAdapter) -> None:
        """Raise :class:`PolicyCompatibilityError` unless calibrated for ``adapter``'s model."""
        fp = self.manifest.model
        here = ModelFingerprint.of(adapter)
        problems = []
        if fp.hidden_size != here.hidden_size:
            problems.append(f"hidden size {fp.hidden_size} != {here.hidden_size}")
        if fp.num_layers != here.num_layers:
            problems.append(f"layer count {fp.num_layers} != {here.num_layers}")
        if fp.config_hash != here.config_hash:
            problems.append("language-model config differs")
        if not problems and fp.weight_probe is not None and here.weight_probe is not None:
            a, b = torch.tensor(fp.weight_probe), torch.tensor(here.weight_probe)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=PROBE_RTOL, atol=1e-3):
                problems.append("language-model weights differ (another fine-tune or checkpoint)")
        if problems:
            raise PolicyCompatibilityError(
                f"policy {self.ref} was calibrated for {fp.architecture} ({fp.model_type}) and does "
                f"not fit this {here.architecture}: {'; '.join(problems)}. Calibrate a bundle for "
                "this model with `guardrail calibrate`."
            )
        if self.layer >= here.num_layers:
            raise PolicyCompatibilityError(
                f"policy {self.ref} steers layer {self.layer} but the model has {here.num_layers}"
            )

    # ------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the bundle to ``directory`` atomically and return its path.

        Files are written to a temporary sibling directory, flushed to disk, then
        swapped in with renames; an interruption leaves the previous bundle intact.
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = self._tensor_blob()
        manifest = self.sealed_manifest()
        with publish_dir(target) as tmp:
            write_synced(tmp / TENSORS, blob)
            for fname, data in self.extra_files.items():
                write_synced(tmp / fname, data)
            write_synced(tmp / MANIFEST, manifest.canonical_bytes())
        self.manifest = manifest
        return target

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        model: Any = None,
        processor: Any = None,
        adapter: ModelAdapter | None = None,
    ) -> PolicyBundle:
        """Load and verify a bundle; with a model (or adapter), check compatibility."""
        path = Path(directory)
        if not path.is_dir():
            raise BundleNotFoundError(
                f"policy bundle {str(path)!r} is not a directory; pass the directory holding "
                f"{MANIFEST} and {TENSORS}"
            )
        # Two tries: a bundle replaced while we read it shows up as a hash mismatch.
        for attempt in range(2):
            try:
                bundle = cls._read(path)
                break
            except PolicyIntegrityError:
                if attempt == 1:
                    raise
        if adapter is None and model is not None:
            from guardrail.adapters import ModelAdapter

            adapter = ModelAdapter(model, processor)
        if adapter is not None:
            bundle.check_compatible(adapter)
        return bundle

    @classmethod
    def _read(cls, path: Path) -> PolicyBundle:
        manifest_bytes = _read_file(path / MANIFEST)
        try:
            raw = json.loads(manifest_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PolicyIntegrityError(f"{path / MANIFEST}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise PolicyIntegrityError(f"{path / MANIFEST}: must hold a JSON object")
        manifest = parse_manifest(raw, source=str(path / MANIFEST))
        if manifest.digest != manifest.content_digest():
            raise PolicyIntegrityError(
                f"{path / MANIFEST}: the manifest digest does not match its content; it was "
                "edited after it was written. Change bundles with PolicyBundle.with_parameters() "
                "and save_pretrained(), or restore the original"
            )
        expected = manifest.files.get(TENSORS)
        if expected is None:
            raise PolicyIntegrityError(f"{path / MANIFEST}: no hash for {TENSORS} under 'files'")
        blob = _read_file(path / TENSORS)
        if _sha256(blob) != expected:
            raise PolicyIntegrityError(
                f"{path / TENSORS}: content hash {_sha256(blob)[:19]}... does not match the "
                f"manifest's {expected[:19]}...; the bundle was modified or corrupted. Restore it "
                "from its source or recalibrate"
            )
        try:
            tensors = load_safetensors(blob)
        except Exception as exc:  # safetensors raises its own error types
            raise PolicyIntegrityError(f"{path / TENSORS}: unreadable safetensors ({exc})") from exc
        bundle = cls(manifest, tensors)
        bundle._source = path  # type: ignore[attr-defined]
        bundle._manifest_bytes = manifest_bytes  # type: ignore[attr-defined]
        signature = path / SIGNATURE
        if signature.is_file():
            # Carried along so that a re-saved (e.g. published) bundle stays signed;
            # checked by guardrail.policy.signing.verify_bundle, not here.
            bundle.extra_files[SIGNATURE] = _read_file(signature)
        return bundle


def parse_manifest(raw: Mapping[str, Any], *, source: str = MANIFEST) -> Manifest:
    """Validate a manifest dict, turning pydantic errors into :class:`PolicyIntegrityError`."""
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            f" (got {err.get('input')!r:.60})"
            for err in exc.errors()
        )
        raise PolicyIntegrityError(f"{source}: invalid manifest: {details}") from None


def _validate_tensors(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
    where = f"policy {manifest.name}@{manifest.version}"
    expected = set(REQUIRED_TENSORS) | {f"delta_{m}" for m in manifest.modalities}
    missing = expected - set(tensors)
    if missing:
        raise PolicyIntegrityError(f"{where}: missing tensors {sorted(missing)}")
    extra = set(tensors) - expected
    if extra:
        raise PolicyIntegrityError(f"{where}: unexpected tensors {sorted(extra)}")
    d = manifest.model.hidden_size
    for key, value in tensors.items():
        shape = () if key in ("p_S", "g") else (d,)
        if tuple(value.shape) != shape:
            raise PolicyIntegrityError(
                f"{where}: tensor {key} has shape {tuple(value.shape)}, expected {shape}"
            )
        if not torch.isfinite(value).all():
            raise PolicyIntegrityError(f"{where}: tensor {key} holds NaN or infinite values")
    if float(tensors["g"]) <= 0:
        raise PolicyIntegrityError(f"{where}: gap g must be positive, got {float(tensors['g']):g}")
    norm = float(tensors["u"].double().norm())
    if abs(norm - 1.0) > 1e-3:
        raise PolicyIntegrityError(f"{where}: direction u must have unit norm, has {norm:.6f}")
    if manifest.layer >= manifest.model.num_layers:
        raise PolicyIntegrityError(
            f"{where}: layer {manifest.layer} is out of range for a {manifest.model.num_layers}-layer model"
        )


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PolicyIntegrityError(f"{path}: missing from the bundle") from None
    except OSError as exc:
        raise PolicyIntegrityError(f"{path}: unreadable ({exc})") from exc
