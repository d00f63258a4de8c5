"""The HTML report: ROC curves and AUROC per anomaly category, score histograms against the threshold,
the daemon's alerts and the temporal analysis (Eq. 8.6 localization) of the top cycles, in the style
of the voraus-AD thesis figures.

Everything lands in ONE self-contained HTML file: inline CSS, figures as base64 PNG data URIs, no
scripts and no external references. Figures are drawn on the Agg canvas through matplotlib's object
API (no pyplot, so no global figure state and no GUI backend), at about 100 dpi to keep the file small.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike, NDArray

from daemon.layout import ALERT_MEASUREMENT
from flows.metrics import CategoryAUROC, roc_curve
from flows.preprocess import window_starts

DPI = 100
NORMAL_COLOR = "#7f7f7f"
THRESHOLD_COLOR = "#d62728"


@dataclass(frozen=True)
class ReportHeader:
    model: str
    data: str
    cycles: int  # test cycles scored
    normals: int
    anomalies: int
    threshold: float
    target_fpr: float
    created: datetime
    details: Mapping[str, str] = field(default_factory=dict)  # further rows (mode, rate, signals, ...)
    unit: str = "cycles"  # what was scored: "cycles" here, "images" in the image report
    data_label: str = "data file"
    classes: tuple[str, str] = ("normal", "anomalous")  # the image report says ("good", "defect")


@dataclass(frozen=True)
class TemporalCase:
    """One cycle's temporal analysis: where in time the score comes from and which signals drive it."""

    sample: int
    category: str
    variant: str
    score: float  # raw NLL score of the cycle (window mode: of its highest-scoring window)
    normalized: float  # threshold = 1
    rate_hz: float
    per_time: NDArray[np.float64]  # localization over the analysed span (cycle, or best window)
    start: int  # index in the cycle where per_time begins (0 in cycle mode)
    traces: NDArray[np.float32]  # (T_i, k) standardized traces of the top signals over the whole cycle
    top_signals: list[tuple[str, float]]  # (signal, share of the total contribution), best first
    source: str = ""  # why this cycle is shown, e.g. "alert 2 (robot1)"
    window: bool = False  # per_time covers the cycle's highest-scoring window (window-mode model)

    @property
    def peak_index(self) -> int:
        """Time step in the cycle where the localization peaks."""
        return self.start + int(np.argmax(self.per_time)) if len(self.per_time) else self.start


@dataclass(frozen=True)
class AlertRecord:
    """An alert line of the daemon's JSON-lines file sink (see daemon.pipeline.alert_point)."""

    robot: str
    start_ns: int
    peak_cycle: int
    peak_score: float  # normalized: threshold = 1
    end_ns: int | None = None
    duration_s: float | None = None
    event_time_ns: int | None = None
    windows: int | None = None
    cycles: str = ""
    top_signals: str = ""


# ---------------------------------------------------------------- inputs


def read_alerts(path: Path) -> list[AlertRecord]:
    """The alerts in a JSON-lines file written by the daemon's file sink; other lines are skipped.

    The daemon writes a line at each event of an alert's life (firing, updates, resolved); the latest
    line of each alert (by `alert_id`, else robot and start) stands for it, in order of first sight.

    Raises ValueError naming the line for a line that is not JSON or an alert without its peak.
    """
    alerts: dict[tuple[str, ...], AlertRecord] = {}
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({err.msg})") from None
            if not isinstance(record, dict) or record.get("measurement") != ALERT_MEASUREMENT:
                continue
            key = (
                (str(record["alert_id"]),)
                if "alert_id" in record
                else (
                    str(record.get("robot", "")),
                    str(record.get("time_ns")),
                )
            )
            try:
                alerts[key] = AlertRecord(
                    robot=str(record.get("robot", "")),
                    start_ns=int(record["time_ns"]),
                    peak_cycle=int(record["peak_cycle"]),
                    peak_score=float(record["peak_score"]),
                    end_ns=_optional(int, record.get("end_ns")),
                    duration_s=_optional(float, record.get("duration_s")),
                    event_time_ns=_optional(int, record.get("event_time_ns")),
                    windows=_optional(int, record.get("windows")),
                    cycles=str(record.get("cycles", "")),
                    top_signals=str(record.get("top_signals", "")),
                )
            except KeyError as err:
                raise ValueError(f"{path}:{lineno}: alert without {err.args[0]!r}") from None
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: malformed alert ({err})") from None
    return list(alerts.values())


