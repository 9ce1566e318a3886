"""The stats report: the JSON document (schema below) and its terminal rendering with rich (<= 100 columns).

JSON schema (`latentcrafter stats --json`), schema id "latentcrafter.stats/1":
  mode: "fast" | "deep";  inputs: [str];  by: ["source"] | ["stage"] | ["source", "stage"]
  totals: {shards, shards_indexed, samples, videos, images, errors, clip_hours, source_hours,
           tar_bytes, buckets: BUCKETS, sources: [str], stages: [str]}
  groups: [{source?, stage?, label, shards, shards_indexed, samples, videos, images, errors,
            clip_hours, source_hours, tar_bytes, bytes_per_sample, buckets: BUCKETS,
            distributions: {name: SUMMARY}}]
      BUCKETS = [{kind, bucket: "WxH" (index width/height: the size the latent encodes), samples}],
      most samples first: the aspect buckets a bucketing loader batches by (one per stage without them).
  distributions: {name: SUMMARY + {label, unit, scale, hist: {edges: [float], counts: [int]}}}
      SUMMARY = {count, mean, min, max, p05, p25, p50, p75, p95} ({count: 0} when no values);
      integer fields (widths, caption lengths) are exact, others exact to one fine bin.
  errors: {total, by_stage: {stage: n}, reasons: [{stage, reason, count, share, examples: [key],
           detail, groups: {label: n}}]}   (share = count / input rows; see the accounting below)
  missing: {no_index: [url], no_tar: [url], no_errors: [url], not_found: [input], unreadable:
            [{shard, kind, detail}]}
  bytes: {tar_files, index_total, per_sample, members: {latent|text_tokens|image_tokens|image_frame|other:
          {total, per_sample, share}}, profiles: [PROFILE]}
      image_frame: cond_frame.jpg (0 in indexes written before storage profiles, which count as full).
      PROFILE = {profile (name: full|compact|lean, else the text form), text ("latent=..,image=..,text=.."),
        samples, per_sample: {latent, text_tokens, image_tokens, image_frame, other, total},
        projected_512x320x16: {measured (per-sample bytes of the video rows scaled to the real encoder
        sizes; null without video rows), from_shapes (shards.profiles.bytes_from_shapes total, an upper
        bound), video_samples, measured_members: {kind: bytes} | null, frame: "scaled" | "as stored" | null}}
        (the scaling: shards.stats_profiles)
  problems (deep mode only): [{shard, key, kind, detail}];  problem_counts: {kind: n}
  removed_dedup (in totals and in every group, only when some shard folder has a dedup result
      dedup/{source}-{stage}.parquet from `latentcrafter dedup`): index rows the dedup step removed.

Accounting: every input row is counted once, as a sample (an index row the loader reads), an error
row (errors parquet), or a sample removed as a near-duplicate (removed_dedup): input rows = samples +
errors + removed_dedup. `samples` and the distributions cover the remaining samples only.
"""

from __future__ import annotations

from collections import Counter

from rich import box
from rich.console import Console
from rich.table import Table

from shards.stats_fast import SPECS, GroupStats, coarse
from shards.stats_files import Discovery
from shards.stats_profiles import profiles_section, render_profiles

SCHEMA_ID = "latentcrafter.stats/1"
BY_CHOICES = {"source": ("source",), "stage": ("stage",), "source,stage": ("source", "stage")}


def merge_groups(groups: dict, by: tuple[str, ...]) -> dict[tuple, GroupStats]:
    """Re-key {(source, stage): GroupStats} by the chosen dimensions (merging copies, not the inputs)."""
    out: dict[tuple, GroupStats] = {}
    for (source, stage), stats in sorted(groups.items()):
        dims = {"source": source, "stage": stage}
        key = tuple(dims[d] for d in by)
        out.setdefault(key, GroupStats()).merge(stats)
    return out


def _group_fields(g: GroupStats, dedup: bool = False) -> dict:
    errors = sum(g.errors.values())
    extra = {"removed_dedup": g.removed} if dedup else {}
    return {
        "shards": g.shards,
        "shards_indexed": g.shards_indexed,
        "samples": g.samples,
        "videos": g.videos,
        "images": g.images,
        "errors": errors,
        "clip_hours": g.clip_seconds / 3600,
        "source_hours": g.source_seconds / 3600,
        "tar_bytes": g.tar_bytes,
        "bytes_per_sample": g.member_bytes["bytes_total"] / g.samples if g.samples else None,
        "buckets": _buckets(g),
        **extra,
    }


def _buckets(g: GroupStats) -> list[dict]:
    """Samples per (kind, "WxH" bucket), most first: what a bucketing loader groups batches by."""
    rows = sorted(g.buckets.items(), key=lambda item: (-item[1], item[0]))
    return [{"kind": kind, "bucket": tag, "samples": n} for (kind, tag), n in rows]


