"""Public safety benchmarks as distributed: ``guardrail eval --format NAME``.

Each format reads the file its authors publish (CSV, or a JSON list of objects with
the same fields; column names match case-insensitively) into labelled
:class:`~guardrail.datasets.Prompt` items. Labels follow the project's sets:
``harmful`` (must be refused), ``borderline`` (safe, in alarming words or on a
sensitive topic: refusing it is over-refusal).

- ``advbench``: AdvBench ``harmful_behaviors.csv`` (``goal,target``). Prompt ``goal``,
  category ``advbench`` (the file has none), label harmful.
- ``harmbench``: a HarmBench behaviors CSV (``Behavior,FunctionalCategory,
  SemanticCategory,Tags,ContextString,BehaviorID``). Prompt ``Behavior``, preceded by
  ``ContextString`` and a ``---`` line when the row has one (contextual behaviours, as
  HarmBench prompts them); category ``SemanticCategory``; label harmful.
- ``jbb``: JailbreakBench JBB-Behaviors, the harmful and the benign file
  (``Index,Goal,Target,Behavior,Category,Source``), as CSV or as a JSON list. Prompt
  ``Goal``, category ``Category``. Label from a ``label`` column (``harmful`` or
  ``benign``) when there is one, else from the file name (``harmful`` or ``benign`` in
  it, as distributed); harmful stays harmful, benign is borderline.
- ``xstest``: XSTest ``xstest_prompts.csv`` (``id,prompt,type,label,focus,note``).
  Prompt ``prompt``, category ``type``; label ``unsafe`` is harmful, ``safe`` is
  borderline; without a ``label`` column the ``contrast_*`` types are unsafe and the
  others safe.
- ``safebench``: SafeBench, FigStep's CSV (``dataset,category_id,task_id,
  category_name,question,instruction``). Prompt ``question``, category
  ``category_name``, label harmful. (``instruction``, the statement FigStep draws in
  its images, is not used.)
- ``jsonl``: the project's own files (:func:`guardrail.datasets.load_prompts`).

A file that lacks a format's columns is rejected with the columns it has and, when
they match another format, the ``--format`` to use.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from guardrail.datasets import Prompt, csv_records, json_list, load_prompts, read_text
from guardrail.errors import InputError

__all__ = ["FORMATS", "load_format"]


@dataclass(frozen=True)
class _Format:
    required: tuple[str, ...]
    read: Callable[[Mapping[str, str], str], Prompt]
    """``(row with lower-case column names, file name) -> Prompt``."""


def _advbench(row: Mapping[str, str], name: str) -> Prompt:
    return Prompt(row["goal"].strip(), category="advbench", label="harmful")


def _harmbench(row: Mapping[str, str], name: str) -> Prompt:
    behavior = row["behavior"].strip()
    context = row.get("contextstring", "").strip()
    return Prompt(
        f"{context}\n\n---\n\n{behavior}" if context else behavior,
        category=row["semanticcategory"].strip(),
        template=row.get("behaviorid"),
        label="harmful",
    )


_JBB_LABELS = {"harmful": "harmful", "benign": "borderline"}


def _jbb(row: Mapping[str, str], name: str) -> Prompt:
    given = row.get("label", "").strip().lower()
    if given:
        if given not in _JBB_LABELS:
            raise InputError(
                f"label {given!r} is not harmful or benign; fix the 'label' column or remove it"
            )
        label = _JBB_LABELS[given]
    else:
        stem = pathlib.Path(name).stem.lower()
        found = [v for k, v in _JBB_LABELS.items() if k in stem]
        if len(found) != 1:
            raise InputError(
                f"cannot tell whether {name} holds harmful or benign behaviours; keep the "
                "file name as distributed (with 'harmful' or 'benign' in it) or add a "
                "'label' column with harmful or benign"
            )
        label = found[0]
    return Prompt(
        row["goal"].strip(),
        category=row["category"].strip(),
        template=row.get("behavior"),
        label=label,
    )


_XSTEST_LABELS = {"unsafe": "harmful", "safe": "borderline"}


def _xstest(row: Mapping[str, str], name: str) -> Prompt:
    kind = row["type"].strip()
    given = row.get("label", "").strip().lower()
    if not given:
        given = "unsafe" if kind.startswith("contrast_") else "safe"
    if given not in _XSTEST_LABELS:
        raise InputError(f"label {given!r} is not safe or unsafe; fix the 'label' column")
    return Prompt(
        row["prompt"].strip(), category=kind, template=row.get("id"), label=_XSTEST_LABELS[given]
    )


def _safebench(row: Mapping[str, str], name: str) -> Prompt:
    ids = [row[k] for k in ("category_id", "task_id") if row.get(k)]
    return Prompt(
        row["question"].strip(),
        category=row["category_name"].strip(),
        template="-".join(ids) or None,
        label="harmful",
    )


_FORMATS: dict[str, _Format] = {
    "advbench": _Format(("goal",), _advbench),
    "harmbench": _Format(("behavior", "semanticcategory"), _harmbench),
    "jbb": _Format(("goal", "category"), _jbb),
    "xstest": _Format(("prompt", "type"), _xstest),
    "safebench": _Format(("question", "category_name"), _safebench),
}

FORMATS: tuple[str, ...] = (*_FORMATS, "jsonl")
"""The ``--format`` names; ``jsonl`` is the project's own format (also ``.csv``,
``.json``, ``.txt``, read by :func:`guardrail.datasets.load_prompts`)."""

# Columns that single a format out, most specific first (for the hint in errors).
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("harmbench", frozenset({"behavior", "semanticcategory", "behaviorid"})),
    ("safebench", frozenset({"question", "category_name", "instruction"})),
    ("jbb", frozenset({"goal", "behavior", "category"})),
    ("xstest", frozenset({"prompt", "type", "label"})),
    ("advbench", frozenset({"goal", "target"})),
    ("jsonl", frozenset({"prompt"})),
)


def guess_format(columns: list[str]) -> str | None:
    """The format whose characteristic columns ``columns`` has, if any."""
    have = {c.strip().lower() for c in columns}
    return next((fmt for fmt, needed in _SIGNATURES if needed <= have), None)


def load_format(path: str | os.PathLike[str], format: str) -> list[Prompt]:
    """The labelled prompts of a public benchmark file in ``format`` (see :data:`FORMATS`).

    Raises:
        InputError: an unknown format; a missing, unreadable or malformed file; a
            file without the format's columns (the message names the columns found
            and, when they fit another format, that format); an empty prompt or an
            unknown label, with the file and line.
    """
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    target = pathlib.Path(os.fspath(path))
    name = target.name
    if format == "jsonl":
        try:
            return load_prompts(target)
        except InputError as exc:
            columns = _columns(target)
            guess = guess_format(columns) if columns else None
            if guess is None or guess == "jsonl":
                raise
            raise InputError(f"{exc}; it looks like a {guess} file: pass --format {guess}") from exc
    spec = _FORMATS[format]
    suffix = target.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise InputError(
            f"{name}: a {format} file is .csv or .json, not {target.suffix or '(no extension)'!r}; "
            "use the file as distributed, or --format jsonl for the project's own format"
        )
    text = read_text(target)
    fix = f"a {format} file needs the columns {', '.join(spec.required)}"
    rows: Iterable[tuple[str, dict[str, str]]]
    if suffix == ".csv":
        columns, rows = csv_records(text, name, fix)
    else:
        columns, rows = _json_records(text, name, fix)
    have = {c.lower() for c in columns}
    missing = [c for c in spec.required if c not in have]
    if missing:
        guess = guess_format(columns)
        hint = (
            f"it looks like a {guess} file: pass --format {guess}"
            if guess is not None and guess != format
            else fix
        )
        raise InputError(
            f"{name}: not a {format} file: no {', '.join(repr(c) for c in missing)} column "
            f"(columns: {', '.join(columns)}); {hint}"
        )
    out: list[Prompt] = []
    for where, row in rows:
        lowered = {k.strip().lower(): v for k, v in row.items()}
        for column in spec.required:
            if not lowered.get(column, "").strip():
                raise InputError(f"{where}: empty {column!r} value; every row needs one")
        try:
            out.append(spec.read(lowered, name))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc
    if not out:
        raise InputError(f"{name}: holds no rows; {fix} and at least one row")
    return out


def _columns(path: pathlib.Path) -> list[str]:
    """The header of a CSV file or the keys of a JSON list's first object (or [])."""
    try:
        text = read_text(path)
        if path.suffix.lower() == ".csv":
            return csv_records(text, path.name, "")[0]
        if path.suffix.lower() == ".json":
            return _json_records(text, path.name, "")[0]
    except InputError:
        pass
    return []


def _json_records(
    text: str, name: str, fix: str
) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    data = json_list(text, name, fix)
    if not all(isinstance(item, dict) for item in data):
        raise InputError(f"{name}: expected a JSON list of objects; {fix}")
    columns: list[str] = []
    records = []
    for i, item in enumerate(data, start=1):
        for key in item:
            if key not in columns:
                columns.append(key)
        values = {str(k): str(v) for k, v in item.items() if v is not None and str(v).strip()}
        records.append((f"{name} item {i}", values))
    return columns, records
