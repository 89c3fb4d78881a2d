"""Tests of the shipped prompt datasets and of the ``guardrail.datasets`` loader."""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import pytest

from guardrail.datasets import (
    SHIPPED,
    SPLITS,
    Prompt,
    dataset_digest,
    load_prompts,
    shipped_path,
)
from guardrail.errors import GuardrailError, InputError

DATA = pathlib.Path(__file__).resolve().parents[1] / "guardrail" / "data"
REQUIRED_FIELDS = {"prompt", "category", "split", "template"}


def _raw(name: str) -> list[dict[str, Any]]:
    """Parse a shipped file with plain ``json`` so the checks don't depend on the loader."""
    rows = []
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            assert line.strip(), f"{name}.jsonl line {lineno} is blank"
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def raw() -> dict[str, list[dict[str, Any]]]:
    return {name: _raw(name) for name in SHIPPED}


# --------------------------------------------------------------------------- shipped data


def test_shipped_files_exist_and_are_found_by_shipped_path() -> None:
    for name in SHIPPED:
        path = shipped_path(name)
        assert path.is_file()
        assert path.resolve() == (DATA / f"{name}.jsonl").resolve()


def test_every_row_has_the_documented_fields(raw: dict[str, list[dict[str, Any]]]) -> None:
    for name, rows in raw.items():
        for i, row in enumerate(rows, start=1):
            extra_ok = {"pair"} if row.get("category") == "near_miss" else set()
            assert set(row) == REQUIRED_FIELDS | extra_ok, f"{name} line {i}: {sorted(row)}"
            for key in row:
                assert isinstance(row[key], str) and row[key].strip(), f"{name} line {i}: {key}"
            assert row["prompt"] == row["prompt"].strip()
            assert row["split"] in SPLITS


def test_counts(raw: dict[str, list[dict[str, Any]]]) -> None:
    harmful = raw["harmful"]
    harmless = [r for r in raw["harmless"] if r["category"] != "near_miss"]
    near_miss = [r for r in raw["harmless"] if r["category"] == "near_miss"]
    assert len(harmful) >= 300
    assert len({r["category"] for r in harmful}) >= 10
    assert len(harmless) >= 300
    assert len({r["category"] for r in harmless}) >= 10
    assert len(near_miss) >= 100
    assert len(raw["borderline"]) >= 100
    # every harmful category is reasonably populated, not a token entry
    for cat, n in collections.Counter(r["category"] for r in harmful).items():
        assert n >= 15, cat


def test_prompt_lengths_are_within_bounds_and_comparable(
    raw: dict[str, list[dict[str, Any]]],
) -> None:
    means = {}
    for name, rows in raw.items():
        words = [len(r["prompt"].split()) for r in rows]
        assert min(words) >= 5 and max(words) <= 40, name
        means[name] = sum(words) / len(words)
    harmless = [len(r["prompt"].split()) for r in raw["harmless"] if r["category"] != "near_miss"]
    # the refusal direction must not simply learn "long prompt" vs "short prompt"
    assert 0.75 <= (sum(harmless) / len(harmless)) / means["harmful"] <= 1.25


def test_no_duplicate_prompts_across_files(raw: dict[str, list[dict[str, Any]]]) -> None:
    seen: dict[str, str] = {}
    for name, rows in raw.items():
        for row in rows:
            key = " ".join(row["prompt"].casefold().split())
            assert key not in seen, f"{row['prompt']!r} in {name} and {seen[key]}"
            seen[key] = name


def test_near_miss_pairs_exist_in_harmful_with_the_same_split(
    raw: dict[str, list[dict[str, Any]]],
) -> None:
    harmful_split = {r["prompt"]: r["split"] for r in raw["harmful"]}
    near_miss = [r for r in raw["harmless"] if r["category"] == "near_miss"]
    assert near_miss
    for row in near_miss:
        assert row["pair"] in harmful_split, row
        assert harmful_split[row["pair"]] == row["split"], row
        assert row["pair"] != row["prompt"]
    # no other harmless row carries a pair
    assert all("pair" not in r for r in raw["harmless"] if r["category"] != "near_miss")