def _bytes_section(total: GroupStats) -> dict:
    mb = total.member_bytes
    parts = {
        "latent": mb["bytes_latent"],
        "text_tokens": mb["bytes_text_tokens"],
        "image_tokens": mb["bytes_image_tokens"],
        "image_frame": mb["bytes_image_frame"],
    }
    parts["other"] = max(0, mb["bytes_total"] - sum(parts.values()))
    n = total.samples or None
    return {
        "tar_files": total.tar_bytes,
        "index_total": mb["bytes_total"],
        "per_sample": mb["bytes_total"] / n if n else None,
        "members": {
            k: {
                "total": v,
                "per_sample": v / n if n else None,
                "share": v / mb["bytes_total"] if mb["bytes_total"] else None,
            }
            for k, v in parts.items()
        },
        "profiles": profiles_section(total.profiles),
    }


def _errors_section(merged: dict, total: GroupStats) -> dict:
    count = sum(total.errors.values())
    rows = total.samples + count + total.removed  # every input row, once
    by_stage: Counter = Counter()
    reasons = []
    for (stage, reason), n in sorted(total.errors.items(), key=lambda kv: (-kv[1], kv[0])):
        by_stage[stage] += n
        examples = total.examples.get((stage, reason), [])
        reasons.append(
            {
                "stage": stage,
                "reason": reason,
                "count": n,
                "share": n / rows if rows else None,
                "examples": [k for k, _ in examples],
                "detail": next((d for _, d in examples if d), None),
                "groups": {
                    "/".join(key): g.errors[(stage, reason)]
                    for key, g in merged.items()
                    if g.errors[(stage, reason)]
                },
            }
        )
    return {"total": count, "by_stage": dict(by_stage.most_common()), "reasons": reasons}


def build_report(
    discovery: Discovery,
    groups: dict,
    file_problems: list,
    *,
    inputs: list[str],
    by: str = "source,stage",
    problems: list[dict] | None = None,
) -> dict:
    """The JSON-ready report of one dataset (see the module docstring for the schema)."""
    dims = BY_CHOICES[by]
    merged = merge_groups(groups, dims)
    total = GroupStats()
    for g in merged.values():
        total.merge(g)
    dedup = total.deduped
    group_rows = []
    for key, g in merged.items():
        row = dict(zip(dims, key))
        row["label"] = "/".join(key)
        row.update(_group_fields(g, dedup))
        row["distributions"] = {name: h.summary() for name, h in g.hists.items() if h.n}
        group_rows.append(row)
    distributions = {}
    for spec in SPECS:
        h = total.hists[spec.name]
        if h.n:
            edges, counts = coarse(h, 64)
            distributions[spec.name] = {
                "label": spec.label,
                "unit": spec.unit,
                "scale": spec.scale,
                **h.summary(),
                "hist": {"edges": edges.tolist(), "counts": counts.tolist()},
            }
    totals = _group_fields(total, dedup)
    totals.pop("bytes_per_sample")
    totals["sources"] = sorted({s for s, _ in groups})
    totals["stages"] = sorted({st for _, st in groups})
    sh = discovery.shards
    report = {
        "schema": SCHEMA_ID,
        "mode": "fast" if problems is None else "deep",
        "inputs": list(inputs),
        "by": list(dims),
        "totals": totals,
        "groups": group_rows,
        "distributions": distributions,
        "errors": _errors_section(merged, total),
        "missing": {
            "no_index": [s.tar for s in sh if s.index is None and s.tar],
            "no_tar": [s.index for s in sh if s.tar is None and s.index],
            "no_errors": [s.index for s in sh if s.errors is None and s.index],
            "not_found": list(discovery.not_found),
            "unreadable": [vars(p) for p in file_problems],
        },
        "bytes": _bytes_section(total),
    }
    if problems is not None:
        report["problems"] = problems
        report["problem_counts"] = dict(Counter(p["kind"] for p in problems).most_common())
    return report


# ---------------------------------------------------------------- terminal


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def num(x, digits: int = 2) -> str:
    """Compact number: thousands separators for ints, `digits` significant decimals otherwise."""
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:,.{digits}f}" if abs(x) >= 1 else f"{x:.{digits + 1}g}"


