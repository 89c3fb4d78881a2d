"""The calibration report: one self-contained HTML file with embedded PNG plots.

Everything in it comes from the bundle's calibration record, so a report can be
rebuilt from any calibrated bundle (``guardrail policy show DIR --report r.html``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from guardrail.errors import GuardrailError
from guardrail.policy import PolicyBundle


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - dev/report extras install it
        raise GuardrailError(
            "the calibration report needs matplotlib: pip install 'mars-guardrail[report]'"
        ) from exc
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def sweep_plot(record: dict[str, Any]) -> Any:
    """Refusal-score gain per candidate layer, harmful vs. each benign set; AUROC on a twin axis."""
    plt = _pyplot()
    sweep = record["sweep"]
    layers = [r["layer"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(layers, [r["gain_harmful"] for r in sweep], "o-", color="tab:red", label="harmful text")
    ax.plot(
        layers, [r["gain_harmless"] for r in sweep], "o-", color="tab:green", label="benign text"
    )
    for modality, colour in zip(
        record.get("modalities", []), ("tab:blue", "tab:purple"), strict=False
    ):
        ax.plot(
            layers,
            [r[f"gain_{modality}"] for r in sweep],
            "o--",
            color=colour,
            label=f"benign {modality}",
        )
    ax.axvline(
        record["chosen_layer"],
        color="black",
        linestyle=":",
        label=f"chosen l* = {record['chosen_layer']}",
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("refusal log-odds gain under MARS")
    twin = ax.twinx()
    twin.plot(
        layers,
        [r["auroc_val"] for r in sweep],
        "s:",
        color="gray",
        alpha=0.7,
        label="AUROC of s (val)",
    )
    twin.set_ylabel("AUROC of s, harmful vs harmless (val)")
    twin.set_ylim(0.4, 1.0)
    lines, labels = ax.get_legend_handles_labels()
    l2, lab2 = twin.get_legend_handles_labels()
    ax.legend(lines + l2, labels + lab2, fontsize=8, loc="upper left")
    ax.set_title("Layer sweep")
    return fig


def histogram_plot(record: dict[str, Any]) -> Any:
    """Histograms of the score s: harmful, harmless, and neutral multimodal before/after re-centring."""
    plt = _pyplot()
    scores = record["validation_scores"]
    mods = record.get("modalities", [])
    fig, axes = plt.subplots(1, 1 + len(mods), figsize=(5 * (1 + len(mods)), 3.6), squeeze=False)
    tau = record["chosen"]["tau"]
    ax = axes[0][0]
    ax.hist(scores["harmful"], bins=25, alpha=0.6, color="tab:red", label="harmful text")
    ax.hist(scores["harmless"], bins=25, alpha=0.6, color="tab:green", label="harmless text")
    ax.axvline(tau, color="black", linestyle=":", label=f"gate tau = {tau:.2f}")
    ax.set_title("text")
    ax.set_xlabel("score s")
    ax.legend(fontsize=8)
    for k, modality in enumerate(mods, start=1):
        ax = axes[0][k]
        ax.hist(scores["harmless"], bins=25, alpha=0.4, color="tab:green", label="harmless text")
        ax.hist(
            scores[f"{modality}_raw"],
            bins=25,
            alpha=0.6,
            color="tab:orange",
            label=f"neutral {modality}, raw",
        )
        ax.hist(
            scores[modality],
            bins=25,
            alpha=0.6,
            color="tab:blue",
            label=f"neutral {modality}, re-centred",
        )
        gate = record["chosen"].get("tau_modalities", {}).get(modality, tau)
        ax.axvline(gate, color="black", linestyle=":", label=f"{modality} gate = {gate:.2f}")
        ax.set_title(f"{modality}: before / after re-centring")
        ax.set_xlabel("score s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
tr.chosen { background: #fff3c4; font-weight: bold; }
img { max-width: 100%; }
.summary td:first-child { text-align: left; }
"""
"""The style of the project's HTML reports (calibration, ``guardrail eval``)."""


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page: ``title`` (escaped here) and ``body`` (HTML)."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
{body}</body></html>
"""


def _table(
    rows: list[dict[str, Any]], columns: list[str], highlight: tuple[str, Any] | None = None
) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cls = ' class="chosen"' if highlight and row.get(highlight[0]) == highlight[1] else ""
        cells = "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_report(bundle: PolicyBundle) -> str:
    """The report as an HTML string."""
    record = bundle.manifest.calibration
    if not record.get("sweep"):
        raise GuardrailError(f"policy {bundle.ref} has no calibration record to report on")
    params = bundle.parameters
    mods = record.get("modalities", [])
    sweep_cols = [
        "layer",
        "gain_harmful",
        "gain_harmless",
        *[f"gain_{m}" for m in mods],
        "benign_kl",
        "auroc_val",
        "tau",
        "objective",
        "feasible",
    ]
    grid_cols = [
        "lam",
        "kappa",
        "gain_harmful",
        "benign_gain",
        "benign_kl",
        "objective",
        "feasible",
    ]
    chosen = record["chosen"]
    datasets = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['size']}</td><td><code>{v['digest'][:16]}</code></td></tr>"
        for k, v in record.get("datasets", {}).items()
    )
    targets = record.get("targets", {})
    return html_page(
        f"MARS calibration report: {bundle.ref}",
        f"""<h1>MARS calibration report</h1>
