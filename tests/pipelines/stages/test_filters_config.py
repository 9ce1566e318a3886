"""Filters (each check, its reason) and the pipeline config (YAML loading, validation naming the option)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import FilterConfig, config_from_dict, load_config
from pipelines.stages.filters import FilterStage, clip_score_reason, decoded_reason, metadata_reason
from pipelines.stages.rows import new_row, rows_of, table_of

REPO = Path(__file__).resolve().parents[3]


def test_each_filter_gives_its_reason():
    cfg = FilterConfig(
        min_duration=2, min_width=256, min_height=200, max_punsafe=0.5, max_pwatermark=0.4,
        min_similarity=0.3, min_clip_score=0.2,
    )  # fmt: skip
    assert metadata_reason({"punsafe": 0.7}, cfg)[0] == "punsafe"
    assert metadata_reason({"pwatermark": 0.41}, cfg)[0] == "pwatermark"
    assert metadata_reason({"similarity": 0.29}, cfg)[0] == "similarity"
    assert metadata_reason({"kind": "video", "duration": 1.5}, cfg)[0] == "min_duration"
    assert (
        metadata_reason({"punsafe": 0.1, "similarity": None, "kind": "image", "duration": 1.0}, cfg) is None
    )
    assert decoded_reason({"kind": "video", "src_duration": 1.0}, cfg)[0] == "min_duration"
    assert decoded_reason({"orig_width": 300, "orig_height": 150}, cfg)[0] == "min_resolution"
    assert decoded_reason({"orig_width": 300, "orig_height": 250}, cfg) is None
    assert clip_score_reason({"clip_score": 0.1}, cfg)[0] == "clip_score"
    assert clip_score_reason({"clip_score": None}, cfg) is None
    rows = [new_row(key="a", punsafe=0.9), new_row(key="b", punsafe=0.1)]
    out = rows_of(FilterStage(cfg, "metadata")(table_of(rows)))
    assert [(r["err_stage"], r["err_reason"]) for r in out] == [("filter", "punsafe"), ("", "")]
    assert "filters.max_punsafe" in out[0]["err_detail"]


def test_config_files_load_and_bad_options_are_named(tmp_path):
    for path in sorted((REPO / "configs" / "pipeline").glob("*.yaml")):
        assert load_config(str(path)).sources, path
    base = {"out_dir": "x", "models": {"model_dir": "m"}, "sources": [{"name": "jdb", "manifest": "a.jsonl"}]}
    assert config_from_dict(base).sources[0].resolutions == ["256x256"]
    cases = [
        ({"sources": [{"name": "jdb", "manifest": "a", "resolutions": ["250x250"]}]}, "resolutions"),
        ({"sources": [{"name": "youtube", "manifest": "a"}]}, "sources[].name"),
        ({"decode": {"start": "middle"}}, "decode.start"),
        ({"decode": {"frame_stride": None}}, "frame_stride or target_fps"),
        ({"filters": {"max_punsafe": 2}}, "filters.max_punsafe"),
        ({"ray": {"encode_actors": 0}}, "ray.encode_actors"),
        ({"fetch": {"bogus": 1}}, "fetch: unknown option"),
        ({"dedup": {"threshold": 3}}, "dedup.threshold"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            config_from_dict({**base, **change})
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: x\nmodels: {model_dir: m}\nsources: [{name: jdb, manifest: a.jsonl}]\n")
    assert load_config(str(path), ["ray.num_cpus=3", "decode.num_frames=4"]).ray.num_cpus == 3
