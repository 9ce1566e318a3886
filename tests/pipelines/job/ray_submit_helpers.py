"""A real `provider: local` Ray cluster on 127.0.0.1 over SSH, as a dedicated user, for the ray-submit test."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

USER = "lcray"  # the test's own user: its .bashrc activates the venv; `ray stop` as it touches only its processes


def run(
    cmd: list[str], timeout: float = 300, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tools() -> None:
    """sshd and rsync must be installed (.ci/run installs them: apt-get install openssh-server rsync)."""
    missing = [
        t
        for t in ("sshd", "rsync", "ssh", "ssh-keygen")
        if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()
    ]
    if missing:
        raise AssertionError(f"the ray-submit test needs {missing}: apt-get install -y openssh-server rsync")
    if os.geteuid() != 0:
        raise AssertionError("the ray-submit test creates a user and starts sshd: run it as root")


def start_sshd() -> subprocess.Popen | None:
    """An sshd on 127.0.0.1:22: None when one already listens, else the one started here (stop it after)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 22)) == 0:
            return None
    Path("/run/sshd").mkdir(exist_ok=True)
    run(["ssh-keygen", "-A"])
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-o", "ListenAddress=127.0.0.1", "-o", "PasswordAuthentication=no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 22)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("sshd did not start listening on 127.0.0.1:22")


def ensure_user(venv_bin: Path) -> Path:
    """The test user (created once) with a .bashrc that activates the venv; returns its home."""
    try:
        home = Path(pwd.getpwnam(USER).pw_dir)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/bash", USER])
        home = Path(pwd.getpwnam(USER).pw_dir)
    bashrc = (
        f"# written by tests/pipelines/test_ray_submit.py\nsource {venv_bin}/activate\n"
        f"export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 RAY_TMPDIR=/tmp/{USER}-ray\n"
    )
    (home / ".bashrc").write_text(bashrc)
    (home / ".profile").write_text("[ -f ~/.bashrc ] && . ~/.bashrc\n")
    uid = pwd.getpwnam(USER).pw_uid
    for name in (".bashrc", ".profile"):
        os.chown(home / name, uid, uid)
    Path(f"/tmp/{USER}-ray").mkdir(exist_ok=True)
    os.chown(f"/tmp/{USER}-ray", uid, uid)
    return home


def authorize_key(home: Path, key_dir: Path) -> Path:
    key = key_dir / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text((key_dir / "id_ed25519.pub").read_text())
    uid = pwd.getpwnam(USER).pw_uid
    for path in (ssh, ssh / "authorized_keys"):
        os.chown(path, uid, uid)
    os.chmod(ssh / "authorized_keys", 0o600)
    return key


class Traversable:
    """Lets other users reach a file (the interpreter, which links into e.g. /root/.pyenv; the venv, which may
    sit in a private checkout): adds o+x to the folders on its path that lack it, and puts the modes back on
    exit."""

    def __init__(self, target: str):
        self.changed: list[tuple[Path, int]] = []
        self.target = Path(os.path.realpath(target))

    def __enter__(self):
        for folder in reversed(self.target.parents):
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                self.changed.append((folder, stat.S_IMODE(mode)))
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
        return self

    def __exit__(self, *exc):
        for folder, mode in reversed(self.changed):
            os.chmod(folder, mode)


def cluster_yaml(name: str, key: Path, port: int, cpus: int) -> str:
    """A local-provider cluster: head 127.0.0.1, no workers, Ray ports chosen free, dashboard off."""
    ports = " ".join(
        f"--{flag}={free_port()}"
        for flag in ("ray-client-server-port", "dashboard-agent-listen-port", "metrics-export-port",
                     "node-manager-port", "object-manager-port", "runtime-env-agent-port")
    )  # fmt: skip
    return f"""
cluster_name: {name}
provider:
  type: local
  head_ip: 127.0.0.1
  worker_ips: []
auth:
  ssh_user: {USER}
  ssh_private_key: {key}
min_workers: 0
max_workers: 0
file_mounts: {{}}
setup_commands: []
head_setup_commands: []
initialization_commands: []
head_start_ray_commands:
  - ray start --head --port={port} --node-ip-address=127.0.0.1 --include-dashboard=false --num-cpus={cpus} --object-store-memory=300000000 {ports} --autoscaling-config=~/ray_bootstrap_config.yaml
worker_start_ray_commands: []
"""


def launcher_env() -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def cleanup_home(home: Path) -> None:
    """What `ray down` leaves behind on the head: ~/ray_bootstrap_* and the uploaded script."""
    for path in home.glob("ray_bootstrap_*"):
        path.unlink()
    for path in home.glob("encode_latents.py"):
        path.unlink()