def _optional(kind: type[Any], value: Any) -> Any:
    return None if value is None else kind(value)


def top_anomalous(scores: ArrayLike, anomaly: ArrayLike, n: int) -> list[int]:
    """Indices of the `n` highest-scoring anomalous cycles, highest first (ties: lower index first)."""
    s = np.asarray(scores, dtype=float)
    a = np.asarray(anomaly, dtype=bool)
    candidates = np.flatnonzero(a)
    order = candidates[np.argsort(-s[candidates], kind="stable")]
    return [int(i) for i in order[: max(n, 0)]]


def alert_cycles(alerts: Sequence[AlertRecord], samples: Sequence[int], n: int) -> list[tuple[int, int]]:
    """(alert number, cycle index) for the `n` highest-peaking alerts whose peak cycle is among
    `samples`, one per cycle. Alert numbers are 1-based positions in `alerts` (as in the table)."""
    where = {int(s): i for i, s in enumerate(samples)}
    ranked = sorted(range(len(alerts)), key=lambda k: -alerts[k].peak_score)
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for k in ranked:
        index = where.get(alerts[k].peak_cycle)
        if index is None or index in seen:
            continue
        seen.add(index)
        out.append((k + 1, index))
        if len(out) >= n:
            break
    return out


def temporal_case(
    scorer: Any,
    signals: NDArray[np.floating[Any]],
    *,
    sample: int,
    category: str,
    variant: str = "",
    top: int = 3,
    source: str = "",
) -> TemporalCase:
    """Score and localize one raw (T_i, S) cycle with a `flows.scorer.Scorer`.

    Cycle mode: the whole (padded or truncated) cycle. Window mode: its highest-scoring window, the one
    the daemon would alert on.
    """
    card = scorer.card
    x = np.asarray(signals)
    if card.mode == "window":
        windows = scorer.prepare_stream(x)
        starts = list(window_starts(len(x), card.window, card.hop))
        steps = card.window
        if len(windows) == 0:  # shorter than one window: padded, as daemon.commands.evaluate scores it
            padded = np.concatenate([x, np.repeat(x[-1:], card.window, 0)])
            windows, starts, steps = scorer.prepare_stream(padded)[:1], [0], len(x)
        scores = scorer.score(windows)
        best = int(np.argmax(scores.raw))
        prepared, start = windows[best : best + 1], starts[best]
    else:
        prepared = scorer.prepare_cycle(x)[None]
        scores = scorer.score(prepared)
        best, start, steps = 0, 0, min(len(x), card.time_steps)
    loc = scorer.localize(prepared, top=top)
    names = [name for name, _ in loc.top_signals[0]]
    columns = [card.signals.index(name) for name in names]
    return TemporalCase(
        sample=int(sample),
        category=category,
        variant=variant,
        score=float(scores.raw[best]),
        normalized=float(scores.normalized[best]),
        rate_hz=float(card.rate_hz),
        per_time=np.asarray(loc.per_time[0][:steps], dtype=np.float64),
        start=int(start),
        traces=card.scaler.transform(x)[:, columns],
        top_signals=list(loc.top_signals[0]),
        source=source,
        window=card.mode == "window",
    )


# ---------------------------------------------------------------- figures


