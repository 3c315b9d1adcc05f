"""A throwaway single-node SLURM cluster on this machine, for tests (needs root, slurm-wlm and munge).

`local_cluster(root)` starts munged (as the munge user, with a generated key), slurmctld and slurmd
with a configuration generated under root (state, spool, logs, sockets there too; non-default ports),
waits for the node to be idle and yields the environment clients need (SLURM_CONF). Everything is
stopped on exit. Install the daemons with `bash .ci/install_slurm.sh`.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue")
INSTALL_HINT = "install SLURM with `sudo bash .ci/install_slurm.sh` (Debian's slurm-wlm and munge)"


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None if it can."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "starting a local SLURM cluster needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"no 'munge' user: {INSTALL_HINT}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _start_munge(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start munged in the foreground as the munge user; return it and its socket."""
    munge = pwd.getpwnam("munge")
    home = root / "munge"
    home.mkdir()
    home.chmod(0o755)  # munged wants its socket's folder searchable by all
    key = home / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    for path in (home, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    sock = home / "munge.socket"
    daemon = subprocess.Popen(
        [
            "munged", "--foreground", f"--key-file={key}", f"--socket={sock}",
            f"--pid-file={home / 'munged.pid'}", f"--log-file={home / 'munged.log'}",
            f"--seed-file={home / 'munged.seed'}",
        ],
        user=munge.pw_uid, group=munge.pw_gid, extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not sock.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise RuntimeError(f"munged failed to start: {daemon.communicate()[1].decode().strip()}")
        time.sleep(0.1)
    return daemon, sock


def _write_conf(root: Path, munge_socket: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for folder in ("state", "spool", "log"):
        (root / folder).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=kdtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb() - 1024} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _wait_idle(env: dict[str, str], root: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        result = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=env, capture_output=True, text=True)
        state = (result.stdout + result.stderr).strip()
        if state == "idle":
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((root / "log").glob("*.log")))
    raise RuntimeError(f"the SLURM node did not become idle within {timeout:g} s (sinfo: {state!r})\n{logs}")


@contextlib.contextmanager
def local_cluster(root: Path) -> Iterator[dict[str, str]]:
    """Run a one-node cluster with its files under root (an empty directory); yield the clients' env."""
    root.chmod(0o755)  # munged, running as munge, must reach its folder
    munged, munge_socket = _start_munge(root)
    conf = _write_conf(root, munge_socket)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [munged]
    try:
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", socket.gethostname().split(".")[0]]):
            log = open(root / "log" / f"{daemon[0]}.out", "wb")
            daemons.append(subprocess.Popen(daemon, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        _wait_idle(env, root)
        yield env
    finally:
        subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=env, capture_output=True)
        for process in reversed(daemons):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
