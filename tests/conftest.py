"""Session-wide fixtures built in code: the sample datasets, their HTTP server, and the tiny models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The three datasets in miniature (pipelines.tools.sample_data defaults), generated once per session."""
    from pipelines.tools.sample_data import generate

    out = tmp_path_factory.mktemp("sample_data")
    generate(str(out), seed=0)
    return out


@pytest.fixture(scope="session")
def sample_server(sample_data):
    """sample_data served over HTTP on 127.0.0.1; yields the base URL (no trailing slash)."""
    from pipelines.tools.serve import serve_in_thread

    server = serve_in_thread(str(sample_data))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, sample_data):
    """Tiny random models laid out like SD 2.1 (vae/ text_encoder/ tokenizer/ unet/) + image_encoder/."""
    from encoders.models import write_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    write_tiny_models(str(out), seed=0)
    return out


@pytest.fixture(scope="session")
def encoded_shards(tmp_path_factory, sample_data, sample_server, tiny_models):
    """The encode job run once (subprocess, embedded Ray) on `sample_data` with the tiny models: all three
    sources at 256x256, 8-frame clips, 5 rows per shard. Has `.out_dir` (shards), `.summary`, `.config`."""
    from types import SimpleNamespace

    from tests.pipelines.job.helpers import job_config, run_job, write_config

    root = tmp_path_factory.mktemp("encoded_shards")
    config = job_config(sample_data, tiny_models, root / "shards", sample_server)
    path = write_config(root / "job.yaml", config)
    summary = run_job(path, root / "summary.json")
    return SimpleNamespace(out_dir=root / "shards", summary=summary, config=config, config_path=path)