def png_data_uri(fig: Figure, *, colors: int | None = 256) -> str:
    """Render a figure to a PNG data URI (Agg canvas) and release it.

    `colors`: palette size; None keeps full RGB, for figures with photographs and smooth colour maps,
    which a palette turns into visible bands."""
    from PIL import Image  # a dependency of matplotlib

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    fig.clear()
    # a 256-colour palette looks the same for line plots and makes the PNGs about 3x smaller
    buffer = io.BytesIO()
    picture = rgb if colors is None else rgb.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    picture.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def roc_figure(
    scores: ArrayLike,
    categories: Sequence[str],
    anomaly: ArrayLike,
    result: CategoryAUROC,
    *,
    unit: str = "cycles",
    group: str = "category",
    title: str = "ROC per anomaly category",
) -> Figure:
    """ROC curve of each anomaly category against all normal cycles, AUROC in the legend.

    `unit`, `group` and `title` name what is scored and grouped, so the image report (images per defect
    type) draws the same figure with its own words."""
    s = np.asarray(scores, dtype=float)
    a = np.asarray(anomaly, dtype=bool)
    cats = np.asarray(categories, dtype=object)
    fig = Figure(figsize=(8.5, 6.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", "-.", ":"]
    for i, (category, color) in enumerate(
        zip(result.per_category, _colors(len(result.per_category)), strict=True)
    ):
        fpr, tpr, _ = roc_curve(s[~a], s[a & (cats == category)])
        ax.plot(
            fpr,
            tpr,
            drawstyle="steps-post",
            color=color,
            linestyle=styles[(i // 10) % len(styles)],
            linewidth=1.6,
            label=f"{category} ({100 * result.per_category[category]:.1f})",
        )
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle=":", label="chance (50.0)")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel=f"false-positive rate (normal test {unit})",
        ylabel=f"true-positive rate ({unit} of the {group})",
        title=f"{title} (mean AUROC {100 * result.mean:.1f} %)",
    )
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(title=f"{group} (AUROC %)", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    return fig


def histogram_figure(
    scores: ArrayLike,
    categories: Sequence[str],
    anomaly: ArrayLike,
    threshold: float,
    order: Sequence[str] | None = None,
    *,
    unit: str = "cycles",
    score_label: str = "anomaly score (NLL)",
) -> Figure:
    """Small multiples: normal test cycles against all anomalies, then against each category, with the
    threshold as a vertical line. Scores beyond the 95th percentile are gathered in the last bin.
    `unit` and `score_label` say what was scored and how (the image report: images, AST map score)."""
    s = np.asarray(scores, dtype=float)
    a = np.asarray(anomaly, dtype=bool)
    cats = np.asarray(categories, dtype=object)
    names = list(order) if order is not None else list(dict.fromkeys(cats[a]))
    panels = [("all anomalies", a), *[(c, a & (cats == c)) for c in names]]
    normal = s[~a]
    lo = float(min(s.min(), threshold))
    hi = float(max(np.quantile(s, 0.95), normal.max(), threshold))
    if hi <= lo:
        hi = lo + 1.0
    clipped = bool((s > hi).any())
    pad = 0.02 * (hi - lo)
    bins = np.linspace(lo - pad, hi + pad, 31)
    shown = np.clip(s, bins[0], bins[-1])
    cols = 4 if len(panels) > 6 else min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    colors = ["#17becf", *_colors(len(names))]  # "all anomalies" in a colour no category gets
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        title, mask = panels[k]
        ax.hist(
            shown[~a], bins=bins, density=True, color=NORMAL_COLOR, alpha=0.55, label=f"normal ({(~a).sum()})"
        )
        ax.hist(
            shown[mask],
            bins=bins,
            density=True,
            color=colors[k],
            alpha=0.65,
            label=f"anomalous ({mask.sum()})",
        )
        ax.axvline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2, label="threshold")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
        if k % cols == 0:
            ax.set_ylabel("density", fontsize=8)
        if k >= len(panels) - cols:  # the lowest panel of its column: label the shared x axis
            ax.set_xlabel(score_label, fontsize=8)
            ax.tick_params(labelbottom=True)
    note = f"; last bin holds scores > {_num(hi)}" if clipped else ""
    fig.suptitle(f"Score distributions, normal vs anomalous test {unit} (threshold {_num(threshold)}{note})")
    return fig


def temporal_figure(case: TemporalCase) -> Figure:
    """(a) localization over time and (b) the top signals' standardized traces, peak marked in both."""
    fig = Figure(figsize=(9.5, 5.6), dpi=DPI, layout="constrained")
    ax_loc, ax_sig = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.6])
    dt = 1.0 / case.rate_hz
    t_loc = (case.start + np.arange(len(case.per_time))) * dt
    peak_t = case.peak_index * dt
    ax_loc.fill_between(t_loc, case.per_time, color="#ff7f0e", alpha=0.35, linewidth=0)
    ax_loc.plot(t_loc, case.per_time, color="#ff7f0e", linewidth=1.2)
    ax_loc.axvline(
        peak_t, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2, label=f"peak at {peak_t:.2f} s"
    )
    ax_loc.set_ylabel("contribution\nΣ|∂score/∂x|")
    ax_loc.set_title("(a) anomaly contribution over time (localization)", fontsize=10, loc="left")
    ax_loc.legend(fontsize=8, loc="upper right")
    ax_loc.grid(alpha=0.3)
    t_sig = np.arange(len(case.traces)) * dt
    for j, (name, share) in enumerate(case.top_signals[: case.traces.shape[1]]):
        ax_sig.plot(t_sig, case.traces[:, j], linewidth=1.2, label=f"{name} ({share:.1%})")
    ax_sig.axvline(peak_t, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2)
    if len(case.per_time) and (case.start > 0 or len(case.per_time) < len(case.traces)):
        span = "highest-scoring window" if case.window else "scored part of the cycle"
        ax_sig.axvspan(t_loc[0], t_loc[-1], color="#ff7f0e", alpha=0.08, label=span)
    ax_sig.set(xlabel="time in cycle (s)", ylabel="standardized value")
    ax_sig.set_title("(b) top contributing signals", fontsize=10, loc="left")
    ax_sig.legend(fontsize=8, loc="upper right")
    ax_sig.grid(alpha=0.3)
    fig.suptitle(
        f"{case.category} · cycle {case.sample} · score {_num(case.score)} "
        f"(normalized {case.normalized:.2f}, threshold = 1)"
    )
    return fig


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mean td{font-weight:bold;border-top:2px solid #888}
table.meta th{background:#f4f4f4;font-weight:600}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}.note{color:#666;font-size:.9em}
"""


def _num(x: float) -> str:
    return f"{x:.5g}" if abs(x) < 1e5 else f"{x:.0f}"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _utc(ns: int | None) -> str:
    if ns is None:
        return ""
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{caption}</figcaption></figure>'


def header_html(header: ReportHeader) -> str:
    rows = [
        ("model", header.model),
        (header.data_label, header.data),
        (
            f"test {header.unit}",
            f"{header.cycles} ({header.normals} {header.classes[0]}, {header.anomalies} {header.classes[1]})",
        ),
        ("threshold", f"{header.threshold:.6g} (target false-positive rate {header.target_fpr:g})"),
        *header.details.items(),
        ("created", header.created.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="meta">{body}</table>'


def auroc_table_html(
    result: CategoryAUROC,
    scores: ArrayLike,
    categories: Sequence[str],
    anomaly: ArrayLike,
    threshold: float,
) -> str:
    """AUROC per category (percent, full precision in data-auroc) and the share flagged at the threshold."""
    s = np.asarray(scores, dtype=float)
    a = np.asarray(anomaly, dtype=bool)
    cats = np.asarray(categories, dtype=object)
    flagged = s > threshold
    rows = []
    for category, auroc in result.per_category.items():
        mask = a & (cats == category)
        rows.append(
            f'<tr data-category="{_e(category)}"><td>{_e(category)}</td>'
            f'<td class="num">{result.counts[category]}</td>'
            f'<td class="num" data-auroc="{auroc!r}">{100 * auroc:.1f}</td>'
            f'<td class="num">{flagged[mask].mean():.0%}</td></tr>'
        )
    rows.append(
        f'<tr class="mean"><td>mean</td><td class="num">{sum(result.counts.values())}</td>'
        f'<td class="num" data-auroc="{result.mean!r}">{100 * result.mean:.1f}</td>'
        f'<td class="num">{flagged[a].mean():.0%}</td></tr>'
    )
    head = (
        '<tr><th>category</th><th class="num">anomalous cycles</th><th class="num">AUROC %</th>'
        '<th class="num">flagged at threshold</th></tr>'
    )
    return (
        f'<table class="auroc" id="auroc">{head}{"".join(rows)}</table>'
        f'<p class="note">Each category against all {result.normals} normal test cycles (paper protocol); '
        f"{flagged[~a].mean():.0%} of the normal test cycles are over the threshold. The mean is "
        "unweighted over categories.</p>"
    )


def alerts_table_html(alerts: Sequence[AlertRecord], cycle_category: Mapping[int, str]) -> str:
    if not alerts:
        return '<p class="note">The alerts file holds no alerts.</p>'
    head = (
        '<tr><th class="num">#</th><th>robot</th><th>start (UTC)</th><th class="num">duration s</th>'
        '<th class="num">peak cycle</th><th>category</th><th class="num">peak score (× threshold)</th>'
        '<th>event time (UTC)</th><th class="num">windows</th><th>top signals</th></tr>'
    )
    rows = []
    for k, alert in enumerate(alerts, 1):
        category = cycle_category.get(alert.peak_cycle, "not in this file's test split")
        duration = "" if alert.duration_s is None else f"{alert.duration_s:.2f}"
        windows = "" if alert.windows is None else str(alert.windows)
        rows.append(
            f'<tr class="alert" data-peak-cycle="{alert.peak_cycle}"><td class="num">{k}</td>'
            f'<td>{_e(alert.robot)}</td><td>{_utc(alert.start_ns)}</td><td class="num">{duration}</td>'
            f'<td class="num">{alert.peak_cycle}</td><td>{_e(category)}</td>'
            f'<td class="num">{alert.peak_score:.2f}</td><td>{_utc(alert.event_time_ns)}</td>'
            f'<td class="num">{windows}</td><td>{_e(alert.top_signals)}</td></tr>'
        )
    return f'<table class="alerts" id="alerts">{head}{"".join(rows)}</table>'


def build_report(
    header: ReportHeader,
    *,
    scores: ArrayLike,
    categories: Sequence[str],
    anomaly: ArrayLike,
    samples: Sequence[int],
    result: CategoryAUROC,
    cases: Sequence[TemporalCase],
    alerts: Sequence[AlertRecord] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The whole report as one HTML document (figures embedded)."""
    s = np.asarray(scores, dtype=float)
    a = np.asarray(anomaly, dtype=bool)
    roc = png_data_uri(roc_figure(s, categories, a, result))
    hist = png_data_uri(histogram_figure(s, categories, a, header.threshold, order=list(result.per_category)))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cellwatch report: {_e(header.model)} on {_e(Path(header.data).name)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>cellwatch report</h1>",
        header_html(header),
        "<h2>1. Detection per anomaly category</h2>",
        auroc_table_html(result, s, categories, a, header.threshold),
        _figure(
            roc,
            "ROC curves per anomaly category",
            "ROC curve of each anomaly category against all normal test cycles; AUROC % in the legend.",
        ),
        "<h2>2. Score distributions</h2>",
        _figure(
            hist,
            "score histograms, normal against anomalous test cycles",
            "Anomaly scores of the normal test cycles (grey) against all anomalies and each category; "
            "the dashed line is the model's threshold.",
        ),
    ]
    section = 3
    if alerts is not None:
        cycle_category = {int(n): c for n, c in zip(samples, categories, strict=True)}
        parts += [f"<h2>{section}. Alerts</h2>", alerts_table_html(alerts, cycle_category)]
        section += 1
    parts.append(f"<h2>{section}. Temporal analysis</h2>")
    parts += [f'<p class="note">{_e(note)}</p>' for note in notes]
    if not cases:
        parts.append('<p class="note">No cycles to analyse.</p>')
    for case in cases:
        peak_s = case.peak_index / case.rate_hz
        tops = ", ".join(f"{name} {share:.1%}" for name, share in case.top_signals)
        caption = (
            f"{_e(case.source) + ': ' if case.source else ''}cycle {case.sample}, {_e(case.category)}"
            f"{' / ' + _e(case.variant) if case.variant else ''}; localization peaks at {peak_s:.2f} s; "
            f"top signals {_e(tops)}."
        )
        parts.append(
            f'<div class="case" data-cycle="{case.sample}">'
            + _figure(
                png_data_uri(temporal_figure(case)), f"temporal analysis of cycle {case.sample}", caption
            )
            + "</div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
