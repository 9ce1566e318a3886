"""The stats report as one self-contained HTML page: tables plus histograms (matplotlib Agg, PNG inlined)."""

from __future__ import annotations

import base64
import html
import io
import json

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shards.stats_fast import SPECS, coarse, coarse_plan  # noqa: E402
from shards.stats_report import human_bytes, num  # noqa: E402

MAX_GROUP_LINES = 8  # groups drawn per histogram; the rest are summed into "other"
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 10px;border-bottom:1px solid #eee}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs figure{margin:0}.bad{color:#b00}.ok{color:#070}
code{font-size:.9em}
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _table(headers: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f"<td class='n'>{_esc(c)}</td>" if i >= numeric_from else f"<td>{_esc(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _hist_figure(spec, series: list[tuple[str, object]]) -> str:
    """One PNG: step histograms of `series` [(label, Hist)] on shared bins."""
    plan = coarse_plan([h for _, h in series], 60)
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    for label, h in series:
        edges, counts = coarse(h, plan=plan)
        if len(counts):
            ax.stairs(counts, edges, label=f"{label} ({h.n:,})", fill=len(series) == 1, alpha=0.8)
    if spec.scale == "log":
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(spec.label, fontsize=10)
    ax.set_ylabel("samples")
    ax.tick_params(labelsize=8)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _png(fig)


def _series(groups: dict, spec) -> list:
    items = [("/".join(k), g.hists[spec.name]) for k, g in groups.items() if g.hists[spec.name].n]
    if len(items) > MAX_GROUP_LINES:
        rest = items[MAX_GROUP_LINES - 1 :]
        other = type(rest[0][1])(spec)
        for _, h in rest:
            other.merge(h)
        items = items[: MAX_GROUP_LINES - 1] + [("other", other)]
    return items


def _figures(result, against) -> str:
    figs = []
    for spec in SPECS:
        if against is not None:
            series = [("A", result.total.hists[spec.name]), ("B (--against)", against.total.hists[spec.name])]
            series = [(label, h) for label, h in series if h.n]
        else:
            series = _series(result.groups, spec)
        if series:
            uri = _hist_figure(spec, series)
            figs.append(f"<figure><img alt='{_esc(spec.label)}' src='{uri}'></figure>")
    return f"<div class='figs'>{''.join(figs)}</div>"


def _bytes_figure(report: dict) -> str:
    members = {k: v["total"] for k, v in report["bytes"]["members"].items() if v["total"]}
    if not members:
        return ""
    fig, ax = plt.subplots(figsize=(5.2, 1.8))
    left = 0
    for name, total in members.items():
        ax.barh([0], [total], left=left, label=f"{name} {human_bytes(total)}")
        left += total
    ax.set_yticks([])
    ax.set_xlabel("bytes")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.5))
    return f"<figure><img alt='bytes per member kind' src='{_png(fig)}'></figure>"


def _dedup_section(report: dict) -> list[str]:
    """Samples removed by the dedup step per group (only when a dedup result exists)."""
    if "removed_dedup" not in report["totals"]:
        return []
    rows = [[g["label"], num(g["removed_dedup"])] for g in report["groups"]]
    return [
        f"<h2>Removed by dedup ({num(report['totals']['removed_dedup'])})</h2>",
        "<p>near-duplicates listed by <code>latentcrafter dedup</code>; not counted in samples</p>",
        _table(["group", "removed by dedup"], rows),
    ]


def _profiles_section(report: dict) -> list[str]:
    """Bytes per sample by storage profile, and one 512x320x16 video projected to the real encoder sizes."""
    rows = report["bytes"].get("profiles") or []
    if not rows:
        return []
    kinds = ("latent", "text_tokens", "image_tokens", "image_frame", "other", "total")
    body = []
    for r in rows:
        proj = r["projected_512x320x16"]
        body.append(
            [r["profile"], num(r["samples"]), *(human_bytes(r["per_sample"][k]) for k in kinds)]
            + [human_bytes(proj["from_shapes"]), human_bytes(proj["measured"])]
        )
    return [
        "<h3>Bytes per sample by storage profile</h3>",
        "<p>real size: one 512x320x16 video at the real encoder sizes, an upper bound from the member shapes "
        "and the video rows' bytes scaled to them (<code>shards.stats_profiles</code>)</p>",
        _table(["profile", "samples", *kinds, "real: from shapes", "real: measured"], body),
    ]


