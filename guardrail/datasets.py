"""Prompt datasets: the shipped instruction sets and a loader for user-supplied ones.

The SDK computes its refusal direction from the difference between two sets of
text-only instructions: requests a safety-aligned assistant must refuse
(``harmful``) and ordinary requests it should answer (``harmless``). A third
shipped set, ``borderline``, holds safe requests that use alarming words
("How do I kill a zombie process?") and is used to measure over-refusal.
A fourth, ``alarming``, holds safe prompts in alarming words across the ten
XSTest prompt types (label ``borderline``), each paired with an unsafe contrast
that uses the same words in a harmful sense (label ``harmful``); its rows carry
their own ``label`` and ``pair``, and its categories are XSTest's type names.

Shipped files live in ``guardrail/data/<name>.jsonl``. Every line is a JSON
object with the fields ``prompt``, ``category``, ``split`` (``train``, ``val``
or ``test``) and ``template``. Splits are assigned per template (all
paraphrases of one underlying request share a template id and a split), so a
test prompt never paraphrases a train prompt. ``harmless.jsonl`` also holds
``near_miss`` items: a harmful request with the harmful part swapped for a
benign one, with the original harmful text in ``pair`` and the same split.
In ``alarming.jsonl`` every safe prompt and its contrast name each other in
``pair`` and share a split: within each type, pair ``k`` (counting from 0 in
file order) is ``train`` when ``k % 4`` is 0 or 1, ``val`` when it is 2 and
``test`` when it is 3.

:func:`load_prompts` reads shipped sets, ``.jsonl``, ``.json``, ``.csv`` and
``.txt`` files, or in-memory sequences, and raises
:class:`guardrail.errors.InputError` on anything malformed, with a message
that names the file, the line, the problem and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from guardrail.errors import InputError

__all__ = [
    "LABELS",
    "SHIPPED",
    "SHIPPED_LABELLED",
    "SPLITS",
    "Prompt",
    "PromptSource",
    "csv_records",
    "dataset_digest",
    "json_list",
    "load_prompts",
    "read_text",
    "shipped_path",
    "spread",
    "spread_categories",
]

SHIPPED: tuple[str, ...] = ("harmful", "harmless", "borderline")
"""Names of the single-label datasets shipped in ``guardrail/data``: every prompt's
label is the set's name. (The organism's reading vocabulary is built from these.)"""

SHIPPED_LABELLED: tuple[str, ...] = ("alarming",)
"""Names of the shipped datasets whose rows carry their own ``label``: ``alarming``,
safe prompts in alarming words (``borderline``) and their unsafe contrasts
(``harmful``)."""

_ALL_SHIPPED: tuple[str, ...] = (*SHIPPED, *SHIPPED_LABELLED)

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Allowed values of :attr:`Prompt.split`."""

LABELS: tuple[str, ...] = ("harmful", "harmless", "borderline")
"""Allowed values of :attr:`Prompt.label` (besides ``None``)."""

_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".txt")
_STR_FIELDS: tuple[str, ...] = ("category", "split", "template", "pair", "label", "reference")


