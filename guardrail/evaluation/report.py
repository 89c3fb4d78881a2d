"""The evaluation report: records, per-category rates with 95 % Wilson intervals,
a text table, JSON, an HTML page and a bar chart.

Every rate is a :class:`Rate` (``k`` of ``n``) with its Wilson score interval
(:func:`guardrail.calibration.metrics.wilson_interval`). The HTML page uses the
calibration report's style and helpers (:mod:`guardrail.calibration.report`).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardrail.calibration.metrics import wilson_interval

__all__ = ["LABELS", "EvalReport", "Rate", "Record"]

LABELS = ("harmful", "harmless", "borderline")


@dataclass(frozen=True)
class Rate:
    """A proportion with its 95 % Wilson interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.k, self.n)
        return {"rate": self.value, "k": self.k, "n": self.n, "ci95": [lo, hi]}


@dataclass
class Record:
    """One evaluated item in one modality."""

    prompt: str
    label: str
    category: str
    modality: str
    refused_plain: bool
    refused_guarded: bool
    intervened: bool
    score: float | None
    identical: bool
    prefix_agreement: float
    reference: str | None = None
    task_plain: bool | None = None
    task_guarded: bool | None = None
    plain_text: str = ""
    guarded_text: str = ""
    logodds_plain: float | None = None
    logodds_guarded: float | None = None
    """The first-token refusal log-odds of each answer (``result.refusal_logodds``)."""


@dataclass
class EvalReport:
    """Records plus the aggregated metrics (see :meth:`summary`)."""

    records: list[Record] = field(default_factory=list)
    policy: str | None = None
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """How the records were made (tokens, instructions, formats, limit, ...)."""

    def _group(self, **match: str) -> list[Record]:
        return [r for r in self.records if all(getattr(r, k) == v for k, v in match.items())]

    def cell(self, modality: str, label: str, category: str | None = None) -> dict[str, Any]:
        rows = self._group(
            modality=modality, label=label, **({"category": category} if category else {})
        )
        out: dict[str, Any] = {
            "n": len(rows),
            "refusal_unguarded": Rate(sum(r.refused_plain for r in rows), len(rows)).to_dict(),
            "refusal_guarded": Rate(sum(r.refused_guarded for r in rows), len(rows)).to_dict(),
            "intervention": Rate(sum(r.intervened for r in rows), len(rows)).to_dict(),
        }
        if label != "harmful" and rows:
            out["utility"] = {
                "identical": Rate(sum(r.identical for r in rows), len(rows)).to_dict(),
                "mean_prefix_agreement": sum(r.prefix_agreement for r in rows) / len(rows),
            }
        with_ref = [r for r in rows if r.reference is not None]
        if with_ref:
            out["task_score"] = {
                "unguarded": Rate(
                    sum(bool(r.task_plain) for r in with_ref), len(with_ref)
                ).to_dict(),
                "guarded": Rate(
                    sum(bool(r.task_guarded) for r in with_ref), len(with_ref)
                ).to_dict(),
            }
        return out

    def summary(self) -> dict[str, Any]:
        """Nested dict: modality -> label -> metrics (with ``by_category``)."""
        out: dict[str, Any] = {"policy": self.policy, "model": self.model, "modalities": {}}
        for modality in sorted({r.modality for r in self.records}):
            per_label: dict[str, Any] = {}
            for label in LABELS:
                rows = self._group(modality=modality, label=label)
                if not rows:
                    continue
                metrics = self.cell(modality, label)
                metrics["by_category"] = {
                    c: self.cell(modality, label, c) for c in sorted({r.category for r in rows})
                }
                per_label[label] = metrics
            out["modalities"][modality] = per_label
        return out

    def rows(self, by_category: bool = False) -> list[dict[str, Any]]:
        """One row per modality and label (and category), for the tables."""
        out = []
        for modality, labels in self.summary()["modalities"].items():
            for label, metrics in labels.items():
                cells = metrics["by_category"].items() if by_category else [(None, metrics)]
                for category, m in cells:
                    ident = m.get("utility", {}).get("identical")
                    row = {"modality": modality, "label": label, "n": m["n"]}
                    if by_category:
                        row["category"] = category
                    row.update(
                        {
                            "refused (plain)": _pct(m["refusal_unguarded"]),
                            "refused (MARS)": _pct(m["refusal_guarded"]),
                            "gate": _pct(m["intervention"]),
                            "identical": "" if ident is None else _pct(ident),
                        }
                    )
                    out.append(row)
        return out

    def table(self, by_category: bool = False) -> str:
        """A plain-text table: per modality and label, or per category with
        ``by_category``; rates with their 95 % Wilson intervals."""
        rows = self.rows(by_category)
        if not rows:
            return "(no records)"
        columns = list(rows[0])
        minimum = {"modality": 9, "label": 11}  # the columns line up with earlier tables
        widths = {
            c: max(len(c), minimum.get(c, 0), *(len(str(r[c])) for r in rows)) for c in columns
        }
        left = {"modality", "label", "category"}

        def line(values: dict[str, Any]) -> str:
            return " ".join(
                f"{str(values[c]):{'<' if c in left else '>'}{widths[c]}}" for c in columns
            ).rstrip()

        return "\n".join([line({c: c for c in columns}), *(line(r) for r in rows)])

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the summary, the settings and every record as JSON."""
        target = Path(path)
        data = {
            "summary": self.summary(),
            "settings": self.settings,
            "records": [r.__dict__ for r in self.records],
        }
        target.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        return target

    def render_html(self, plot: bool = True) -> str:
        """A self-contained HTML page: the headline and per-category tables, the
        settings and (when matplotlib is installed and ``plot``) the bar chart."""
        from guardrail.calibration.report import _png, _table, html_page

        head = self.rows()
        per_category = self.rows(by_category=True)
        chart = ""
        if plot and self.records:
            chart = f'<img alt="refusal rates" src="data:image/png;base64,{_png(self.figure())}">'
        settings = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in self.settings.items()
        )
        title = f"guardrail eval: {self.policy or 'no policy'}"
        return html_page(
            title,
            f"""<h1>{html.escape(title)}</h1>
