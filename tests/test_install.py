"""The environment `make` builds: CPU torch, no CUDA wheels, none of the packages that break this stack."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys

import pytest

FORBIDDEN = ("torchvision", "open-clip-torch", "open_clip_torch", "timm")


def _installed() -> set[str]:
    return {(d.metadata["Name"] or "").lower() for d in md.distributions()}


def test_no_cuda_wheels_unless_asked_for():
    if os.environ.get("ALLOW_CUDA"):
        pytest.skip("ALLOW_CUDA is set: CUDA wheels are wanted in this environment")
    cuda = sorted(name for name in _installed() if name.startswith("nvidia") or "cuda" in name)
    assert cuda == [], f"CUDA packages in {sys.prefix}: {cuda} (check TORCH_SPEC and the dependency pins)"


def test_no_package_that_breaks_diffusers_or_transformers():
    present = sorted(set(FORBIDDEN) & _installed())
    assert present == [], f"{present} installed: their CUDA builds break `import diffusers` here"


def test_console_script_lists_every_command():
    exe = shutil.which("latentcrafter", path=os.path.dirname(sys.executable))
    assert exe, "the latentcrafter console script is not installed beside this python"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("sample-data", "serve-sample", "tiny-models", "encode", "stats", "train"):
        assert command in out
    bad = subprocess.run([exe, "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
