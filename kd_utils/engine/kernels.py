"""A cell's Jupyter kernel: channels over Unix sockets, a watch on its process (why it died, its
peak memory) and, in local workers, a warm start forked from a server that has imported the
study's modules (kd_utils.warm_kernels)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from .. import warm_kernels


class KernelWatch:
    """A cell's kernel process: its exit status and its peak resident memory (VmHWM of
    /proc/<pid>/status, read every half second while it runs; Linux only), to say why it died."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.peak = 0  # bytes
        self.stopped = threading.Event()

    def start(self, process: subprocess.Popen) -> None:
        self.process = process
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        pid_file = os.environ.get(warm_kernels.PID_FILE_ENV, "")
        pid = self.process.pid
        while not self.stopped.is_set():
            if pid == self.process.pid and os.path.isfile(pid_file):  # a warm kernel: its client names it
                with contextlib.suppress(OSError, ValueError):
                    pid = int(Path(pid_file).read_text())
            try:
                hwm = next((line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                            if line.startswith("VmHWM:")), None)
            except OSError:
                return
            if hwm is None:  # a zombie: it has exited
                return
            self.peak = max(self.peak, int(hwm.split()[1]) * 1024)
            self.stopped.wait(0.5)

    def cause(self) -> str:
        """Why the kernel died, when a signal killed it ("" otherwise)."""
        if self.process is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):  # a warm kernel's client ends just after it
            self.process.wait(timeout=3)
        code = self.process.poll()
        if code is None or code >= 0:
            return ""
        text = f"the kernel was killed by signal {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            text += " (likely out of memory: the Linux OOM killer sends SIGKILL)"
        if self.peak:
            text += f"; its last measured peak resident memory was {self.peak / 2**30:.2f} GB"
        return text


def kernel_config(folder: Path, watch: KernelWatch, warm: bool) -> Any:
    """Kernel channels as Unix sockets in a private folder, not TCP ports, and a kernel manager
    that hands the kernel's process to ``watch`` (and, when ``warm``, forks it from the worker's
    warm-kernel server).

    Over TCP the kernel manager picks free ports and the kernel binds them later; meanwhile another
    worker's kernel or connection can take one, and the kernel dies ("Address already in use").
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets.config import Config

    class WatchedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            await super().start_kernel(**kw)
            watch.start(self.provisioner.process)

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            if warm:
                return warm_kernels.kernel_command(self.connection_file)
            return super().format_kernel_cmd(extra_arguments)

    return Config({"NotebookClient": {"kernel_manager_class": WatchedKernelManager},
                   "KernelManager": {"transport": "ipc", "ip": str(folder / "kernel")}})


_warm: dict[str, Any] = {}  # this worker's warm-kernel server: process, folder, threads


def warm_server(threads: int) -> bool:
    """Have a warm-kernel server for kernels of `threads` threads running in this worker (started
    on first use, restarted if it died or the thread count changed); False if it cannot start."""
    server = _warm.get("process")
    if server is not None and server.poll() is None and _warm["threads"] == threads:
        return True
    stop_warm_server()
    folder = tempfile.mkdtemp(prefix="kd-warm-")
    try:
        _warm.update(process=warm_kernels.start_server(folder), folder=folder, threads=threads)
    except RuntimeError as exc:
        print(f"{exc}; kernels start cold", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    return True


def stop_warm_server() -> None:
    """Stop this worker's warm-kernel server, if it has one."""
    if _warm:
        _warm["process"].terminate()
        _warm["process"].wait()
        shutil.rmtree(_warm["folder"], ignore_errors=True)
        _warm.clear()
