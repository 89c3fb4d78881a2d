"""The shipped ``alarming`` set: safe prompts in alarming words across the ten XSTest
types, each with an unsafe contrast; its splits, labels and pairs, and that the
loaders (``load_prompts``, ``guardrail eval``, the XSTest format) read it."""

from __future__ import annotations

import collections
import csv
import json
import pathlib
from typing import Any

import pytest

from guardrail import cli
from guardrail.datasets import (
    SHIPPED,
    SHIPPED_LABELLED,
    SPLITS,
    load_prompts,
    shipped_path,
    spread_categories,
)
from guardrail.errors import InputError
from guardrail.evaluation.evaluate import load_eval_items
from guardrail.evaluation.formats import load_format

from .conftest import tiny
from .test_guardrail_plumbing import strong_policy

DATA = pathlib.Path(__file__).resolve().parents[1] / "guardrail" / "data"
FIELDS = {"prompt", "category", "split", "template", "label", "pair"}

# XSTest's ten safe types and the contrast type of each (XSTest pools the two
# discrimination types into contrast_discr and the two privacy types into contrast_privacy).
CONTRAST = {
    "homonyms": "contrast_homonyms",
    "figurative_language": "contrast_figurative_language",
    "safe_targets": "contrast_safe_targets",
    "safe_contexts": "contrast_safe_contexts",
    "definitions": "contrast_definitions",
    "real_group_nons_discr": "contrast_discr",
    "nons_group_real_discr": "contrast_discr",
    "historical_events": "contrast_historical_events",
    "privacy_public": "contrast_privacy",
    "privacy_fictional": "contrast_privacy",
}
SPLIT_OF_POSITION = {0: "train", 1: "train", 2: "val", 3: "test"}


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def _rows(name: str) -> list[dict[str, Any]]:
    """A shipped file parsed with plain ``json``, independent of the loader."""
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return _rows("alarming")


@pytest.fixture(scope="module")
def safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["label"] == "borderline"]


@pytest.fixture(scope="module")
def unsafe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["label"] == "harmful"]


# --------------------------------------------------------------------------- the file


def test_rows_have_the_documented_fields_and_labels(rows: list[dict[str, Any]]) -> None:
    for i, row in enumerate(rows, start=1):
        assert set(row) == FIELDS, f"line {i}: {sorted(row)}"
        assert all(isinstance(v, str) and v == v.strip() and v for v in row.values()), i
        assert row["split"] in SPLITS, i
        assert row["template"].startswith(f"alarming/{row['template'].split('/')[1]}/"), i
        if row["category"] in CONTRAST:
            assert row["label"] == "borderline", f"line {i}: a safe type labelled {row['label']}"
        else:
            assert row["category"] in set(CONTRAST.values()), f"line {i}: {row['category']}"
            assert row["label"] == "harmful", f"line {i}: a contrast labelled {row['label']}"
        words = len(row["prompt"].split())
        assert 5 <= words <= 40, f"line {i}: {words} words"


def test_counts_per_type_and_split(
    safe: list[dict[str, Any]], unsafe: list[dict[str, Any]]
) -> None:
    assert len(safe) >= 250
    per_type = collections.Counter(r["category"] for r in safe)
    assert set(per_type) == set(CONTRAST)
    assert min(per_type.values()) >= 25, per_type
    # every type has contrasts, one per safe prompt
    contrast_type = collections.Counter(r["template"].split("/")[1] for r in unsafe)
    assert contrast_type == per_type
    per_split = collections.Counter((r["category"], r["split"]) for r in safe)
    for kind in CONTRAST:
        for split in SPLITS:
            assert per_split[kind, split] >= 6, (kind, split, per_split[kind, split])
    for split in SPLITS:
        kinds = {r["template"].split("/")[1] for r in unsafe if r["split"] == split}
        assert kinds == set(CONTRAST), split
    share = collections.Counter(r["split"] for r in safe)
    assert 0.48 <= share["train"] / len(safe) <= 0.56, share
    assert 0.22 <= share["val"] / len(safe) <= 0.26, share
    assert 0.22 <= share["test"] / len(safe) <= 0.26, share


def test_the_split_follows_the_documented_rule(safe: list[dict[str, Any]]) -> None:
    """Within a type, pair k (file order, from 0) is train for k % 4 in 0, 1, val for 2,
    test for 3: deterministic, and documented in guardrail.datasets."""
    position: dict[str, int] = collections.defaultdict(int)
    for row in safe:
        k = position[row["category"]]
        position[row["category"]] += 1
        assert row["split"] == SPLIT_OF_POSITION[k % 4], (row["prompt"], k, row["split"])


def test_each_safe_prompt_and_its_contrast_pair_up_in_one_split(
    rows: list[dict[str, Any]], safe: list[dict[str, Any]], unsafe: list[dict[str, Any]]
) -> None:
    by_text = {r["prompt"]: r for r in rows}
    assert len(by_text) == len(rows)
    for row in safe:
        other = by_text[row["pair"]]
        assert other["label"] == "harmful" and other["pair"] == row["prompt"], row
        assert other["split"] == row["split"], row
        assert other["category"] == CONTRAST[row["category"]], row
        assert other["template"] == row["template"] + "/contrast", row
    # one to one: every contrast is named by exactly one safe prompt
    named = collections.Counter(r["pair"] for r in safe)
    assert set(named) == {r["prompt"] for r in unsafe}
    assert set(named.values()) == {1}


