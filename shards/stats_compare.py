"""`latentcrafter stats A --against B`: what changed between two dataset versions (counts, distributions)."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from shards.stats_fast import Hist
from shards.stats_report import _table, human_bytes, num

TOTAL_FIELDS = (
    "shards",
    "shards_indexed",
    "samples",
    "videos",
    "images",
    "errors",
    "clip_hours",
    "source_hours",
    "tar_bytes",
)


def _delta(a, b) -> dict:
    a, b = a or 0, b or 0
    return {"a": a, "b": b, "delta": a - b, "pct": (100.0 * (a - b) / b) if b else None}


def tv_distance(a: Hist, b: Hist) -> float | None:
    """Total variation distance (0 = same shape, 1 = disjoint) of two histograms of the same spec."""
    if a.n == 0 or b.n == 0:
        return None
    return float(0.5 * np.abs(a.counts / a.n - b.counts / b.n).sum())


def compare(a, b) -> dict:
    """The difference of two analysed datasets (stats.Result): a is PATH, b is --against.

    {"totals": {field: {a, b, delta, pct}}, "groups": [{label, samples: {a, b, delta, pct}, errors: ...}],
     "distributions": {name: {label, a: {mean, p50, p95}, b: {...}, tv_distance}},
     "errors": [{stage, reason, a, b, delta, pct}], "bytes": {member: {a, b, delta, pct} per sample},
     "profiles": {profile: {samples: {a, b, delta, pct}, per_sample: {a, b, delta, pct}}}}
    A member kind or profile one report lacks (a report written before storage profiles has no image_frame
    and no profiles) counts as 0 there.
    """
    ra, rb = a.report, b.report
    totals = {f: _delta(ra["totals"][f], rb["totals"][f]) for f in TOTAL_FIELDS}
    if "removed_dedup" in ra["totals"] or "removed_dedup" in rb["totals"]:  # only with a dedup result
        totals["removed_dedup"] = _delta(ra["totals"].get("removed_dedup"), rb["totals"].get("removed_dedup"))
    ga = {g["label"]: g for g in ra["groups"]}
    gb = {g["label"]: g for g in rb["groups"]}
    groups = [
        {
            "label": label,
            "samples": _delta(ga.get(label, {}).get("samples"), gb.get(label, {}).get("samples")),
            "errors": _delta(ga.get(label, {}).get("errors"), gb.get(label, {}).get("errors")),
            "clip_hours": _delta(ga.get(label, {}).get("clip_hours"), gb.get(label, {}).get("clip_hours")),
        }
        for label in sorted(ga.keys() | gb.keys())
    ]
    distributions = {}
    for name, ha in a.total.hists.items():
        hb = b.total.hists[name]
        if ha.n or hb.n:
            sa, sb = ha.summary(), hb.summary()
            distributions[name] = {
                "label": ha.spec.label,
                "a": {k: sa.get(k) for k in ("count", "mean", "p50", "p95")},
                "b": {k: sb.get(k) for k in ("count", "mean", "p50", "p95")},
                "tv_distance": tv_distance(ha, hb),
            }
    ea = {(r["stage"], r["reason"]): r["count"] for r in ra["errors"]["reasons"]}
    eb = {(r["stage"], r["reason"]): r["count"] for r in rb["errors"]["reasons"]}
    errors = [
        {"stage": s, "reason": r, **_delta(ea.get((s, r)), eb.get((s, r)))}
        for s, r in sorted(ea.keys() | eb.keys())
    ]
    ma, mb = ra["bytes"]["members"], rb["bytes"]["members"]
    bytes_ = {
        m: _delta(ma.get(m, {}).get("per_sample"), mb.get(m, {}).get("per_sample"))
        for m in [*ma, *(m for m in mb if m not in ma)]
    }
    bytes_["total"] = _delta(ra["bytes"]["per_sample"], rb["bytes"]["per_sample"])
    pa_ = {p["profile"]: p for p in ra["bytes"].get("profiles", [])}
    pb_ = {p["profile"]: p for p in rb["bytes"].get("profiles", [])}
    profiles = {
        name: {
            "samples": _delta(pa_.get(name, {}).get("samples"), pb_.get(name, {}).get("samples")),
            "per_sample": _delta(
                pa_.get(name, {}).get("per_sample", {}).get("total"),
                pb_.get(name, {}).get("per_sample", {}).get("total"),
            ),
        }
        for name in [*pa_, *(n for n in pb_ if n not in pa_)]
    }
    return {
        "totals": totals,
        "groups": groups,
        "distributions": distributions,
        "errors": errors,
        "bytes": bytes_,
        "profiles": profiles,
    }


def _pct(d: dict) -> str:
    return "-" if d["pct"] is None else f"{d['pct']:+.1f}%"


def render_compare(diff: dict, console: Console) -> None:
    """Terminal tables of a compare() result (A = PATH, B = --against), within 100 columns."""
    t = _table("Totals (A = PATH, B = --against)", "field", "A", "B", "A - B", "change")
    for field, d in diff["totals"].items():
        fmt = human_bytes if field == "tar_bytes" else num
        t.add_row(field, fmt(d["a"]), fmt(d["b"]), fmt(d["delta"]), _pct(d))
    console.print(t)
    g = _table("Samples by group", "group", "A", "B", "A - B", "change", "errors A", "errors B")
    for row in diff["groups"]:
        s, e = row["samples"], row["errors"]
        g.add_row(row["label"], num(s["a"]), num(s["b"]), num(s["delta"]), _pct(s), num(e["a"]), num(e["b"]))
    console.print(g)
    d = _table("Distributions", "field", "mean A", "mean B", "p50 A", "p50 B", "p95 A", "p95 B", "TV dist")
    for name, row in diff["distributions"].items():
        fmt = human_bytes if name == "bytes_total" else num
        a, b = row["a"], row["b"]
        tv = "-" if row["tv_distance"] is None else f"{row['tv_distance']:.3f}"
        d.add_row(row["label"], *(fmt(x[k]) for k in ("mean", "p50", "p95") for x in (a, b)), tv)
    console.print(d)
    if diff["errors"]:
        e = _table("Rejected rows", "stage", "reason", "A", "B", "A - B", right_from=2)
        for row in diff["errors"]:
            e.add_row(row["stage"], row["reason"], num(row["a"]), num(row["b"]), num(row["delta"]))
        console.print(e)
    b = _table("Bytes per sample", "member", "A", "B", "change")
    for member, row in diff["bytes"].items():
        b.add_row(member, human_bytes(row["a"]), human_bytes(row["b"]), _pct(row))
    console.print(b)
    if diff.get("profiles"):
        p = _table(
            "Storage profiles", "profile", "samples A", "samples B", "B/sample A", "B/sample B", "change"
        )
        for name, row in diff["profiles"].items():
            s, b = row["samples"], row["per_sample"]
            ba, bb = (human_bytes(b[k]) if s[k] else "-" for k in ("a", "b"))
            p.add_row(name, num(s["a"]), num(s["b"]), ba, bb, _pct(b) if s["a"] and s["b"] else "-")
        console.print(p)