def count(n: int | None) -> str:
    """A count for narrow tables: exact below 100,000, else 1.23M / 456.7k (the JSON keeps exact values)."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= 100_000 and abs(n) >= div:
            return f"{n / div:.3g}{suffix}" if n / div < 1000 else f"{n / div:,.0f}{suffix}"
    return f"{int(n):,}"


def hours(h: float, videos: int) -> str:
    if not videos:
        return "-"
    return f"{h:,.1f}" if h >= 100 else f"{h:.2f}" if h >= 0.01 else f"{h:.2g}"


def _table(title: str, *columns: str, right_from: int = 1) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold", pad_edge=False)
    for i, c in enumerate(columns):
        right = i >= right_from
        t.add_column(c, justify="right" if right else "left", overflow="fold", no_wrap=right)
    return t


def render_terminal(report: dict, console: Console, *, max_problems: int = 20) -> None:
    """Print the report as rich tables that fit a 100-column terminal."""
    t = report["totals"]
    console.print(
        f"[bold]{num(t['samples'])} samples[/] ({num(t['videos'])} videos, {num(t['images'])} images) in "
        f"{num(t['shards_indexed'])}/{num(t['shards'])} indexed shards; "
        f"{t['clip_hours']:,.2f} h of clips from {t['source_hours']:,.2f} h of source video; "
        f"{num(t['errors'])} rejected rows; tars {human_bytes(t['tar_bytes'])}"
    )
    dedup = "removed_dedup" in t
    if dedup:
        console.print(
            f"removed by dedup: {num(t['removed_dedup'])} (near-duplicates; not counted in samples)"
        )
    g = _table(
        f"By {' / '.join(report['by'])}",
        "group",
        "shards",
        "samples",
        "videos",
        "images",
        "clip h",
        "src h",
        "errors",
        "B/sample",
    )
    g.columns[0].no_wrap = True
    for row in report["groups"]:
        g.add_row(
            row["label"],
            f"{row['shards_indexed']}/{row['shards']}",
            count(row["samples"]),
            count(row["videos"]),
            count(row["images"]),
            hours(row["clip_hours"], row["videos"]),
            hours(row["source_hours"], row["videos"]),
            count(row["errors"]),
            human_bytes(row["bytes_per_sample"]),
        )
    console.print(g)
    if dedup:
        for row in report["groups"]:
            console.print(f"  {row['label']}: removed by dedup: {num(row['removed_dedup'])}")
    if any(row["buckets"] for row in report["groups"]):
        bk = _table(
            "Samples per bucket (kind, W x H)", "group", "kind", "bucket", "samples", "share", right_from=3
        )
        bk.columns[0].no_wrap = True
        for row in report["groups"]:
            for b in row["buckets"]:
                share = f"{100 * b['samples'] / row['samples']:.1f}%" if row["samples"] else "-"
                bk.add_row(row["label"], b["kind"], b["bucket"], count(b["samples"]), share)
        console.print(bk)
    d = _table("Distributions", "field", "count", "mean", "min", "p05", "p50", "p95", "max")
    for s in report["distributions"].values():
        label = s["label"]
        fmt = human_bytes if s["unit"] == "B" else num
        d.add_row(label, count(s["count"]), *(fmt(s[k]) for k in ("mean", "min", "p05", "p50", "p95", "max")))
    if report["distributions"]:
        console.print(d)
    e = report["errors"]
    et = _table(
        f"Rejected rows: {num(e['total'])}", "stage", "reason", "rows", "share", "examples", right_from=2
    )
    for col in et.columns[:4]:
        col.no_wrap = True
    et.columns[4].justify, et.columns[4].overflow, et.columns[4].no_wrap = "left", "ellipsis", True
    for r in e["reasons"]:
        share = f"{100 * r['share']:.1f}%" if r["share"] is not None else "-"
        et.add_row(r["stage"], r["reason"], count(r["count"]), share, ", ".join(r["examples"]))
    if e["reasons"]:
        console.print(et)
    b = report["bytes"]
    bt = _table(
        f"Bytes: tars {human_bytes(b['tar_files'])}, per sample {human_bytes(b['per_sample'])}",
        "member",
        "total",
        "per sample",
        "share",
    )
    for k, m in b["members"].items():
        share = f"{100 * m['share']:.1f}%" if m["share"] is not None else "-"
        bt.add_row(k, human_bytes(m["total"]), human_bytes(m["per_sample"]), share)
    console.print(bt)
    render_profiles(report, console, human_bytes, count)
    for kind, items in report["missing"].items():
        if items:
            console.print(f"[bold yellow]{kind.replace('_', ' ')}[/]: {len(items)}")
            for item in items[:10]:
                console.print(
                    f"  {item if isinstance(item, str) else item['detail']}", soft_wrap=False, overflow="fold"
                )
    if "problems" in report:
        _render_problems(report, console, max_problems)


def _render_problems(report: dict, console: Console, max_problems: int) -> None:
    problems = report["problems"]
    if not problems:
        console.print("[bold green]deep check: every tar matches its index[/]")
        return
    counts = ", ".join(f"{k} {n}" for k, n in report["problem_counts"].items())
    p = _table(
        f"Deep check: {len(problems)} problems ({counts})", "shard", "key", "kind", "detail", right_from=9
    )
    for prob in problems[:max_problems]:
        p.add_row(prob["shard"].rsplit("/", 1)[-1], prob["key"] or "-", prob["kind"], prob["detail"])
    console.print(p)
    if len(problems) > max_problems:
        console.print(f"... and {len(problems) - max_problems} more (all of them in --json)")