<p>Policy <b>{html.escape(bundle.ref)}</b> for <b>{html.escape(bundle.manifest.model.architecture)}</b>
({bundle.manifest.model.num_layers} layers, hidden size {bundle.manifest.model.hidden_size}),
built with mars-guardrail {html.escape(str(record.get("project_version")))}.</p>
<h2>Chosen parameters</h2>
<table class="summary">
<tr><td>layer l*</td><td>{bundle.layer}</td></tr>
<tr><td>gate tau</td><td>{params.tau:.4g}</td></tr>
{"".join(f"<tr><td>{html.escape(m)} gate</td><td>{v:.4g}</td></tr>" for m, v in sorted(params.tau_modalities.items()))}
<tr><td>lam</td><td>{params.lam:.4g}</td></tr>
<tr><td>kappa (trust region rho = kappa * g)</td><td>{params.kappa:.4g}</td></tr>
<tr><td>gap g</td><td>{bundle.g:.4g}</td></tr>
<tr><td>re-centring</td><td>{html.escape(params.recenter)}</td></tr>
<tr><td>re-centred activation written back</td><td>{html.escape(str(params.apply_recentering_to_activation))}</td></tr>
<tr><td>modalities</td><td>{html.escape(", ".join(mods) or "text only")}</td></tr>
<tr><td>target benign trigger rate</td><td>{targets.get("benign_trigger_rate")}</td></tr>
<tr><td>benign KL bound (nats)</td><td>{targets.get("kl_bound")}</td></tr>
</table>
<p>Why: layer {chosen["layer"]} maximises the harmful refusal-score gain minus the benign gain among
layers whose benign first-token KL stays under the bound (ties within
{targets.get("objective_tolerance")} go to the best validation AUROC of s); tau lets the gate
fire on at most {targets.get("benign_trigger_rate")} of benign validation inputs in every set;
lam and kappa are the best of the grid below.</p>
<h2>Layer sweep</h2>
<img alt="layer sweep" src="data:image/png;base64,{_png(sweep_plot(record))}">
{_table(record["sweep"], sweep_cols, ("layer", bundle.layer))}
<h2>Score histograms (validation)</h2>
<img alt="score histograms" src="data:image/png;base64,{_png(histogram_plot(record))}">
<h2>Strength grid at l* = {bundle.layer}</h2>
{_table(record["grid"], grid_cols)}
<h2>Data</h2>
<table class="summary"><tr><th>set</th><th>size</th><th>sha256</th></tr>{datasets}</table>
<p>Seed {record.get("seed")}; neutral media {html.escape(str(record.get("media")))}.</p>
""",
    )


def write_report(bundle: PolicyBundle, path: str | os.PathLike[str]) -> Path:
    """Write the HTML report of ``bundle`` to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_report(bundle), encoding="utf-8")
    return target
