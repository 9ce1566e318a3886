"""`latentcrafter sample-data`: WebVid-10M, LAION-COCO and JourneyDB in miniature, in their real formats."""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from pipelines.sources.laion_coco import laion_key
from pipelines.tools.sample_media import HTML_PAGE, NOT_A_VIDEO, caption, image_bytes, rng_for, write_video
from schemas import LAION_COCO_SCHEMA

VIDEO_SIZES = ((596, 336), (640, 360), (480, 270))
VIDEO_FPS = (24, 25, 30)
IMAGE_SIZES = ((320, 240), (256, 384), (500, 281), (200, 200), (640, 360), (300, 450), (384, 256), (150, 600))
IMAGE_FORMATS = (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"))
JDB_SIZES = ((256, 256), (320, 192), (192, 320), (288, 288))
JDB_MANIFEST = "jdb/data/train/train_anno_realease_repath.jsonl"
WEBVID_MANIFEST = "webvid/results_2M_val.csv"


def _iso(seconds: int) -> str:
    return f"PT{seconds // 3600:02d}H{seconds % 3600 // 60:02d}M{seconds % 60:02d}S"


def _unique_ints(rng: np.random.Generator, count: int, low: int, high: int) -> list[int]:
    values: list[int] = []
    while len(values) < count:
        value = int(rng.integers(low, high))
        if value not in values:
            values.append(value)
    return values


def _write_webvid(out: Path, rng: np.random.Generator, videos: int, port: int, progress) -> dict:
    """results_2M_val.csv + videos/{page_dir}/{videoid}.mp4, with the planted defects."""
    # (name, duration seconds written in the CSV, expected defect or None)
    plan = [("good", None, None)] * videos + [
        ("empty", 5, ("decode", "empty_file")),
        ("truncated", 4, ("decode", "undecodable")),
        ("text", 6, ("decode", "undecodable")),
        ("missing", 7, ("fetch", "not_found")),
        ("short", 0, ("decode", "too_short")),
        ("bad_duration", 17, ("read", "bad_duration")),
    ]
    ids = _unique_ints(rng, len(plan), 1_000_000, 2_000_000_000)
    rows, defects, items = [], {}, {}
    task = progress.add_task("webvid videos", total=len(plan))
    long_one = videos // 2 if videos >= 4 else -1  # one 20 s clip when there are enough videos
    for i, ((kind, duration, defect), videoid) in enumerate(zip(plan, ids)):
        page_idx = int(rng.integers(0, 40))
        page_dir = f"{page_idx * 50 + 1:06d}_{(page_idx + 1) * 50:06d}"
        key, path = f"webvid_{videoid}", out / "videos" / page_dir / f"{videoid}.mp4"
        width, height = VIDEO_SIZES[i % len(VIDEO_SIZES)]
        fps = VIDEO_FPS[(i // len(VIDEO_SIZES) + i) % len(VIDEO_FPS)]
        if kind == "good":
            duration = 20 if i == long_one else int(rng.integers(2, 9))
        if kind != "missing" and kind != "bad_duration":
            path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "good":
            write_video(str(path), width, height, fps, duration * fps, rng)
            items[key] = dict(
                width=width, height=height, fps=fps, frames=duration * fps, duration=float(duration)
            )
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":  # cut to half: the moov atom at the end is gone
            write_video(str(path), width, height, fps, 2 * fps, rng)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif kind == "text":
            path.write_bytes(NOT_A_VIDEO)
        elif kind == "short":  # 0.3 s: fewer than 8 frames
            write_video(str(path), width, height, 24, 7, rng)
        if defect:
            defects[key] = {"stage": defect[0], "reason": defect[1]}
        text = caption(rng)
        duration_cell = "17 seconds" if kind == "bad_duration" else _iso(duration)
        url = f"http://127.0.0.1:{port}/webvid/videos/{page_dir}/{videoid}.mp4"
        rows.append((key, [videoid, text, page_idx, page_dir, duration_cell, url]))
        progress.advance(task)
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    with open(out / "results_2M_val.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        writer.writerows(cells for _, cells in rows)
    return {
        "manifest": WEBVID_MANIFEST,
        "media_root": "webvid/videos",
        "rows": len(rows),
        "keys": [key for key, _ in rows],
        "defects": defects,
        "items": items,
    }


def _write_laion(out: Path, rng: np.random.Generator, images: int, port: int, progress) -> dict:
    """part-00000-<uuid>-c000.snappy.parquet + images/, with URLs on the local server and the defects."""
    plan = [("good", None)] * images + [
        ("http_404", ("fetch", "http_404")),
        ("html", ("decode", "not_an_image")),
        ("null_url", ("read", "missing_field")),
    ]
    prefix = f"http://127.0.0.1:{port}/"
    (out / "images").mkdir(parents=True, exist_ok=True)
    hashes = _unique_ints(rng, len(plan), -(2**63), 2**63 - 1)
    high_punsafe_at = {2, 5} & set(range(images))
    rows, defects, items, high_punsafe = [], {}, {}, []
    task = progress.add_task("laion_coco images", total=len(plan))
    for i, ((kind, defect), hash_value) in enumerate(zip(plan, hashes)):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        fmt, ext = IMAGE_FORMATS[i % len(IMAGE_FORMATS)] if kind == "good" else ("JPEG", "jpg")
        name = f"{i:05d}-{int(rng.integers(16**8)):08x}.{ext}"
        url = f"{prefix}laion_coco/images/{name}"
        if kind == "good" and i == 1:
            hash_value = None  # a row without hash: the key falls back to crc32(URL)
        if kind == "good":
            (out / "images" / name).write_bytes(image_bytes(width, height, fmt, rng))
        elif kind == "html":
            (out / "images" / name).write_bytes(HTML_PAGE)
        elif kind == "null_url":
            url = None
        key = laion_key(hash_value, url or "")
        punsafe = float(rng.uniform(0.6, 0.95)) if i in high_punsafe_at else float(rng.uniform(0.0, 0.1))
        if kind == "good":
            items[key] = dict(width=width, height=height, format=fmt)
            if i in high_punsafe_at:
                high_punsafe.append(key)
        if defect:
            defects[key] = {"stage": defect[0], "reason": defect[1]}
        captions = [caption(rng, 4, 16) for _ in range(5)]
        similarities = sorted((float(s) for s in rng.uniform(0.2, 0.45, 5)), reverse=True)
        rows.append(
            dict(
                URL=url,
                TEXT=caption(rng, 1, 8),
                top_caption=captions[0],
                all_captions=captions,
                all_similarities=similarities,
                similarity=similarities[0],
                hash=hash_value,
                punsafe=punsafe,
                pwatermark=float(rng.uniform(0.0, 0.6)),
                WIDTH=width,
                HEIGHT=height,
                LICENSE="?",  # an extra column, as real parts have: readers must ignore it
            )
        )
        progress.advance(task)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    # as real parts: every column nullable (the null URL is a planted defect), plus an extra column
    schema = pa.schema(
        [f.with_nullable(True) for f in LAION_COCO_SCHEMA] + [pa.field("LICENSE", pa.string())]
    )
    part = f"part-00000-{uuid.UUID(bytes=rng.bytes(16), version=4)}-c000.snappy.parquet"
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, out / part, compression="snappy", row_group_size=8)
    return {
        "manifest": f"laion_coco/{part}",
        "url_prefix": prefix,
        "rows": len(rows),
        "keys": [laion_key(r["hash"], r["URL"] or "") for r in rows],
        "defects": defects,
        "high_punsafe": high_punsafe,
        "items": items,
    }


def _pack_tgz(folder: Path, archive: Path) -> None:
    """imgs/000/ -> imgs/000.tgz (members "000/<name>"), byte-identical for the same files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            info = tarfile.TarInfo(f"{folder.name}/{path.name}")
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
    with open(archive, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(buffer.getvalue())


def _write_jdb(out: Path, rng: np.random.Generator, jdb_images: int, pack: bool, progress) -> dict:
    """train_anno_realease_repath.jsonl + imgs/000/*.jpg (or imgs/000.tgz), with the defects."""
    train = out / "data" / "train"
    folder = train / "imgs" / "000"
    folder.mkdir(parents=True, exist_ok=True)
    plan = [("good", None)] * jdb_images + [
        ("missing", ("fetch", "not_found")),
        ("bad_json", ("read", "bad_json")),
    ]
    lines, defects, items = [], {}, {}
    task = progress.add_task("jdb images", total=len(plan))
    for i, (kind, _) in enumerate(plan):
        image_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        width, height = JDB_SIZES[i % len(JDB_SIZES)]
        prompt = caption(rng, 5, 30) + ", highly detailed, --ar 1:1 --v 5"
        row = {
            "img_path": f"./000/{image_id}.jpg",
            "prompt": prompt,
            "Task1": {
                "Style": ["photorealistic", "cinematic"][: 1 + i % 2],
                "Content": [w.strip(",.;:-") for w in caption(rng, 2, 5).split()],
            },
        }
        if i % 3 != 2:  # some rows have no Task2: the caption falls back to the prompt
            row["Task2"] = {"Caption": caption(rng, 6, 25)}
        if kind == "good":
            (folder / f"{image_id}.jpg").write_bytes(image_bytes(width, height, "JPEG", rng))
            items[f"jdb_{image_id}"] = dict(width=width, height=height)
        lines.append((f"jdb_{image_id}", json.dumps(row, ensure_ascii=False), kind))
        progress.advance(task)
    lines = [lines[i] for i in rng.permutation(len(lines))]
    keys = []
    for row_number, (key, text, kind) in enumerate(lines):
        if kind == "bad_json":  # a truncated line: its key is the reader's fallback
            key = f"jdb_row{row_number}"
            lines[row_number] = (key, text[: len(text) // 2], kind)
        defect = dict(plan)[kind]
        if defect:
            defects[key] = {"stage": defect[0], "reason": defect[1]}
        keys.append(key)
    manifest = out / "data" / "train" / "train_anno_realease_repath.jsonl"
    manifest.write_text("".join(text + "\n" for _, text, _ in lines), encoding="utf-8")
    if pack:
        _pack_tgz(folder, folder.with_suffix(".tgz"))
        shutil.rmtree(folder)
    return {"manifest": JDB_MANIFEST, "rows": len(lines), "keys": keys, "defects": defects, "items": items}


def generate(
    out: str,
    *,
    seed: int = 0,
    videos: int = 12,
    images: int = 12,
    jdb_images: int = 8,
    port: int = 8765,
    pack_jdb: bool = False,
    progress: bool = False,
) -> dict:
    """Write the three sample datasets under `out` and `out/expected.json`; return what expected.json holds.

    `videos`, `images`, `jdb_images` count the good items; the planted defects come on top. The same seed
    gives the same rows, keys, sizes, defects and bytes. `out/webvid`, `out/laion_coco` and `out/jdb`
    are replaced.
    """
    for name, value in (("videos", videos), ("images", images), ("jdb_images", jdb_images)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    root = Path(out)
    for name in ("webvid", "laion_coco", "jdb"):
        shutil.rmtree(root / name, ignore_errors=True)
        (root / name).mkdir(parents=True)
    with Progress(disable=not progress, transient=True) as bar:
        expected = {
            "seed": seed,
            "port": port,
            "webvid": _write_webvid(root / "webvid", rng_for("webvid", seed), videos, port, bar),
            "laion_coco": _write_laion(root / "laion_coco", rng_for("laion_coco", seed), images, port, bar),
            "jdb": _write_jdb(root / "jdb", rng_for("jdb", seed), jdb_images, pack_jdb, bar),
        }
    expected["jdb"]["packed"] = pack_jdb
    (root / "expected.json").write_text(
        json.dumps(expected, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    return expected


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="latentcrafter sample-data",
        description="Write WebVid-10M, LAION-COCO and JourneyDB in miniature (real formats, planted defects) "
        "and OUT/expected.json describing them.",
    )
    parser.add_argument("out", help="output folder (its webvid/, laion_coco/ and jdb/ are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same seed writes the same data")
    parser.add_argument("--videos", type=int, default=12, help="good WebVid videos (defects come on top)")
    parser.add_argument("--images", type=int, default=12, help="good LAION-COCO images (defects come on top)")
    parser.add_argument("--jdb-images", type=int, default=8, help="good JourneyDB images (defects on top)")
    parser.add_argument(
        "--port", type=int, default=8765, help="port of the http://127.0.0.1 URLs in the manifests"
    )
    parser.add_argument("--pack-jdb", action="store_true", help="ship JourneyDB images as imgs/000.tgz")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    expected = generate(
        args.out,
        seed=args.seed,
        videos=args.videos,
        images=args.images,
        jdb_images=args.jdb_images,
        port=args.port,
        pack_jdb=args.pack_jdb,
        progress=True,
    )
    root = Path(args.out)
    for name in ("webvid", "laion_coco", "jdb"):
        info = expected[name]
        print(
            f"{name:<11} {info['rows']:>4} rows, {len(info['defects'])} planted defects, "
            f"{_folder_size(root / name) / 1e6:.2f} MB  {os.path.join(args.out, info['manifest'])}"
        )
    print(f"expected results: {root / 'expected.json'}  ({time.perf_counter() - start:.1f} s)")
    print(f"serve the URLs with: latentcrafter serve-sample {args.out} --port {args.port}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