def test_no_template_spans_two_splits(raw: dict[str, list[dict[str, Any]]]) -> None:
    splits: dict[str, set[str]] = collections.defaultdict(set)
    for rows in raw.values():
        for row in rows:
            splits[row["template"]].add(row["split"])
    spanning = {t: s for t, s in splits.items() if len(s) > 1}
    assert not spanning
    # templates are shared by paraphrases, so there are fewer templates than prompts
    assert len(splits) < sum(len(rows) for rows in raw.values())


@pytest.mark.parametrize("name", ["harmful", "harmless"])
def test_split_proportions_and_category_coverage(
    raw: dict[str, list[dict[str, Any]]], name: str
) -> None:
    rows = raw[name]
    counts = collections.Counter(r["split"] for r in rows)
    total = len(rows)
    assert 0.50 <= counts["train"] / total <= 0.70, counts
    assert 0.10 <= counts["val"] / total <= 0.22, counts
    assert 0.18 <= counts["test"] / total <= 0.32, counts
    templates: dict[str, set[str]] = collections.defaultdict(set)
    splits: dict[str, set[str]] = collections.defaultdict(set)
    for r in rows:
        templates[r["category"]].add(r["template"])
        splits[r["category"]].add(r["split"])
    for cat, tmpl in templates.items():
        if len(tmpl) >= 4:
            assert splits[cat] == set(SPLITS), cat


def test_borderline_splits(raw: dict[str, list[dict[str, Any]]]) -> None:
    counts = collections.Counter(r["split"] for r in raw["borderline"])
    assert set(counts) == {"val", "test"}
    assert 0.10 <= counts["val"] / len(raw["borderline"]) <= 0.30


def test_load_shipped_sets_labels_and_matches_raw(raw: dict[str, list[dict[str, Any]]]) -> None:
    for name in SHIPPED:
        prompts = load_prompts(name)
        assert [p.prompt for p in prompts] == [r["prompt"] for r in raw[name]]
        assert {p.label for p in prompts} == {name}
        assert all(isinstance(p, Prompt) for p in prompts)
    near = load_prompts("harmless", category="near_miss")
    assert all(p.pair is not None for p in near)


# --------------------------------------------------------------------------- filtering


def test_filter_by_split_and_category() -> None:
    all_harmful = load_prompts("harmful")
    train = load_prompts("harmful", split="train")
    val_test = load_prompts("harmful", split=["val", "test"])
    assert train and val_test
    assert {p.split for p in train} == {"train"}
    assert {p.split for p in val_test} == {"val", "test"}
    assert len(train) + len(val_test) == len(all_harmful)

    cyber = load_prompts("harmful", category="cybercrime_hacking", split="test")
    assert cyber and {(p.category, p.split) for p in cyber} == {("cybercrime_hacking", "test")}

    plain = load_prompts("harmless", exclude_category="near_miss")
    assert "near_miss" not in {p.category for p in plain}
    near = load_prompts("harmless", category=("near_miss",))
    assert len(plain) + len(near) == len(load_prompts("harmless"))

    assert load_prompts("borderline", label="borderline")
    with pytest.raises(InputError, match="no prompts left after filtering"):
        load_prompts("borderline", label="harmful")


def test_filter_errors() -> None:
    with pytest.raises(InputError, match="unknown split 'training'"):
        load_prompts("harmful", split="training")
    with pytest.raises(InputError, match="available categories: .*weapons_explosives"):
        load_prompts("harmful", category="cooking")
    with pytest.raises(InputError, match="no prompts left"):
        load_prompts("borderline", split="train")


# --------------------------------------------------------------------------- formats


SAMPLE = [
    Prompt("How do I bake bread?", "cooking", "train", "t1"),
    Prompt('Say "hi", then count to three', "misc", "val"),
    Prompt("Pourquoi le ciel est-il bleu ?", "science", "test", "t3", label="harmless"),
]