def _sections(report: dict) -> list[str]:
    t = report["totals"]
    out = [
        "<h2>Totals</h2>",
        _table(
            [
                "samples",
                "videos",
                "images",
                "shards (indexed/all)",
                "clip hours",
                "source hours",
                "rejected",
                "tars",
            ],
            [
                [
                    num(t["samples"]),
                    num(t["videos"]),
                    num(t["images"]),
                    f"{t['shards_indexed']}/{t['shards']}",
                    f"{t['clip_hours']:.2f}",
                    f"{t['source_hours']:.2f}",
                    num(t["errors"]),
                    human_bytes(t["tar_bytes"]),
                ]
            ],
            numeric_from=0,
        ),
        *_dedup_section(report),
        f"<h2>By {' / '.join(report['by'])}</h2>",
        _table(
            [
                "group",
                "shards",
                "samples",
                "videos",
                "images",
                "clip h",
                "source h",
                "rejected",
                "bytes/sample",
            ],
            [
                [
                    g["label"],
                    f"{g['shards_indexed']}/{g['shards']}",
                    num(g["samples"]),
                    num(g["videos"]),
                    num(g["images"]),
                    f"{g['clip_hours']:.2f}",
                    f"{g['source_hours']:.2f}",
                    num(g["errors"]),
                    human_bytes(g["bytes_per_sample"]),
                ]
                for g in report["groups"]
            ],
        ),
        "<h2>Distribution summaries</h2>",
        _table(
            ["field", "count", "mean", "min", "p05", "p25", "p50", "p75", "p95", "max"],
            [
                [d["label"], num(d["count"])]
                + [
                    (human_bytes if d["unit"] == "B" else num)(d[k])
                    for k in ("mean", "min", "p05", "p25", "p50", "p75", "p95", "max")
                ]
                for d in report["distributions"].values()
            ],
        ),
        f"<h2>Rejected rows ({num(report['errors']['total'])})</h2>",
        _table(
            ["stage", "reason", "rows", "share", "example keys", "example detail"],
            [
                [
                    r["stage"],
                    r["reason"],
                    num(r["count"]),
                    "-" if r["share"] is None else f"{100 * r['share']:.2f}%",
                    ", ".join(r["examples"]),
                    r["detail"] or "",
                ]
                for r in report["errors"]["reasons"]
            ],
            numeric_from=2,
        ),
        "<h2>Bytes</h2>",
        _table(
            ["member kind", "total", "per sample", "share"],
            [
                [
                    k,
                    human_bytes(m["total"]),
                    human_bytes(m["per_sample"]),
                    "-" if m["share"] is None else f"{100 * m['share']:.1f}%",
                ]
                for k, m in report["bytes"]["members"].items()
            ],
        ),
        _bytes_figure(report),
        *_profiles_section(report),
    ]
    missing = [(k, v) for k, v in report["missing"].items() if v]
    out.append("<h2>Missing files</h2>")
    if not missing:
        out.append("<p class='ok'>every shard has its tar, index and errors parquet</p>")
    for kind, items in missing:
        out.append(f"<h3 class='bad'>{_esc(kind.replace('_', ' '))}: {len(items)}</h3><ul>")
        out += [
            f"<li><code>{_esc(i if isinstance(i, str) else i['detail'])}</code></li>" for i in items[:200]
        ]
        out.append("</ul>")
    if "problems" in report:
        probs = report["problems"]
        out.append(f"<h2>Deep check: {len(probs)} problems</h2>")
        if not probs:
            out.append("<p class='ok'>every tar matches its index</p>")
        else:
            out.append(_table(["kind", "count"], list(report["problem_counts"].items())))
            out.append(
                _table(
                    ["shard", "key", "kind", "detail"],
                    [[p["shard"], p["key"] or "-", p["kind"], p["detail"]] for p in probs[:500]],
                    numeric_from=9,
                )
            )
    return out


def _diff_section(diff: dict) -> list[str]:
    def pct(d):
        return "-" if d["pct"] is None else f"{d['pct']:+.1f}%"

    return [
        "<h2>Compared with --against (A = this dataset, B = --against)</h2>",
        _table(
            ["field", "A", "B", "A - B", "change"],
            [[f, num(d["a"]), num(d["b"]), num(d["delta"]), pct(d)] for f, d in diff["totals"].items()],
        ),
        _table(
            ["group", "samples A", "samples B", "change", "rejected A", "rejected B"],
            [
                [
                    g["label"],
                    num(g["samples"]["a"]),
                    num(g["samples"]["b"]),
                    pct(g["samples"]),
                    num(g["errors"]["a"]),
                    num(g["errors"]["b"]),
                ]
                for g in diff["groups"]
            ],
        ),
        _table(
            ["field", "mean A", "mean B", "p50 A", "p50 B", "TV distance"],
            [
                [
                    d["label"],
                    num(d["a"].get("mean")),
                    num(d["b"].get("mean")),
                    num(d["a"].get("p50")),
                    num(d["b"].get("p50")),
                    "-" if d["tv_distance"] is None else f"{d['tv_distance']:.3f}",
                ]
                for d in diff["distributions"].values()
            ],
        ),
    ]


def write_html(path: str, result, *, against=None) -> None:
    """Write the page for a stats.Result (and, with `against`, its comparison to that one)."""
    report = result.report
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>latentcrafter stats</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>latentcrafter stats: {_esc(', '.join(report['inputs']))}</h1>",
        f"<p>mode: {report['mode']}</p>",
    ]
    if against is not None:
        from shards.stats_compare import compare

        parts += _diff_section(compare(result, against))
    parts += ["<h2>Histograms</h2>", _figures(result, against)]
    parts += _sections(report)
    data = json.dumps(report, default=float).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='report'>{data}</script>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
