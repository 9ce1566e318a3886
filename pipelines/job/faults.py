"""Fault injection for the reliability tests: a worker killed in a given stage, a shard whose writes the kernel refuses.

Off unless the driver's environment has LATENTCRAFTER_TEST_FAULTS, a JSON object (the job forwards it to
its workers):

    {"dir": "/tmp/markers",                               each fault fires once: a marker file per fault
     "kill": ["fetch:webvid/256x256/0", "encode_actor"],  SIGKILL the process on entering that stage
     "fsize": {"laion_coco/256x256/1": 4096}}             RLIMIT_FSIZE while that shard writes

Stages: read, fetch, decode, write (the shard task, for the named shard) and encode_actor (the first encode
call of any encoder actor). RLIMIT_FSIZE makes write(2) fail with EFBIG past the limit: the same failure path
as a full disk (ENOSPC), produced by the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

ENV = "LATENTCRAFTER_TEST_FAULTS"


def _spec() -> dict:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else {}


def _once(spec: dict, name: str) -> bool:
    """True the first time `name` fires across all processes (an O_EXCL marker file)."""
    path = os.path.join(spec["dir"], name.replace("/", "_").replace(":", "-"))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def shard_name(task: dict) -> str:
    return f"{task['source']}/{task['stage']}/{task['shard']}"


def at(stage: str, task: dict | None = None) -> None:
    """Kill this process if the spec names `stage` (for this task's shard) and it has not fired yet."""
    spec = _spec()
    if not spec:
        return
    name = stage if task is None else f"{stage}:{shard_name(task)}"
    if name in spec.get("kill", ()) and _once(spec, name):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def write_limit(task: dict):
    """While writing the shard: the file size limit the spec gives it (once), else nothing."""
    spec = _spec()
    limit = spec.get("fsize", {}).get(shard_name(task)) if spec else None
    if limit is None or not _once(spec, f"fsize:{shard_name(task)}"):
        yield
        return
    import resource

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def worker_env() -> dict[str, str]:
    """The variables the driver forwards to its workers (empty unless faults are on)."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}