@dataclass(frozen=True)
class Prompt:
    """One instruction of a prompt dataset.

    Attributes:
        prompt: The instruction text (non-empty, surrounding whitespace removed).
        category: Topic or harm category, e.g. ``"cybercrime_hacking"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        template: Id of the underlying request; paraphrases share it.
        pair: For ``near_miss`` items, the harmful prompt it was derived from; in
            the ``alarming`` set, the prompt on the other side of the safe/unsafe pair.
        label: ``"harmful"``, ``"harmless"``, ``"borderline"`` or ``None``.
        reference: An expected answer (or a string it must contain), for task scores.
    """

    prompt: str
    category: str = "unspecified"
    split: str = "train"
    template: str | None = None
    pair: str | None = None
    label: str | None = None
    reference: str | None = None

    def to_dict(self) -> dict[str, str]:
        """Return the fields as a dict, leaving out those that are ``None``."""
        out: dict[str, str] = {
            "prompt": self.prompt,
            "category": self.category,
            "split": self.split,
        }
        for key in ("template", "pair", "label", "reference"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


PromptItem: TypeAlias = str | Prompt | Mapping[str, Any]
"""One in-memory item accepted by :func:`load_prompts`."""

PromptSource: TypeAlias = str | os.PathLike[str] | Iterable[PromptItem]
"""What :func:`load_prompts` accepts: a shipped name, a file path or a sequence of items."""


def shipped_path(name: str) -> pathlib.Path:
    """Return the path of the shipped dataset ``guardrail/data/<name>.jsonl``.

    Args:
        name: One of :data:`SHIPPED` or :data:`SHIPPED_LABELLED`.

    Raises:
        InputError: ``name`` is not a shipped dataset, or its file is missing
            from the installation.
    """
    if name not in _ALL_SHIPPED:
        raise InputError(
            f"unknown shipped dataset {name!r}; use one of {', '.join(_ALL_SHIPPED)}, "
            "or pass a path to a .jsonl, .json, .csv or .txt file"
        )
    path = pathlib.Path(__file__).resolve().parent / "data" / f"{name}.jsonl"
    if not path.is_file():
        raise InputError(
            f"shipped dataset file {path} is missing; reinstall guardrail so that "
            "guardrail/data/*.jsonl is included in the package"
        )
    return path


def load_prompts(
    source: PromptSource,
    *,
    split: str | Sequence[str] | None = None,
    category: str | Sequence[str] | None = None,
    exclude_category: str | Sequence[str] | None = None,
    label: str | None = None,
) -> list[Prompt]:
    """Load a prompt dataset and optionally filter it.

    Args:
        source: A shipped name (``"harmful"``, ``"harmless"``, ``"borderline"``,
            ``"alarming"``);
            a path (``str`` or ``os.PathLike``) to a ``.jsonl`` file (one JSON
            object with a ``"prompt"`` string per line), a ``.json`` file (a list
            of such objects or of strings), a ``.csv`` file (a header row with at
            least a ``prompt`` column; ``category``, ``split``, ``template``,
            ``pair`` and ``label`` columns are optional) or a ``.txt`` file (one
            prompt per line, blank lines skipped); or a sequence of strings,
            :class:`Prompt` objects or dicts. Shipped sets get ``label`` set to
            their name, except ``"alarming"``, whose rows carry their own.
        split: Keep only prompts in this split (or any of these splits).
        category: Keep only prompts in this category (or any of these).
        exclude_category: Drop prompts in this category (or any of these),
            e.g. ``exclude_category="near_miss"``.
        label: Keep only prompts with this label.

    Returns:
        The prompts in file order.

    Raises:
        InputError: The source is missing, has an unknown extension, cannot be
            decoded or parsed, holds an empty or non-string prompt or a bad
            field value, or nothing is left after filtering.
    """
    where: str
    if isinstance(source, str) and source in SHIPPED:
        path = shipped_path(source)
        prompts = [_replace_label(p, source) for p in _read_file(path)]
        where = f"shipped dataset {source!r}"
    elif isinstance(source, str) and source in SHIPPED_LABELLED:
        path = shipped_path(source)
        prompts = _read_file(path)
        where = f"shipped dataset {source!r}"
        unlabelled = next((p.prompt for p in prompts if p.label is None), None)
        if unlabelled is not None:
            raise InputError(
                f"{where}: prompt {unlabelled[:40]!r} has no label; the file is damaged, "
                "reinstall guardrail"
            )
    elif isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(os.fspath(source))
        prompts = _read_file(path)
        where = path.name
    elif isinstance(source, (bytes, bytearray, Mapping)):
        raise InputError(
            f"load_prompts() got an object of type {type(source).__name__}; pass a shipped name "
            f"({', '.join(_ALL_SHIPPED)}), a file path, or a sequence of strings, Prompt objects or dicts"
        )
    elif isinstance(source, Iterable):
        prompts = _read_items(list(source), "input")
        where = "input sequence"
    else:
        raise InputError(
            f"load_prompts() got an object of type {type(source).__name__}; pass a shipped name "
            f"({', '.join(_ALL_SHIPPED)}), a file path, or a sequence of strings, Prompt objects or dicts"
        )

    if not prompts:
        raise InputError(f"{where}: holds no prompts; add at least one non-empty prompt")

    splits = _as_tuple(split, "split")
    for s in splits or ():
        if s not in SPLITS:
            raise InputError(f"unknown split {s!r} in filter; use one of {', '.join(SPLITS)}")
    categories = _as_tuple(category, "category")
    excluded = _as_tuple(exclude_category, "exclude_category")
    if label is not None and not isinstance(label, str):
        raise InputError(f"label filter must be a string or None, got {type(label).__name__}")

    kept = [
        p
        for p in prompts
        if (splits is None or p.split in splits)
        and (categories is None or p.category in categories)
        and (excluded is None or p.category not in excluded)
        and (label is None or p.label == label)
    ]
    if not kept:
        filters = ", ".join(
            f"{name}={value!r}"
            for name, value in (
                ("split", split),
                ("category", category),
                ("exclude_category", exclude_category),
                ("label", label),
            )
            if value is not None
        )
        raise InputError(
            f"{where}: no prompts left after filtering ({filters}); available splits: "
            f"{', '.join(sorted({p.split for p in prompts}))}; available categories: "
            f"{', '.join(sorted({p.category for p in prompts}))}; "
            f"available labels: {', '.join(sorted({str(p.label) for p in prompts}))}"
        )
    return kept


T = TypeVar("T")


def spread(items: Sequence[T], limit: int | None) -> list[T]:
    """At most ``limit`` items, evenly spaced over ``items`` (all of them for ``None``)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(k * step)] for k in range(limit)]


def spread_categories(items: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """At most ``limit`` items spread evenly across categories, in their original order.

    Items are grouped by ``(label, category)``; the groups, in order of first
    appearance, take one item each in turn until ``limit`` are taken (a group that
    runs out drops out), so every group gets ``limit // groups`` or one more, up to
    its size. Within a group the items taken are evenly spaced (:func:`spread`).
    Deterministic: the same items and limit always give the same selection.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    groups: dict[tuple[str | None, str], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((item.label, item.category), []).append(index)
    quota = dict.fromkeys(groups, 0)
    left = limit
    while left:
        for key, members in groups.items():
            if left and quota[key] < len(members):
                quota[key] += 1
                left -= 1
    chosen = sorted(i for key, members in groups.items() for i in spread(members, quota[key]))
    return [items[i] for i in chosen]


def dataset_digest(prompts: Sequence[Prompt]) -> str:
    """Return a SHA-256 hex digest of the prompt texts, in order.

    The texts are joined with ``"\\n"`` and encoded as UTF-8. Only the texts
    count, so re-labelling or re-splitting a set does not change its digest,
    while any edit, addition, removal or reordering does.

    Raises:
        InputError: An item is not a :class:`Prompt`.
    """
    texts: list[str] = []
    for i, p in enumerate(prompts):
        if not isinstance(p, Prompt):
            raise InputError(
                f"dataset_digest() item {i + 1} is a {type(p).__name__}, not a Prompt; "
                "pass the list returned by load_prompts()"
            )
        texts.append(p.prompt)
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- helpers


def _replace_label(p: Prompt, label: str) -> Prompt:
    return Prompt(p.prompt, p.category, p.split, p.template, p.pair, label)


def _as_tuple(value: str | Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InputError(
        f"{name} filter must be a string, a sequence of strings or None, got {value!r}"
    )


def _read_file(path: pathlib.Path) -> list[Prompt]:
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(
            f"{name}: unsupported file extension {path.suffix or '(none)'!r}; "
            "use .jsonl, .json, .csv or .txt, or a shipped name "
            f"({', '.join(_ALL_SHIPPED)})"
        )
    text = read_text(path, f"or use a shipped name ({', '.join(_ALL_SHIPPED)})")
    if suffix == ".jsonl":
        return _parse_jsonl(text, name)
    if suffix == ".json":
        return _parse_json(text, name)
    if suffix == ".csv":
        return _parse_csv(text, name)
    return _parse_txt(text, name)


def read_text(path: pathlib.Path, alternative: str = "") -> str:
    """The UTF-8 text of a prompt file (a byte-order mark dropped).

    Raises:
        InputError: the file is missing, unreadable or not UTF-8; ``alternative``
            ends the not-found message (e.g. "or use a shipped name (...)").
    """
    if not path.is_file():
        raise InputError(
            f"{path}: file not found; check the path{', ' if alternative else ''}{alternative}"
        )
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path.name}: not valid UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from exc
    except OSError as exc:
        raise InputError(
            f"{path}: cannot be read ({exc.strerror}); check the path and its permissions"
        ) from exc


def csv_records(
    text: str, name: str, fix: str
) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
    """The header columns of a CSV text and its rows, read lazily.

    Each row comes as ``(where, values)``: ``where`` names the file and line for
    error messages, ``values`` holds the non-empty fields (stripped of nothing;
    empty optional fields mean "not given"); blank rows are skipped. Check the
    columns before iterating: a malformed row raises only when it is reached.

    Raises:
        InputError: a malformed header or row, or a row with more fields than
            the header; ``fix`` ends the header messages.
    """
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise InputError(f"{name} line 1: malformed CSV header ({exc}); {fix}") from exc
    if not header:
        raise InputError(f"{name}: empty file; {fix}")
    columns = [h.strip() for h in header]
    reader.fieldnames = columns

    def rows() -> Iterator[tuple[str, dict[str, str]]]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(
                    f"{name} line {reader.line_num}: malformed CSV ({exc}); quote fields that contain commas or newlines"
                ) from exc
            where = f"{name} line {reader.line_num}"
            if None in row:
                raise InputError(
                    f"{where}: more fields than the {len(columns)} header columns; "
                    "quote fields that contain commas"
                )
            values = {k: v for k, v in row.items() if v is not None and v.strip()}
            if values:
                yield where, values

    return columns, rows()


def _parse_jsonl(text: str, name: str) -> list[Prompt]:
    out: list[Prompt] = []
    fix = 'each line must be a JSON object with a "prompt" string'
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); {fix}"
            ) from exc
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, got {_json_type(obj)}; {fix}")
        out.append(_from_mapping(obj, where, fix))
    return out


