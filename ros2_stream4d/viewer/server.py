"""Start Rerun viewers as child processes of ours: the web viewer served on 127.0.0.1 only, or a native window.

The `rerun` console script is a Python launcher that starts the real binary as *its* child, so stopping the
launcher would leave the viewer running; we start the bundled binary (rerun_cli/rerun, or $RERUN_CLI_PATH) itself
and stop exactly that process. The Python SDK's own `serve_web_viewer` binds every interface; the CLI's
`--bind 127.0.0.1` keeps both the gRPC proxy and the web server on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

LOOPBACK = "127.0.0.1"
DEFAULT_GRPC_PORT = 9876
DEFAULT_WEB_PORT = 9090


class ViewerUnavailable(RuntimeError):
    """A viewer could not start (no binary, port taken, no display); the message says why and what to do."""


def rerun_binary() -> str:
    override = os.environ.get("RERUN_CLI_PATH")
    if override:
        return override
    try:
        import rerun_cli
    except ImportError as exc:
        raise ViewerUnavailable("rerun-sdk is not installed (pip install -r requirements.txt)") from exc
    path = Path(rerun_cli.__file__).parent / ("rerun.exe" if sys.platform.startswith("win") else "rerun")
    if not path.exists():
        raise ViewerUnavailable(f"the rerun viewer binary is missing ({path})")
    return str(path)


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP port can be bound on host now (0 always can)."""
    if port == 0:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def url_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of a rerun+http(s):// URL (port 9876 when the URL has none)."""
    parsed = urlparse(url)
    return parsed.hostname or LOOPBACK, parsed.port or DEFAULT_GRPC_PORT


def proxy_url(grpc_port: int, host: str = LOOPBACK) -> str:
    return f"rerun+http://{host}:{grpc_port}/proxy"


def web_url(web_port: int, grpc_port: int, host: str = LOOPBACK) -> str:
    return f"http://{host}:{web_port}/?url={quote(proxy_url(grpc_port, host), safe='')}"


def display_available() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _wait_listening(proc: subprocess.Popen, ports, timeout: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-400:].strip() if log_path and log_path.exists() else ""
            raise ViewerUnavailable(f"the rerun viewer exited at start (code {proc.returncode}): {tail}")
        if all(not port_free(p) for p in ports):
            return
        if time.monotonic() > deadline:
            proc.terminate()
            raise ViewerUnavailable(f"the rerun viewer did not listen on {ports} within {timeout:.0f} s")
        time.sleep(0.05)


@dataclass
class ServedViewer:
    """A web viewer (and its gRPC proxy) served by a child process on 127.0.0.1."""

    proc: subprocess.Popen
    web_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        """Open this in a browser."""
        return web_url(self.web_port, self.grpc_port)

    @property
    def grpc_url(self) -> str:
        """SDKs log to this (RecordingStream.connect_grpc)."""
        return proxy_url(self.grpc_port)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def serve_web(files=(), web_port: int = DEFAULT_WEB_PORT, grpc_port: int = DEFAULT_GRPC_PORT,
              server_memory_limit: str = "1GiB", log_path: str | Path | None = None,
              timeout: float = 20.0) -> ServedViewer:
    """Serve Rerun's web viewer on 127.0.0.1 (HTTP on web_port; its gRPC proxy on grpc_port, where SDKs log and
    the given .rrd files are loaded). Ports 0 pick free ones. Raises ViewerUnavailable (port taken, no binary).
    The server keeps at most server_memory_limit of data, dropping the oldest."""
    web_port = web_port or free_port()
    grpc_port = grpc_port or free_port()
    for name, port in (("web viewer", web_port), ("gRPC", grpc_port)):
        if not port_free(port):
            raise ViewerUnavailable(f"{name} port {port} on {LOOPBACK} is taken (another viewer?); pick another port")
    cmd = [rerun_binary(), "--serve-web", "--bind", LOOPBACK, "--port", str(grpc_port), "--web-viewer-port",
           str(web_port), "--server-memory-limit", server_memory_limit, *[str(f) for f in files]]
    log_path = Path(log_path) if log_path else None
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if log_path:
        out.close()
    _wait_listening(proc, (web_port, grpc_port), timeout, log_path)
    return ServedViewer(proc, web_port, grpc_port)


def spawn_native(files=(), grpc_port: int = 0, memory_limit: str = "25%") -> subprocess.Popen:
    """A native viewer window (needs a display) opening the files, listening for SDKs on grpc_port (0: free)."""
    if not display_available():
        raise ViewerUnavailable("no display (DISPLAY / WAYLAND_DISPLAY unset) for a native viewer window")
    grpc_port = grpc_port or free_port()
    if not port_free(grpc_port):
        raise ViewerUnavailable(f"port {grpc_port} on {LOOPBACK} is taken (another viewer?)")
    cmd = [rerun_binary(), "--bind", LOOPBACK, "--port", str(grpc_port), "--memory-limit", memory_limit,
           *[str(f) for f in files]]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    _wait_listening(proc, (grpc_port,), 20.0, None)
    return proc