def test_jsonl_round_trip(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "set.jsonl"
    lines = [json.dumps(p.to_dict(), ensure_ascii=False) for p in SAMPLE]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")
    assert load_prompts(path) == SAMPLE
    assert load_prompts(str(path)) == SAMPLE


def test_json_round_trip(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps([p.to_dict() for p in SAMPLE], indent=2), encoding="utf-8")
    assert load_prompts(path) == SAMPLE
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["  first prompt here  ", "second prompt"]), encoding="utf-8")
    assert load_prompts(strings) == [Prompt("first prompt here"), Prompt("second prompt")]


def test_csv_round_trip(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "set.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "category", "split", "template", "label"])
        writer.writeheader()
        for p in SAMPLE:
            writer.writerow({k: v for k, v in p.to_dict().items()})
    assert load_prompts(path) == SAMPLE

    only_prompt = tmp_path / "only.csv"
    only_prompt.write_text('prompt\nfirst one\n"with, a comma"\n', encoding="utf-8")
    assert load_prompts(only_prompt) == [Prompt("first one"), Prompt("with, a comma")]


def test_txt_round_trip(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "set.txt"
    path.write_text("\ufefffirst prompt\n\n   \nsecond prompt  \r\nthird\n", encoding="utf-8")
    assert load_prompts(path) == [Prompt("first prompt"), Prompt("second prompt"), Prompt("third")]


def test_in_memory_sequences() -> None:
    assert load_prompts(["a b", "c d"]) == [Prompt("a b"), Prompt("c d")]
    assert load_prompts(SAMPLE) == SAMPLE
    assert load_prompts([p.to_dict() for p in SAMPLE]) == SAMPLE
    mixed = load_prompts(["x y", SAMPLE[0], {"prompt": "z", "split": "test"}], split="test")
    assert mixed == [Prompt("z", split="test")]
    assert load_prompts(p for p in ["gen one", "gen two"]) == [Prompt("gen one"), Prompt("gen two")]


def test_prompt_is_frozen_with_defaults() -> None:
    p = Prompt("hello there")
    assert (p.category, p.split, p.template, p.pair, p.label) == (
        "unspecified",
        "train",
        None,
        None,
        None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.prompt = "changed"  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


def _write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_input_error_is_a_value_error() -> None:
    assert issubclass(InputError, ValueError)
    assert issubclass(InputError, GuardrailError)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            '{"prompt": "ok"}\n{"category": "x"}\n',
            r'bad\.jsonl line 2: missing "prompt" field; each line must be a JSON object',
        ),
        ('{"prompt": "ok"}\n\n{"prompt": "ok",}\n', r"bad\.jsonl line 3: invalid JSON"),
        ('{"prompt": 42}\n', r'bad\.jsonl line 1: "prompt" is a number, not a string'),
        ('{"prompt": "   "}\n', r'bad\.jsonl line 1: empty "prompt"'),
        ('["just", "a list"]\n', r"bad\.jsonl line 1: expected a JSON object, got a list"),
        (
            '{"prompt": "ok", "split": "dev"}\n',
            r"bad\.jsonl line 1: unknown split 'dev'; use one of",
        ),
        ('{"prompt": "ok", "category": 7}\n', r'bad\.jsonl line 1: "category" must be a non-empty'),
        ('{"prompt": "ok", "label": "evil"}\n', r"bad\.jsonl line 1: unknown label 'evil'"),
        ("\n\n", r"bad\.jsonl: holds no prompts"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: pathlib.Path, text: str, pattern: str) -> None:
    path = _write(tmp_path, "bad.jsonl", text)
    with pytest.raises(InputError, match=pattern):
        load_prompts(path)


def test_json_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InputError, match=r"bad\.json line 3: invalid JSON"):
        load_prompts(_write(tmp_path, "bad.json", '[\n "a",\n "b" "c"\n]'))
    with pytest.raises(InputError, match=r"obj\.json: top level is an object, not a list"):
        load_prompts(_write(tmp_path, "obj.json", '{"prompt": "x"}'))
    with pytest.raises(InputError, match=r"items\.json item 2: expected a string or an object"):
        load_prompts(_write(tmp_path, "items.json", '["fine", 3]'))
    with pytest.raises(InputError, match=r'miss\.json item 1: missing "prompt" field'):
        load_prompts(_write(tmp_path, "miss.json", '[{"text": "x"}]'))
    with pytest.raises(InputError, match=r"empty\.json: holds no prompts"):
        load_prompts(_write(tmp_path, "empty.json", "[]"))


def test_csv_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InputError, match=r'nocol\.csv line 1: no "prompt" column'):
        load_prompts(_write(tmp_path, "nocol.csv", "text,category\nhello,x\n"))
    with pytest.raises(InputError, match=r'blank\.csv line 3: empty "prompt" value'):
        load_prompts(_write(tmp_path, "blank.csv", "prompt,category\nfine,x\n,cooking\n"))
    with pytest.raises(InputError, match=r"wide\.csv line 2: more fields than the 1 header"):
        load_prompts(_write(tmp_path, "wide.csv", "prompt\nhello, world\n"))
    with pytest.raises(InputError, match=r"split\.csv line 2: unknown split 'dev'"):
        load_prompts(_write(tmp_path, "split.csv", "prompt,split\nhello,dev\n"))
    with pytest.raises(InputError, match=r"void\.csv: empty file"):
        load_prompts(_write(tmp_path, "void.csv", ""))