<p>Model <b>{html.escape(str(self.model))}</b>, {len(self.records)} answers per arm. Rates are
refusals judged on the answers, unguarded and under MARS, and the share of requests the
gate opened on, each with its 95 % Wilson interval; "identical" is the share of benign
answers token-identical to the unguarded ones.</p>
{chart}
<h2>Per modality and label</h2>
{_table(head, list(head[0]) if head else [])}
<h2>Per category</h2>
{_table(per_category, list(per_category[0]) if per_category else [])}
<h2>Settings</h2>
<table class="summary">{settings}</table>
""",
        )

    def to_html(self, path: str | os.PathLike[str], plot: bool = True) -> Path:
        """Write :meth:`render_html` to ``path``."""
        target = Path(path)
        target.write_text(self.render_html(plot), encoding="utf-8")
        return target

    def figure(self) -> Any:
        """Bar chart of refusal rates, unguarded vs guarded, per modality and label, with CIs."""
        from guardrail.calibration.report import _pyplot

        plt = _pyplot()
        summary = self.summary()["modalities"]
        cells = [
            (m, label, metrics)
            for m, labels in summary.items()
            for label, metrics in labels.items()
        ]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cells)), 4))
        xs = range(len(cells))
        for offset, key, colour, name in (
            (-0.2, "refusal_unguarded", "tab:gray", "unguarded"),
            (0.2, "refusal_guarded", "tab:red", "MARS"),
        ):
            values = [c[2][key]["rate"] for c in cells]
            errs = [
                [v - c[2][key]["ci95"][0] for v, c in zip(values, cells, strict=True)],
                [c[2][key]["ci95"][1] - v for v, c in zip(values, cells, strict=True)],
            ]
            ax.bar(
                [x + offset for x in xs],
                values,
                width=0.4,
                color=colour,
                label=name,
                yerr=errs,
                capsize=3,
            )
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{label}\n{m}" for m, label, _ in cells], fontsize=8)
        ax.set_ylabel("refusal rate")
        ax.set_ylim(0, 1.05)
        ax.legend()
        ax.set_title(f"Refusal rates: {self.policy or 'no policy'}")
        return fig

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`figure` as a PNG."""
        from guardrail.calibration.report import _pyplot

        fig = self.figure()
        target = Path(path)
        fig.savefig(target, dpi=110, bbox_inches="tight")
        _pyplot().close(fig)
        return target


def _pct(rate: dict[str, Any]) -> str:
    """``74.0% [58-85]``: the rate and its 95 % Wilson interval, in percent."""
    if not rate["n"]:
        return "-"
    lo, hi = rate["ci95"]
    return f"{rate['rate'] * 100:.1f}% [{lo * 100:.0f}-{hi * 100:.0f}]"
