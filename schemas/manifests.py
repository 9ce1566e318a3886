"""Schemas of the three datasets' own metadata files, as they ship (WebVid-10M, LAION-COCO, JourneyDB)."""

from __future__ import annotations

import pyarrow as pa

# WebVid-10M `results_10M_train.csv` / `results_2M_val.csv`. `duration` is ISO-8601 ("PT00H00M17S").
WEBVID_CSV_SCHEMA = pa.schema(
    [
        pa.field("videoid", pa.int64(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("page_idx", pa.int64()),
        pa.field("page_dir", pa.string()),
        pa.field("duration", pa.string()),
        pa.field("contentUrl", pa.string()),
    ]
)
WEBVID_REQUIRED = ("videoid", "name", "page_dir", "duration", "contentUrl")

# LAION-COCO `part-*.snappy.parquet`. Real parts carry extra columns; readers tolerate them.
LAION_COCO_SCHEMA = pa.schema(
    [
        pa.field("URL", pa.string(), nullable=False),
        pa.field("TEXT", pa.string()),
        pa.field("top_caption", pa.string()),
        pa.field("all_captions", pa.list_(pa.string())),
        pa.field("all_similarities", pa.list_(pa.float64())),
        pa.field("similarity", pa.float64()),
        pa.field("hash", pa.int64()),
        pa.field("punsafe", pa.float64()),
        pa.field("pwatermark", pa.float64()),
        pa.field("WIDTH", pa.int64()),
        pa.field("HEIGHT", pa.int64()),
    ]
)
LAION_COCO_REQUIRED = ("URL", "top_caption")

# JourneyDB `train_anno_realease_repath.jsonl` (sic: the real file name has that spelling).
JDB_TASK1_TYPE = pa.struct(
    [pa.field("Style", pa.list_(pa.string())), pa.field("Content", pa.list_(pa.string()))]
)
JDB_TASK2_TYPE = pa.struct([pa.field("Caption", pa.string())])
JDB_ANNOTATION_SCHEMA = pa.schema(
    [
        pa.field("img_path", pa.string(), nullable=False),  # "./000/<uuid>.jpg", relative to imgs/
        pa.field("prompt", pa.string()),
        pa.field("Task1", JDB_TASK1_TYPE),
        pa.field("Task2", JDB_TASK2_TYPE),
    ]
)
JDB_REQUIRED = ("img_path", "prompt")
