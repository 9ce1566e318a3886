"""report.html of a study: Table 3 (rows x metrics at each step), metric-vs-step plots, side-by-side videos."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from evaluation.report import LABELS, _png


def fmt(value) -> str:
    """How a number appears in the report (tests compare it with study.json)."""
    return "&ndash;" if value is None else f"{value:.4f}"


def _table(data: dict) -> str:
    metrics = [m for m in data["metrics"] if any(m in v for r in data["table"] for v in r["steps"].values())]
    steps = ["0"] * bool(data["bases"]) + [str(s) for s in data["eval_steps"]]
    head = "<tr><th rowspan=2>Variant</th>" + "".join(
        f"<th colspan={len(steps)}>{html.escape(LABELS.get(m, m))}</th>" for m in metrics
    )
    head += "</tr><tr>" + "".join(f"<th>{s}</th>" for _ in metrics for s in steps) + "</tr>"
    body = []
    for row in data["table"]:
        cells = []
        for m in metrics:
            for s in steps:
                value = row["steps"].get(s, {}).get(m)
                cells.append(
                    f'<td data-row="{html.escape(row["row"])}" data-step="{s}" data-metric="{m}">{fmt(value)}</td>'
                )
        body.append(f"<tr><th>{html.escape(row['row'])}</th>{''.join(cells)}</tr>")
    return f'<table id="table3">{head}{"".join(body)}</table>'


def _plots(data: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for m in data["metrics"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        drawn = False
        for name, res in data["variants"].items():
            base = data["bases"].get(res["base"], {}).get("metrics", {})
            points = [(0, base[m])] if m in base else []
            points += [(int(s), v["metrics"][m]) for s, v in res["steps"].items() if m in v["metrics"]]
            if points:
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(LABELS.get(m, m))
        ax.legend(fontsize=6)
        out.append(_png(fig))
    return "".join(out)


def _video(root: Path, rel: str) -> str:
    path = root / rel
    if not path.is_file():
        return "&ndash;"
    b64 = base64.b64encode(path.read_bytes()).decode()
    return f'<video src="data:video/mp4;base64,{b64}" autoplay loop muted playsinline width="192"></video>'


def _videos(root: Path, data: dict) -> str:
    last = str(data["eval_steps"][-1])
    columns = [(k, b) for k, b in data["bases"].items()]
    columns += [(name, res["steps"][last]) for name, res in data["variants"].items()]
    if not columns:
        return ""
    prompts = [s["prompt"] for s in columns[0][1]["samples"]]
    head = "<tr><th>Prompt</th>" + "".join(
        f"<th>{html.escape(n)}{'' if n in data['bases'] else f' @ {last}'}</th>" for n, _ in columns
    )
    rows = []
    for i, prompt in enumerate(prompts):
        cells = "".join(
            f"<td>{_video(root, os.path.join(c['samples_dir'], c['samples'][i]['video']))}</td>"
            for _, c in columns
        )
        rows.append(f"<tr><td>{html.escape(prompt)}</td>{cells}</tr>")
    return f"<table class=videos>{head}</tr>{''.join(rows)}</table>"


def write_report(out_dir: str, data: dict) -> str:
    root = Path(out_dir)
    skipped = "".join(
        f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in data["skipped_metrics"].items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(data["name"])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} img{{margin:4px}}</style></head><body>
<h1>Parameter perturbation study: {html.escape(data["name"])}</h1>
<p>Each variant is fine-tuned from its base model (F: joint, P: temporal-only) on the same data, seeds and batch
order, and evaluated at steps {", ".join(map(str, data["eval_steps"]))} on the same prompts and seeds (step 0: the
base model). Values are means over the prompts.</p>
<h2>Table 3</h2>{_table(data)}
{f"<p>Skipped metrics:</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Metrics against steps</h2>{_plots(data)}
<h2>Previews (last evaluated step)</h2>{_videos(root, data)}
</body></html>"""
    path = root / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return str(path)
