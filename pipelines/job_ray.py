"""Ray for the encode job: joining a cluster or starting an embedded one, and the Ray Data stage graph."""

from __future__ import annotations

import dataclasses
import os

from pipelines.config import PipelineConfig, RayConfig
from pipelines.decode import DecodeStage
from pipelines.fetch import FetchStage
from pipelines.filters import FilterStage
from pipelines.job_stages import EncodeRowsStage, read_batch

WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def init_ray(cfg: RayConfig) -> bool:
    """Connect Ray; True when this call started an embedded Ray (the caller shuts it down).

    address "auto": join the cluster this runs on (RAY_ADDRESS, `ray submit`, a `ray start` on this
    machine), else start an embedded one; "local": always embedded; anything else: that address.
    """
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if cfg.address not in ("auto", "local"):
        ray.init(address=cfg.address, runtime_env=runtime_env)
        return False
    if cfg.address == "auto":
        try:
            ray.init(address="auto", runtime_env=runtime_env)
            print(f"encode: joined the Ray cluster at {ray.get_runtime_context().gcs_address}", flush=True)
            return False
        except ConnectionError:
            pass  # no cluster here: embedded
    ray.init(
        num_cpus=cfg.num_cpus,
        object_store_memory=None if cfg.object_store_memory_mb is None else cfg.object_store_memory_mb << 20,
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
    )
    print(f"encode: started an embedded Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)", flush=True)
    return True


def _encode_gpus(cfg: RayConfig) -> float:
    import ray

    if cfg.gpus_per_actor is not None:
        return float(cfg.gpus_per_actor)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def filter_batch(batch, config: dict, which: str):
    """Ray Data UDF form of FilterStage (a task, fused with the read)."""
    return FilterStage(config, which)(batch)


def build_dataset(tasks: list[dict], config: PipelineConfig):
    """The streaming Ray Data graph; rows come out in task order (so shards complete one after another)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    rc = config.ray
    filters = dataclasses.asdict(config.filters)
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    ds = ds.map_batches(read_batch, batch_size=1, batch_format="pyarrow", num_cpus=rc.cpus_per_read_task)
    ds = ds.map_batches(
        filter_batch,
        fn_kwargs={"config": filters, "which": "metadata"},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=rc.cpus_per_read_task,
    )
    ds = ds.map_batches(
        FetchStage,
        fn_constructor_kwargs={"config": dataclasses.asdict(config.fetch)},
        batch_size=None,  # the whole read unit (one block): one bundle per unit, fetched concurrently
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=rc.fetch_workers),
        num_cpus=rc.cpus_per_fetch_worker,
    )
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={"config": dataclasses.asdict(config.decode), "seed": config.seed},
        batch_size=rc.decode_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=rc.decode_workers),
        num_cpus=rc.cpus_per_decode_worker,
    )
    ds = ds.map_batches(
        EncodeRowsStage,
        fn_constructor_kwargs={"models": dataclasses.asdict(config.models), "filters": filters},
        batch_size=rc.encode_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=rc.encode_actors),
        num_cpus=rc.cpus_per_encode_actor,
        num_gpus=_encode_gpus(rc),
    )
    return ds