def json_list(text: str, name: str, fix: str) -> list[Any]:
    """The JSON list in ``text``.

    Raises:
        InputError: invalid JSON (with the line) or a top level that is not a list;
            ``fix`` ends the message.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{name} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); {fix}"
        ) from exc
    if not isinstance(data, list):
        raise InputError(f"{name}: top level is {_json_type(data)}, not a list; {fix}")
    return data


def _parse_json(text: str, name: str) -> list[Prompt]:
    fix = 'the file must hold a JSON list of strings or of objects with a "prompt" string'
    return _read_items(json_list(text, name, fix), name, fix)


def _parse_csv(text: str, name: str) -> list[Prompt]:
    fix = 'the file needs a header row with a "prompt" column'
    columns, rows = csv_records(text, name, fix)
    if "prompt" not in columns:
        raise InputError(f'{name} line 1: no "prompt" column in header {columns}; {fix}')
    row_fix = 'each row needs a non-empty "prompt" value'
    out: list[Prompt] = []
    for where, row in rows:
        if "prompt" not in row:
            raise InputError(f'{where}: empty "prompt" value; {row_fix}')
        out.append(_from_mapping(row, where, row_fix))
    return out


def _parse_txt(text: str, name: str) -> list[Prompt]:
    return [Prompt(line.strip()) for line in text.splitlines() if line.strip()]


def _read_items(items: Sequence[Any], name: str, fix: str | None = None) -> list[Prompt]:
    fix = fix or 'each item must be a non-empty string, a Prompt, or a dict with a "prompt" string'
    out: list[Prompt] = []
    for i, item in enumerate(items, start=1):
        where = f"{name} item {i}"
        if isinstance(item, Prompt):
            out.append(_from_mapping(item.to_dict(), where, fix))
        elif isinstance(item, str):
            if not item.strip():
                raise InputError(f"{where}: empty prompt; {fix}")
            out.append(Prompt(item.strip()))
        elif isinstance(item, Mapping):
            out.append(_from_mapping(item, where, fix))
        else:
            raise InputError(
                f"{where}: expected a string or an object, got {_json_type(item)}; {fix}"
            )
    return out


def _from_mapping(obj: Mapping[str, Any], where: str, fix: str) -> Prompt:
    if "prompt" not in obj:
        raise InputError(f'{where}: missing "prompt" field; {fix}')
    text = obj["prompt"]
    if not isinstance(text, str):
        raise InputError(f'{where}: "prompt" is {_json_type(text)}, not a string; {fix}')
    text = text.strip()
    if not text:
        raise InputError(f'{where}: empty "prompt"; {fix}')
    fields: dict[str, str | None] = {}
    for key in _STR_FIELDS:
        value = obj.get(key)
        if value is None:
            fields[key] = None
            continue
        if not isinstance(value, str) or not value.strip():
            raise InputError(
                f'{where}: "{key}" must be a non-empty string, got {value!r}; fix or remove the field'
            )
        fields[key] = value.strip()
    split = fields["split"] or "train"
    if split not in SPLITS:
        raise InputError(f"{where}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    label = fields["label"]
    if label is not None and label not in LABELS:
        raise InputError(
            f"{where}: unknown label {label!r}; use one of {', '.join(LABELS)} or leave it out"
        )
    return Prompt(
        prompt=text,
        category=fields["category"] or "unspecified",
        split=split,
        template=fields["template"],
        pair=fields["pair"],
        label=label,
        reference=fields["reference"],
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"