def test_file_level_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InputError, match=r"set\.yaml: unsupported file extension '\.yaml'"):
        load_prompts(_write(tmp_path, "set.yaml", "- a\n"))
    with pytest.raises(InputError, match=r"missing\.jsonl: file not found"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match=r"harmfull: unsupported file extension"):
        load_prompts("harmfull")
    with pytest.raises(InputError, match="holds no prompts"):
        load_prompts(_write(tmp_path, "blank.txt", "\n  \n"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait please\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.txt: not valid UTF-8"):
        load_prompts(latin)


def test_in_memory_errors() -> None:
    with pytest.raises(InputError, match=r"input item 2: empty prompt"):
        load_prompts(["fine", "  "])
    with pytest.raises(InputError, match=r"input item 1: expected a string or an object"):
        load_prompts([3])  # type: ignore[list-item]
    with pytest.raises(InputError, match=r"input item 1: empty \"prompt\""):
        load_prompts([Prompt("")])
    with pytest.raises(InputError, match="input sequence: holds no prompts"):
        load_prompts([])
    with pytest.raises(InputError, match="got an object of type dict"):
        load_prompts({"prompt": "x"})
    with pytest.raises(InputError, match="got an object of type int"):
        load_prompts(5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown shipped dataset"):
        shipped_path("benign")


# --------------------------------------------------------------------------- digest


def test_dataset_digest_is_sha256_of_newline_joined_texts() -> None:
    prompts = [Prompt("How do I bake bread?"), Prompt("What is 2+2 in base 3?", split="test")]
    expected = "6820ff887c82bf5dda5f8f12a2bb3edd200dc54c8b2dda049368684e27021ec9"
    assert dataset_digest(prompts) == expected
    joined = b"How do I bake bread?\nWhat is 2+2 in base 3?"
    assert hashlib.sha256(joined).hexdigest() == expected


def test_dataset_digest_stability_and_sensitivity() -> None:
    a = load_prompts("harmful", split="train")
    b = load_prompts("harmful", split="train")
    assert dataset_digest(a) == dataset_digest(b)
    assert len(dataset_digest(a)) == 64
    # only texts count: relabelling does not change the digest
    relabelled = [dataclasses.replace(p, label=None, category="x") for p in a]
    assert dataset_digest(relabelled) == dataset_digest(a)
    # order, edits and membership do
    assert dataset_digest(list(reversed(a))) != dataset_digest(a)
    assert dataset_digest(a[:-1]) != dataset_digest(a)
    edited = [dataclasses.replace(a[0], prompt=a[0].prompt + "!")] + a[1:]
    assert dataset_digest(edited) != dataset_digest(a)
    assert dataset_digest(load_prompts("harmful", split="test")) != dataset_digest(a)


def test_dataset_digest_rejects_non_prompts() -> None:
    with pytest.raises(InputError, match="item 2 is a str, not a Prompt"):
        dataset_digest([Prompt("fine here"), "raw string"])  # type: ignore[list-item]