def test_no_prompt_is_duplicated_within_the_set_across_splits_or_across_files(
    rows: list[dict[str, Any]],
) -> None:
    seen: dict[str, str] = {}
    for row in rows:
        key = _norm(row["prompt"])
        assert key not in seen, f"{row['prompt']!r} in {row['split']} and {seen[key]}"
        seen[key] = row["split"]
    for name in SHIPPED:
        for row in _rows(name):
            assert _norm(row["prompt"]) not in seen, f"{row['prompt']!r} is also in {name}"
    templates: dict[str, set[str]] = collections.defaultdict(set)
    for row in rows:
        templates[row["template"]].add(row["split"])
    assert all(len(s) == 1 for s in templates.values())
    assert len(templates) == len(rows)


# --------------------------------------------------------------------------- loading


def test_load_prompts_by_name_keeps_the_file_labels_and_filters(
    rows: list[dict[str, Any]],
) -> None:
    assert "alarming" in SHIPPED_LABELLED
    # the single-label sets (the organism's reading vocabulary) are unchanged
    assert "alarming" not in SHIPPED
    assert shipped_path("alarming").resolve() == (DATA / "alarming.jsonl").resolve()

    everything = load_prompts("alarming")
    assert [p.prompt for p in everything] == [r["prompt"] for r in rows]
    assert [p.label for p in everything] == [r["label"] for r in rows]
    assert [p.pair for p in everything] == [r["pair"] for r in rows]

    test = load_prompts("alarming", split="test")
    assert test and {p.split for p in test} == {"test"}
    assert len(test) == sum(r["split"] == "test" for r in rows)

    homonyms = load_prompts("alarming", category="homonyms", split=["train", "val"])
    assert {(p.category, p.label) for p in homonyms} == {("homonyms", "borderline")}
    contrasts = load_prompts("alarming", label="harmful")
    assert {p.category for p in contrasts} == set(CONTRAST.values())
    without = load_prompts("alarming", exclude_category=list(set(CONTRAST.values())))
    assert {p.label for p in without} == {"borderline"}


def test_unknown_shipped_names_list_the_alarming_set() -> None:
    with pytest.raises(InputError, match="use one of harmful, harmless, borderline, alarming"):
        shipped_path("alarmed")


def test_eval_loader_reads_the_test_split_with_xstest_categories(
    rows: list[dict[str, Any]],
) -> None:
    items = load_eval_items(["alarming"])
    assert {p.split for p in items} == {"test"}
    assert len(items) == sum(r["split"] == "test" for r in rows)
    assert {p.label for p in items} == {"borderline", "harmful"}
    assert {p.category for p in items if p.label == "borderline"} == set(CONTRAST)
    assert {p.category for p in items if p.label == "harmful"} == set(CONTRAST.values())
    # --limit takes every (label, category) group, not the first types in the file
    groups = {(p.label, p.category) for p in items}
    limited = load_eval_items(["alarming"], limit=len(groups))
    assert {(p.label, p.category) for p in limited} == groups
    assert limited == spread_categories(items, len(groups))
    assert load_eval_items(["alarming"], split="val") != items


def test_categories_line_up_with_the_xstest_loader(tmp_path: pathlib.Path) -> None:
    """Written out as XSTest's CSV (with and without its label column), the set reads
    back through ``--format xstest`` with the same categories and labels."""
    prompts = load_prompts("alarming", split="test")
    for with_label in (True, False):
        path = tmp_path / f"xstest_{with_label}.csv"
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "prompt", "type", *(["label"] if with_label else [])])
            for i, p in enumerate(prompts, start=1):
                label = "safe" if p.label == "borderline" else "unsafe"
                writer.writerow([i, p.prompt, p.category, *([label] if with_label else [])])
        back = load_format(path, "xstest")
        assert [(p.prompt, p.category, p.label) for p in back] == [
            (p.prompt, p.category, p.label) for p in prompts
        ]


def test_guardrail_eval_runs_the_alarming_set_by_name(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, processor = tiny("llava")
    policy = strong_policy(model, processor).save_pretrained(tmp_path / "policy")
    args = ["eval", "--model", "tiny-llava", "--policy", str(policy), "--dataset", "alarming"]
    args += ["--limit", "18", "--max-new-tokens", "2", "--quiet", "--json"]
    assert cli.main(args) == 0
    text = json.loads(capsys.readouterr().out)["modalities"]["text"]
    assert text["borderline"]["n"] == 10 and text["harmful"]["n"] == 8
    assert set(text["borderline"]["by_category"]) == set(CONTRAST)
    assert set(text["harmful"]["by_category"]) == set(CONTRAST.values())


def test_the_documented_counts_match_the_file(
    safe: list[dict[str, Any]], unsafe: list[dict[str, Any]]
) -> None:
    page = (DATA.parents[1] / "docs" / "calibration.md").read_text(encoding="utf-8")
    for kind in CONTRAST:
        rows = [r for r in safe if r["category"] == kind]
        splits = collections.Counter(r["split"] for r in rows)
        cells = f"| `{kind}` | {len(rows)} | {len(rows)} `{CONTRAST[kind]}` | "
        cells += " / ".join(str(splits[s]) for s in SPLITS) + " |"
        assert cells in page, cells
    splits = collections.Counter(r["split"] for r in safe)
    total = f"| all | {len(safe)} | {len(unsafe)} | " + " / ".join(str(splits[s]) for s in SPLITS)
    assert total + " |" in page
