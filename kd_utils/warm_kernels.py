"""Warm kernels: a cell's Jupyter kernel forked from a process that has already imported the study's
modules, so that it starts in well under a second instead of the ~7 s that importing torch,
transformers, pandas and kd_utils takes on a CPU core (a micro-study runs about 80 kernels).

One fork server per local worker (`serve`, started by `start_server`) imports the modules once and
waits on a Unix socket. A kernel's command line (`kernel_command`) is a small client, `python -m
kd_utils.warm_kernels connect -f <connection file>`, that imports nothing heavy: it hands the server
its standard streams, working directory and environment; the server forks a child that becomes the
ipykernel kernel. The client stands in for the kernel towards jupyter_client: it forwards signals to
the child, writes the child's pid where the runner reads peak memory (``KD_KERNEL_PID_FILE``), and
ends as the child ended (the same exit code or the same signal). A child whose client is killed is
killed too. Each kernel is a fresh process: nothing a cell does reaches the next one.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SERVER_ENV = "KD_WARM_KERNELS"    # the fork server's socket, read by the client
PID_FILE_ENV = "KD_KERNEL_PID_FILE"  # where the client writes the kernel's pid
PRELOAD = ("torch", "transformers", "transformers.generation", "pandas", "scipy.stats", "matplotlib",
           "matplotlib_inline.backend_inline", "ipykernel.kernelapp")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_HEADER = struct.Struct("!I")


def kernel_command(connection_file: str) -> list[str]:
    """The command line of a warm kernel (the client), in place of the kernelspec's."""
    return [sys.executable, "-m", "kd_utils.warm_kernels", "connect", "-f", connection_file]


def start_server(folder: str | Path, timeout: float = 120.0) -> subprocess.Popen:
    """Start a fork server listening in `folder`; returns once it accepts kernels."""
    path = Path(folder) / "server"
    process = subprocess.Popen([sys.executable, "-m", "kd_utils.warm_kernels", "serve", str(path)],
                               stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the warm-kernel server did not start (exit code {process.poll()})")
        time.sleep(0.05)
    os.environ[SERVER_ENV] = str(path)
    return process


# ---------------------------------------------------------------- server


def _preload() -> None:
    """Import the modules every cell imports: third-party ones, then every kd_utils module."""
    import importlib
    import pkgutil

    import kd_utils

    names = list(PRELOAD) + [f"kd_utils.{m.name}" for m in pkgutil.iter_modules(kd_utils.__path__)
                             if m.name not in ("warm_kernels", "grid", "engine")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional dependency missing: the kernel imports it itself
            print(f"warm kernels: not preloaded {name}: {type(exc).__name__}: {exc}", file=sys.stderr)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    (size,) = _HEADER.unpack(data)
    payload = b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise ConnectionError("client went away")
        payload += chunk
    return json.loads(payload), list(fds)


def _become_kernel(request: dict, fds: list[int]) -> None:
    """In the forked child: take the client's streams, place and environment, and run ipykernel."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    from ipykernel.kernelapp import IPKernelApp

    sys.argv = ["ipykernel_launcher", *request["argv"]]
    IPKernelApp.launch_instance(argv=request["argv"])


def serve(path: str) -> None:
    """The fork server: preload, then fork one kernel per client until the parent goes away."""
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # as ipykernel_launcher: the kernel's folder is not on the path
    _preload()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped: kill the kernels, remove the socket
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)
    listener.listen(8)
    children: dict[int, socket.socket] = {}  # kernel pid -> its client's connection
    try:
        while os.getppid() == parent:
            ready, _, _ = select.select([listener, *children.values()], [], [], 0.2)
            for conn in ready:
                if conn is listener:
                    client, _ = listener.accept()
                    try:
                        request, fds = _receive(client)
                    except (OSError, ValueError, ConnectionError):
                        client.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        code = 1
                        try:
                            listener.close()
                            client.close()
                            for other in children.values():
                                other.close()
                            _become_kernel(request, fds)
                            code = 0
                        except SystemExit as exc:
                            code = exc.code if isinstance(exc.code, int) else 1
                        except BaseException:
                            import traceback
                            traceback.print_exc()
                        finally:
                            sys.stdout.flush()
                            sys.stderr.flush()
                            os._exit(code)
                    for fd in fds:
                        os.close(fd)
                    client.sendall(f"pid {pid}\n".encode())
                    children[pid] = client
                else:  # a client's connection closed: its kernel must not outlive it
                    pid = next(p for p, c in children.items() if c is conn)
                    if not conn.recv(1):
                        _kill(pid)
                        os.waitpid(pid, 0)  # reaped here, so its closed connection leaves the select set
                        children.pop(pid).close()
            _reap(children)
    finally:
        for pid in children:
            _kill(pid)
        listener.close()
        Path(path).unlink(missing_ok=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(children: dict[int, socket.socket]) -> None:
    """Tell each client whose kernel ended how it ended (its raw wait status)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        client = children.pop(pid, None)
        if client is not None:
            try:
                client.sendall(f"status {status}\n".encode())
            except OSError:
                pass
            client.close()


# ---------------------------------------------------------------- client


def connect(argv: list[str]) -> int:
    """The client: have the server fork a kernel with this process's streams, and end as it ends."""
    server = os.environ.get(SERVER_ENV)
    if not server:
        print(f"warm kernels: {SERVER_ENV} is not set", file=sys.stderr)
        return 2
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(server)
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [_HEADER.pack(len(payload))], [0, 1, 2])
    conn.sendall(payload)
    reader = conn.makefile("r")
    pid = int(reader.readline().split()[1])
    pid_file = os.environ.get(PID_FILE_ENV)
    if pid_file:
        Path(pid_file).write_text(str(pid))

    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    line = reader.readline()
    if not line:  # the server died: so did (or will) the kernel
        return 1
    status = int(line.split()[1])
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    elif sys.argv[1:2] == ["connect"]:
        sys.exit(connect(sys.argv[2:]))
    else:
        sys.exit("usage: python -m kd_utils.warm_kernels serve PATH | connect -f CONNECTION_FILE")
