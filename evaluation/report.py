"""The self-contained HTML report of an eval run: set table, per-video table, plots as embedded base64 PNGs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from evaluation.config import METRICS

LABELS = {
    "clipsim": "CLIPSIM",
    "clip_temp": "CLIP-Temp",
    "motion": "Motion (px)",
    "static_ratio": "Static ratio",
    "warp_error": "Warp error",
    "aesthetic": "Aesthetic",
    "fvd": "FVD",
}


def _fmt(value) -> str:
    return (
        "&ndash;"
        if value is None
        else f"{value:.4f}"
        if isinstance(value, float)
        else html.escape(str(value))
    )


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plots(summary: dict, records: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    keys = [k for k in METRICS if any(r.get(k) is not None for r in records)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.hist([r[key] for r in records if r.get(key) is not None], bins=20, color="#4c72b0")
            ax.set_title(LABELS[key])
        images.append(_png(fig))
    flows = [r for r in records if r.get("flow_per_pair")]
    if flows:
        fig, ax = plt.subplots(figsize=(7, 2.8))
        for r in flows[:20]:
            ax.plot(r["flow_per_pair"], alpha=0.6, label=r["name"][:24])
        ax.axhline(summary["config"]["static_threshold"], color="k", ls="--", lw=0.8)
        ax.set_xlabel("frame pair")
        ax.set_ylabel("mean flow (px)")
        if len(flows) <= 10:
            ax.legend(fontsize=6)
        images.append(_png(fig))
    against = summary.get("against")
    if against:
        rows = [(k, v) for k, v in against["metrics"].items() if v["delta"] is not None and k != "fvd"]
        if rows:
            fig, ax = plt.subplots(figsize=(max(3, 1.2 * len(rows)), 2.6))
            ax.bar([LABELS[k] for k, _ in rows], [v["delta"] for _, v in rows], color="#dd8452")
            ax.axhline(0, color="k", lw=0.8)
            ax.set_title("ours - theirs")
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
            images.append(_png(fig))
    return images


def render(summary: dict, records: list[dict]) -> str:
    keys = [k for k in (*METRICS, "fvd") if k in summary["metrics"]]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>latentcrafter eval</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}"
        "td.num{text-align:right}.note{color:#a33}</style></head><body>",
        f"<h1>latentcrafter eval</h1><p>{html.escape(summary['videos_dir'])}: {summary['num_videos']} videos</p>",
        "<h2>Set</h2><table><tr><th>metric</th><th>value</th><th>videos</th></tr>",
    ]
    for key in keys:
        count = summary["counts"].get(key, (summary.get("fvd") or {}).get("num_gen", ""))
        parts.append(
            f"<tr><td>{LABELS[key]}</td><td class=num>{_fmt(summary['metrics'][key])}</td><td>{count}</td></tr>"
        )
    parts.append("</table>")
    if summary.get("fvd"):
        proto = html.escape(json.dumps(summary["fvd"]["protocol"]))
        parts.append(
            f"<p>FVD protocol: <code>{proto}</code>, {summary['fvd']['num_real']} real vs "
            f"{summary['fvd']['num_gen']} generated clips (comparable only under the same protocol)</p>"
        )
    for name, message in summary.get("skipped", {}).items():
        parts.append(f"<p class=note>{html.escape(name)} skipped: {html.escape(message)}</p>")
    for key, text in summary.get("protocol", {}).items():
        parts.append(f"<p><b>{html.escape(key)}</b>: {html.escape(text)}</p>")
    against = summary.get("against")
    if against:
        parts.append(f"<h2>Against {html.escape(str(against['videos']))}</h2>")
        parts.append("<table><tr><th>metric</th><th>ours</th><th>theirs</th><th>delta</th></tr>")
        for key, row in against["metrics"].items():
            cells = "".join(f"<td class=num>{_fmt(row[c])}</td>" for c in ("ours", "theirs", "delta"))
            parts.append(f"<tr><td>{LABELS[key]}</td>{cells}</tr>")
        parts.append("</table>")
        if against.get("fvd_protocol_note"):
            parts.append(f"<p class=note>{html.escape(against['fvd_protocol_note'])}</p>")
    parts += [
        "<h2>Plots</h2>",
        *_plots(summary, records),
        "<h2>Videos</h2><table><tr><th>video</th><th>prompt</th>",
    ]
    shown = [k for k in METRICS if k not in summary.get("skipped", {})]
    parts.append("".join(f"<th>{LABELS[k]}</th>" for k in shown) + "</tr>")
    for r in records:
        cells = "".join(f"<td class=num>{_fmt(r.get(k))}</td>" for k in shown)
        parts.append(f"<tr><td>{html.escape(r['name'])}</td><td>{_fmt(r.get('prompt'))}</td>{cells}</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, summary: dict, records: list[dict]) -> None:
    Path(path).write_text(render(summary, records), encoding="utf-8")
