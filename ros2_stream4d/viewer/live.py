"""LiveViewer: the running node's results, streamed to Rerun from a background thread, off the hot path.

    viewer = LiveViewer("serve", warn=logger.warning, info=logger.info)   # web viewer on 127.0.0.1:9090
    ...
    viewer.submit(frame_result, rgb)      # per processed frame: a deque append under a lock, never blocks
    viewer.submit_map(xyz, rgb, stamp)    # when the map is published: replaces the pending map, never blocks
    viewer.reset()                        # a new stream (the node reset its map)
    viewer.close()                        # at shutdown: stops the thread, flushes, stops the viewer it started

Hot path: `submit` keeps a reference (no copy) in a bounded deque; when it is full the oldest result is dropped
and counted (`dropped`). The thread takes the queued results in order, downsamples them (entities.ViewOptions) and logs the
entities of entities.py, the same as `stream4d view` records from the bags.

Memory stays bounded over any run length: the queue holds at most `queue_size` results, the trajectory at most
`options.path_points` vertices, one pending map; the viewer keeps at most `memory_limit` of data and drops the
oldest (Rerun's own limit, for the served viewer's gRPC buffer and the native window alike).

A viewer that cannot start (port taken, no display, nothing listening, no rerun-sdk) or that stops (its process
exits; in connect mode it stops listening, checked every CHECK_S, since the SDK would buffer every frame for an
unreachable viewer): one warning through `warn`, the thread ends, and `submit` returns False from then on at no
cost; the node maps on.

Modes: "serve" (Rerun's web viewer on 127.0.0.1: web_port for the page, grpc_port for data; the URL goes to
`info`), "spawn" (a native viewer window; needs a display), "connect" (a viewer or server already running at
`url`, e.g. `rerun --port 9876` started by the user), "save" (an .rrd file at `path`; no viewer at all).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ros2_stream4d.mapping.pipeline import Gated, Processed

if TYPE_CHECKING:  # rerun-sdk is imported by the thread only: without it the viewer warns, the node maps on
    from .entities import ViewOptions

MODES = ("serve", "spawn", "connect", "save")
# The thread looks for new results this often. submit() does not wake it: waking a thread from the node's thread
# hands it the CPU (and the GIL) right then, which measured as 2-15 ms stalls of submit on a loaded 2-core machine.
POLL_S = 0.02
CHECK_S = 2.0  # connect mode: how often the thread checks that the viewer still listens


def _default_live_options() -> ViewOptions:
    from .entities import ViewOptions

    # lighter than a recording: the viewer keeps up at camera rate on a busy CPU
    return ViewOptions(cloud_points=3000, map_points=100_000, depth_width=160, path_points=2000, jpeg_quality=75)


def _warm_up(options: ViewOptions) -> None:
    """Log one small frame of every kind into a throwaway recording (a byte stream): the SDK's first call of each
    archetype imports and builds its converters (hundreds of ms holding the GIL), which must not happen while the
    node is processing frames."""
    from types import SimpleNamespace

    from .entities import RunLogger
    from .recording import new_recording

    rec = new_recording(application_id="stream4d-warm-up")
    stream = rec.binary_stream()  # bytes nobody reads but us, below
    log = RunLogger(rec, options)
    K = np.array([[8.0, 0, 4], [0, 8, 3], [0, 0, 1]])
    frame = SimpleNamespace(stamp_ns=1, T_map_cam=np.eye(4), depth=np.ones((6, 8), np.float32),
                            confidence=np.ones((6, 8), np.float32), K=K, cloud_xyz=np.zeros((4, 3), np.float32),
                            cloud_rgb=np.zeros((4, 3), np.uint8), prediction=None)
    log.frame(frame, rgb=np.zeros((6, 8, 3), np.uint8))
    log.map(1, np.zeros((4, 3), np.float32), np.zeros((4, 3), np.uint8))
    rec.flush()
    stream.read()
    rec.disconnect()


class LiveViewer:
    """See the module docstring. mode: serve | spawn | connect | save; web_port / grpc_port (serve, spawn: 0 = any
    free port), url (connect), path (save); queue_size: results held at most; options: downsampling;
    map_period_s: the map is logged at most this often; memory_limit: the viewer's data limit (serve, spawn);
    cloud_in_camera: FrameResult.cloud_xyz is in the camera frame (cloud_frame:=camera); camera: the camera index
    shown (None: all); warn / info: the node's logger; start: start the thread now (else start())."""

    def __init__(self, mode: str = "serve", *, web_port: int = 9090, grpc_port: int = 9876, url: str | None = None,
                 path: str | Path | None = None, queue_size: int = 2, options: ViewOptions | None = None,
                 map_period_s: float = 2.0, memory_limit: str = "512MiB", cloud_in_camera: bool = False,
                 camera: int | None = 0,
                 warn: Callable[[str], Any] | None = None, info: Callable[[str], Any] | None = None,
                 start: bool = True):
        if mode not in MODES:
            raise ValueError(f"viewer mode must be one of {MODES}, got {mode!r}")
        if mode == "save" and not path:
            raise ValueError("viewer mode 'save' needs a path")
        self.mode, self.web_port, self.grpc_port, self.url, self.path = mode, web_port, grpc_port, url, path
        self.options = options
        self.map_period_s = float(map_period_s)
        self.memory_limit = memory_limit
        self.cloud_in_camera = bool(cloud_in_camera)  # FrameResult.cloud_xyz in the camera frame (cloud_frame)
        self.camera = camera  # results of this camera index only (None: all, sharing the camera entities)
        self._warn = warn or (lambda msg: None)
        self._info = info or (lambda msg: None)
        self._queue: deque = deque(maxlen=max(1, int(queue_size)))
        self._cond = threading.Condition()
        self._pending_map: tuple | None = None
        self._pending_reset = False
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the viewer is up and the SDK warmed up (or it failed)
        self._disabled = False
        self._thread: threading.Thread | None = None
        self._viewer = None  # server.ServedViewer or a Popen we started
        self._endpoint: tuple[str, int] | None = None  # connect: (host, port) checked every CHECK_S
        self.view_url: str | None = None  # serve: the page to open
        # counters (read by the node's diagnostics and the benchmark)
        self.submitted = 0
        self.dropped = 0
        self.logged = 0
        self.maps_logged = 0
        self.thread_cpu_s = 0.0  # CPU time of the logging thread
        self.failure: str | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ hot path (node thread)
    @property
    def active(self) -> bool:
        """False once the viewer failed or was closed: submit() is then a no-op."""
        return not self._disabled

    def submit(self, result, rgb: np.ndarray | None = None, K_rgb: np.ndarray | None = None) -> bool:
        """Queue one mapping FrameResult (or the pipeline's Processed outcome holding one) and, optionally, the
        source camera image with its intrinsics when they are not result.K (else the image the model saw is
        shown). Never blocks; drops the oldest queued result when full. False when the viewer is off or the
        result is another camera's.
        Does not wake the logging thread (it polls every POLL_S): see POLL_S."""
        if self._disabled:
            return False
        if self.camera is not None:
            r = result if hasattr(result, "stamp_ns") else getattr(result, "result", None)
            if r is None or getattr(r, "camera", 0) != self.camera:
                return False
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append((result, rgb, K_rgb))
            self.submitted += 1
        return True

    def submit_map(self, xyz: np.ndarray, rgb: np.ndarray | None = None, stamp_ns: int | None = None) -> bool:
        """The accumulated map (replaces a map not yet logged); logged at most every map_period_s."""
        if self._disabled:
            return False
        with self._cond:
            self._pending_map = (xyz, rgb, stamp_ns)
        return True

    def reset(self) -> None:
        """A new stream: the trajectory starts over (queued results of the old stream are dropped)."""
        with self._cond:
            self.dropped += len(self._queue)
            self._queue.clear()
            self._pending_reset = True
            self._cond.notify()

    def pending(self) -> int:
        return len(self._queue)

    def stats(self) -> dict[str, Any]:
        return {"viewer": self.mode, "viewer url": self.view_url or "", "viewer frames logged": self.logged,
                "viewer frames dropped": self.dropped, "viewer thread cpu [s]": round(self.thread_cpu_s, 2),
                "viewer failure": self.failure or ""}

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        if self._thread is None and not self._disabled:
            self._thread = threading.Thread(target=self._run, name="stream4d-rerun", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Log what is still queued (for up to half the timeout; the rest is dropped and counted), stop the thread,
        flush, stop a viewer we started."""
        deadline = time.monotonic() + timeout / 2
        while self._thread is not None and self._thread.is_alive() and not self._disabled and \
                self._queue and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cond:
            self.dropped += len(self._queue)
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._disabled = True
        self._stop_viewer()

    def __enter__(self) -> LiveViewer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ logging thread
    def _fail(self, message: str) -> None:
        self._disabled = True
        self.ready.set()
        self.failure = message
        with self._cond:
            self.dropped += len(self._queue)
            self._queue.clear()
            self._pending_map = None
        self._warn(message)

    def _open(self):
        from . import server
        from .entities import default_blueprint
        from .recording import new_recording

        rec = new_recording(recording_id=f"stream4d-live-{time.strftime('%Y%m%d-%H%M%S')}")
        blueprint = default_blueprint()
        if self.mode == "serve":
            self._viewer = server.serve_web(web_port=self.web_port, grpc_port=self.grpc_port,
                                            server_memory_limit=self.memory_limit)
            self.view_url = self._viewer.url
            rec.connect_grpc(self._viewer.grpc_url, default_blueprint=blueprint)
            self._info(f"viewer:=rerun: open {self.view_url} in a browser on this machine")
        elif self.mode == "spawn":
            self._viewer = server.spawn_native(grpc_port=self.grpc_port, memory_limit=self.memory_limit)
            rec.connect_grpc(server.proxy_url(self.grpc_port), default_blueprint=blueprint)
            self._info(f"viewer:=rerun: native viewer window on port {self.grpc_port}")
        elif self.mode == "connect":
            url = self.url or server.proxy_url(self.grpc_port)
            self._endpoint = server.url_endpoint(url)
            if not server.listening(*self._endpoint):
                raise server.ViewerUnavailable(f"nothing listens at {url} (start a viewer there: rerun --port "
                                               f"{self._endpoint[1]})")
            rec.connect_grpc(url, default_blueprint=blueprint)
            self._info(f"viewer:=rerun: logging to {url}")
        else:
            rec.save(self.path, default_blueprint=blueprint)
            self._info(f"viewer:=rerun: recording to {self.path}")
        return rec

    def _run(self) -> None:
        from . import server

        try:
            from .entities import RunLogger

            self.options = self.options or _default_live_options()
            rec = self._open()
            log = RunLogger(rec, self.options)
            log.setup(blueprint=False)
            _warm_up(self.options)
        except Exception as exc:  # noqa: BLE001 - any failure to start means: warn once and map on
            self._stop_viewer()
            self._fail(f"viewer:=rerun could not start ({type(exc).__name__}: {exc}); mapping goes on without "
                       "a viewer")
            return
        self.ready.set()
        last_map = last_check = -1e9
        cpu0 = time.thread_time()
        try:
            while not self._stop.is_set():
                with self._cond:
                    while not (self._queue or self._pending_map or self._pending_reset or self._stop.is_set()):
                        self._cond.wait(POLL_S)
                    item = self._queue.popleft() if self._queue else None
                    reset, self._pending_reset = self._pending_reset, False
                    map_item = None
                    if self._pending_map is not None and time.monotonic() - last_map >= self.map_period_s:
                        map_item, self._pending_map = self._pending_map, None
                if self._stop.is_set():
                    break
                if self._viewer is not None and not self._viewer_alive():
                    self._fail("viewer:=rerun: the viewer process exited; mapping goes on without a viewer")
                    break
                if self._endpoint is not None and time.monotonic() - last_check > CHECK_S:
                    # the SDK buffers everything while a viewer is unreachable: stop before memory grows
                    last_check = time.monotonic()
                    if not server.listening(*self._endpoint):
                        self._fail(f"viewer:=rerun: the viewer at {self.url or self._endpoint} went away; mapping "
                                   "goes on without a viewer")
                        break
                if reset:
                    log.reset_paths()
                if item is not None:
                    result, rgb, K_rgb = item
                    if isinstance(result, Processed | Gated):  # an outcome: its FrameResult
                        result = result.result
                    if result is not None:
                        log.frame(result, rgb=rgb, K_rgb=K_rgb, cloud_in_camera=self.cloud_in_camera)
                        self.logged += 1
                if map_item is not None:
                    xyz, rgb, stamp = map_item
                    log.map(stamp, xyz, rgb)
                    self.maps_logged += 1
                    last_map = time.monotonic()
                elif item is None and self._pending_map is not None:
                    self._stop.wait(0.05)  # only a map waiting for its period: do not spin
                self.thread_cpu_s = time.thread_time() - cpu0
        except Exception as exc:  # noqa: BLE001 - a logging failure must never reach the node
            self._fail(f"viewer:=rerun stopped ({type(exc).__name__}: {exc}); mapping goes on without a viewer")
        finally:
            self.thread_cpu_s = time.thread_time() - cpu0
            try:
                rec.flush(timeout_sec=2.0)
                rec.disconnect()
            except Exception:  # noqa: BLE001, S110 - shutting down anyway
                pass
            if self._stop.is_set():  # close() gave up waiting for a slow start: the viewer is ours to stop
                self._stop_viewer()

    def _viewer_alive(self) -> bool:
        v = self._viewer
        return v.alive() if hasattr(v, "alive") else v.poll() is None

    def _stop_viewer(self) -> None:
        v, self._viewer = self._viewer, None
        if v is None:
            return
        if hasattr(v, "stop"):
            v.stop()
        elif v.poll() is None:
            v.terminate()
            try:
                v.wait(5)
            except Exception:  # noqa: BLE001
                v.kill()
