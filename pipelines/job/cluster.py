"""Ray for the encode job: joining a cluster or starting an embedded one, and the encoder actor pool."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from pipelines.config import PipelineConfig, RayConfig

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
    from pipelines.job import faults

    runtime_env = {"env_vars": {**WORKER_ENV, **faults.worker_env()}}
    if cfg.address not in ("auto", "local"):
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=cfg.worker_logs)
        return False
    if cfg.address == "auto":
        try:
            ray.init(address="auto", runtime_env=runtime_env, log_to_driver=cfg.worker_logs)
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
        log_to_driver=cfg.worker_logs,
        logging_level=logging.WARNING,  # our own line below says it started; no INFO banner
    )
    print(f"encode: started an embedded Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)", flush=True)
    return True


class EncoderActor:
    """One copy of the frozen encoders (a GPU each when the cluster has GPUs), called by the shard tasks."""

    def __init__(self, models: dict, filters: dict, storage: dict):
        from pipelines.stages.encode import EncodeRowsStage

        self.stage = EncodeRowsStage(models, filters, storage)
        self.busy_s, self.calls, self.rows = 0.0, 0, 0

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def encode(self, table):
        from pipelines.job import faults

        faults.at("encode_actor")
        started = time.perf_counter()
        out = self.stage(table)
        self.busy_s += time.perf_counter() - started
        self.calls, self.rows = self.calls + 1, self.rows + table.num_rows
        return out

    def stats(self) -> dict:
        """Seconds spent encoding, calls and rows since start (busy_s / wall time = the encoder's load)."""
        return {"busy_s": round(self.busy_s, 2), "calls": self.calls, "rows": self.rows}


def encoder_gpus(cfg: RayConfig) -> float:
    import ray

    if cfg.gpus_per_actor is not None:
        return float(cfg.gpus_per_actor)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def start_encoders(config: PipelineConfig) -> tuple[list, list]:
    """Start the encoder actors without waiting for them: (handles, refs of their node ids). Their models
    load while the driver plans; `ray.get` of the refs waits until every copy is loaded."""
    import ray

    rc = config.ray
    gpus = encoder_gpus(rc)
    count = rc.encode_actors
    if count is None:  # one per GPU share on a GPU cluster, else one
        count = max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus else 1
    actor_cls = ray.remote(EncoderActor).options(
        num_cpus=rc.cpus_per_encode_actor, num_gpus=gpus, max_restarts=-1, max_task_retries=-1
    )
    models, filters = dataclasses.asdict(config.models), dataclasses.asdict(config.filters)
    storage = dataclasses.asdict(config.storage)
    actors = [actor_cls.remote(models, filters, storage) for _ in range(count)]
    return actors, [a.node.remote() for a in actors]


def shard_task_slots(config: PipelineConfig, num_encoders: int) -> int:
    """How many shard tasks run at once: ray.shard_tasks, or what the cluster's free CPUs hold."""
    import ray

    rc = config.ray
    if rc.shard_tasks:
        return int(rc.shard_tasks)
    free = ray.cluster_resources().get("CPU", 1) - rc.cpus_per_encode_actor * num_encoders
    return max(1, int(free // rc.cpus_per_shard_task))
