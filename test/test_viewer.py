"""The Rerun viewer: recordings read back with the SDK, the live viewer's queue and failure path, and one browser
test (headless Chromium looks at the served web viewer and sees the cloud).

No viewer runs here except in the browser test: recordings go to .rrd files, the live viewer to a file or to
nothing (a viewer that cannot start)."""

from __future__ import annotations

import ast
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ros2_stream4d.cli import main
from ros2_stream4d.sim.bag import SimConfig, write_sim_bag
from ros2_stream4d.viewer import entities as E
from ros2_stream4d.viewer.entities import BoundedPath, ViewOptions
from ros2_stream4d.viewer.fixtures import oracle_results, write_output_bag
from ros2_stream4d.viewer.live import LiveViewer
from ros2_stream4d.viewer.recording import classify_bags, save_recording

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 10
OPTIONS = ViewOptions(cloud_points=500, depth_width=32, map_points=2000)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run: a sim bag (the input, with images and ground truth) and the node-shaped output bag of the
    oracle pipeline over it."""
    d = tmp_path_factory.mktemp("viewer")
    sim = d / "input_bag"
    write_sim_bag(sim, SimConfig(scene="room", trajectory="ground_robot", frames=FRAMES, width=64, height=48,
                                 seed=5), progress=False)
    results, map_cloud, images, K = oracle_results(sim)
    out = write_output_bag(d / "output_bag", results, map_cloud)
    return {"dir": d, "sim": sim, "out": out, "results": results, "images": images, "K": K, "map": map_cloud}


@pytest.fixture(scope="module")
def recording(run):
    path = run["dir"] / "run.rrd"
    summary = save_recording([run["out"], run["sim"]], path, OPTIONS)
    return path, summary


def read_rrd(path) -> dict[str, dict]:
    """{entity: {"rows", "stamps" (ns), "static", "timelines", "columns", "batches"}} read back with the SDK."""
    from rerun.chunk import RrdReader

    out: dict[str, dict] = {}
    for chunk in RrdReader(path).stream().collect().stream():
        e = out.setdefault(chunk.entity_path.lstrip("/"), {"rows": 0, "stamps": [], "static": False,
                                                            "timelines": set(), "columns": set(), "batches": []})
        rb = chunk.to_record_batch()
        e["rows"] += chunk.num_rows
        e["static"] |= chunk.is_static
        e["timelines"].update(chunk.timeline_names)
        e["columns"].update(n for n in rb.schema.names if ":" in n)
        e["batches"].append(rb)
        if E.TIMELINE in rb.schema.names:
            e["stamps"] += [int(v) for v in rb.column(E.TIMELINE).cast("int64").to_pylist()]
    return out


def column_values(entity: dict, column: str) -> list:
    """One value per row: the row's single instance (a transform, an image), or its list of instances (points)."""
    rows = [v for rb in entity["batches"] if column in rb.schema.names for v in rb.column(column).to_pylist()]
    return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in rows]


# ---------------------------------------------------------------------------------------------------- recording
def test_recording_holds_every_entity_once_per_frame_on_one_timeline(run, recording):
    path, summary = recording
    got = read_rrd(path)
    stamps = sorted(int(r.stamp_ns) for r in run["results"])
    per_frame = [E.CAMERA, E.DEPTH, E.CONFIDENCE, E.CLOUD, E.TRAJECTORY, E.GT_TRAJECTORY]
    for entity in per_frame:
        assert got[entity]["rows"] == FRAMES, entity
        assert sorted(got[entity]["stamps"]) == stamps, entity
    assert len(column_values(got[E.IMAGE], "EncodedImage:blob")) == FRAMES
    assert set(column_values(got[E.IMAGE], "EncodedImage:media_type")) == {"image/jpeg"}
    assert got[E.MAP_CLOUD]["rows"] == 1 and got[E.MAP_CLOUD]["stamps"] == [stamps[-1]]
    # one timeline, the image stamps: no log_time / log_tick
    timelines = set().union(*(e["timelines"] for e in got.values()))
    assert timelines == {E.TIMELINE}
    all_stamps = set().union(*(set(e["stamps"]) for e in got.values()))
    assert all_stamps == set(stamps)
    assert summary.frames == FRAMES and summary.size_bytes == path.stat().st_size


def test_recording_is_downsampled_as_asked(run, recording):
    got = read_rrd(recording[0])
    clouds = [rb.column("Points3D:positions").to_pylist()[i] for rb in got[E.CLOUD]["batches"]
              for i in range(rb.num_rows)]
    assert max(len(c) for c in clouds) == OPTIONS.cloud_points < min(len(r.cloud_xyz) for r in run["results"])
    map_rows = [p for rb in got[E.MAP_CLOUD]["batches"] for p in rb.column("Points3D:positions").to_pylist()]
    assert len(map_rows[0]) == min(OPTIONS.map_points, len(run["map"][0]))
    fmt = column_values(got[E.DEPTH], "DepthImage:format")[0]
    assert fmt["width"] <= OPTIONS.depth_width and fmt["height"] < run["results"][0].depth.shape[0]
    # the depth reads back in thousandths of the map unit (meter = 1000), 0 where the node had none
    i = int(np.argmax(got[E.DEPTH]["stamps"]))
    stored = np.frombuffer(bytes(column_values(got[E.DEPTH], "DepthImage:buffer")[i]), np.uint16)
    last = max(run["results"], key=lambda r: r.stamp_ns)
    step = -(-last.depth.shape[1] // OPTIONS.depth_width)
    want = last.depth[::step, ::step]
    assert stored.shape == (want.size,) and set(column_values(got[E.DEPTH], "DepthImage:meter")) == {1000.0}
    stored = stored.reshape(want.shape).astype(np.float64)
    valid = np.isfinite(want) & (want > 0)
    assert valid.any() and np.abs(stored[valid] - want[valid] * 1000).max() <= 0.5 and not stored[~valid].any()
    for blob in column_values(got[E.IMAGE], "EncodedImage:blob")[:1]:
        img = cv2.imdecode(np.frombuffer(bytes(blob), np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[:2] == run["images"][0].shape[:2]


def test_recording_poses_and_ground_truth_in_the_map_frame(run, recording):
    got = read_rrd(recording[0])
    last = max(run["results"], key=lambda r: r.stamp_ns)
    translations = column_values(got[E.CAMERA], "Transform3D:translation")
    stamps = got[E.CAMERA]["stamps"]
    np.testing.assert_allclose(translations[int(np.argmax(stamps))], last.T_map_cam[:3, 3], atol=1e-5)
    # the oracle's poses are the ground truth: aligned into the map frame the two paths coincide
    i_last = int(np.argmax(got[E.GT_TRAJECTORY]["stamps"]))
    gt_strip = np.asarray(column_values(got[E.GT_TRAJECTORY], "LineStrips3D:strips")[i_last])
    pred_strip = np.asarray(column_values(got[E.TRAJECTORY], "LineStrips3D:strips")[i_last])
    assert len(gt_strip) == len(pred_strip) == FRAMES
    np.testing.assert_allclose(gt_strip, pred_strip, atol=1e-3)
    assert np.ptp(pred_strip, axis=0).max() > 0.05  # the camera moved: the check above is not vacuous


def test_camera_frame_clouds_old_topic_names_and_meshes(run, tmp_path):
    # 0.1's topic names (~/depth, ~/confidence) as well
    out = write_output_bag(tmp_path / "out_cam", run["results"], run["map"], cloud_in_camera=True, legacy_names=True)
    path = tmp_path / "cam.rrd"
    save_recording([out, run["sim"]], path, OPTIONS, mesh=run["sim"] / "scene.ply", gt_scene=True)
    got = read_rrd(path)
    assert got[E.DEPTH]["rows"] == got[E.CONFIDENCE]["rows"] == FRAMES
    assert E.CLOUD not in got and got[E.CAMERA_CLOUD]["rows"] == FRAMES  # under the moving camera transform
    i = int(np.argmax(got[E.CAMERA_CLOUD]["stamps"]))
    last = max(run["results"], key=lambda r: r.stamp_ns)
    local = np.asarray([rb.column("Points3D:positions").to_pylist() for rb in got[E.CAMERA_CLOUD]["batches"]][0][i])
    world = local @ last.T_map_cam[:3, :3].T + last.T_map_cam[:3, 3]
    assert np.abs(world - last.cloud_xyz[:, None]).sum(axis=2).min(axis=0).max() < 1e-3  # the map-frame cloud
    for entity in (E.MESH, E.GT_SCENE):
        assert got[entity]["static"] and "Mesh3D:vertex_positions" in got[entity]["columns"]


def test_long_runs_thin_out_frames_and_path_updates(run, tmp_path):
    options = ViewOptions(cloud_points=100, depth_width=16, frame_stride=3, path_updates=4)
    got = read_rrd(save_recording([run["out"], run["sim"]], tmp_path / "thin.rrd", options).path)
    stamps = sorted(int(r.stamp_ns) for r in run["results"])
    assert sorted(got[E.CAMERA]["stamps"]) == stamps  # every pose
    for entity in (E.DEPTH, E.CONFIDENCE, E.CLOUD):
        assert sorted(got[entity]["stamps"]) == stamps[::3], entity
    assert len(column_values(got[E.IMAGE], "EncodedImage:blob")) == len(stamps[::3])
    for entity in (E.TRAJECTORY, E.GT_TRAJECTORY):
        assert len(got[entity]["stamps"]) <= 4 + 1 and max(got[entity]["stamps"]) == stamps[-1], entity
        last = column_values(got[entity], "LineStrips3D:strips")[int(np.argmax(got[entity]["stamps"]))]
        assert len(last) == FRAMES  # the strip still has every pose


def test_compressed_camera_images_are_kept_as_recorded(run, tmp_path):
    from ros2_stream4d.sim.bag import iter_messages

    sim = tmp_path / "compressed_bag"
    write_sim_bag(sim, SimConfig(scene="room", trajectory="ground_robot", frames=FRAMES, width=64, height=48, seed=5,
                                 raw=False, compressed=True), progress=False)
    path = save_recording([run["out"], sim], tmp_path / "c.rrd", OPTIONS).path
    blobs = [bytes(b) for b in column_values(read_rrd(path)[E.IMAGE], "EncodedImage:blob")]
    recorded = [bytes(m.data) for _, _, m in iter_messages(sim, ["/camera/image_raw/compressed"])]
    assert len(blobs) == FRAMES and sorted(blobs) == sorted(recorded)  # no second JPEG generation


def test_bags_in_any_order_and_a_foreign_bag_is_refused(run, tmp_path):
    assert classify_bags([run["sim"], run["out"]]) == ([run["out"]], [run["sim"]])
    from ros2_stream4d.eval.bagio import write_prediction_bag

    foreign = tmp_path / "foreign"
    write_prediction_bag(foreign, [1, 2], np.tile(np.eye(4), (2, 1, 1)))  # only /stream4d/camera_pose ...
    assert classify_bags([foreign]) == ([foreign], [])
    from rosbags.rosbag2 import Writer

    from ros2_stream4d.sim.bag import TYPESTORE

    other = tmp_path / "other"
    with Writer(other, version=9) as w:
        w.add_connection("/chatter", "std_msgs/msg/String", typestore=TYPESTORE)
    with pytest.raises(ValueError, match="neither"):
        classify_bags([other])


def test_view_cli_saves_a_recording(run, tmp_path, capsys):
    out = tmp_path / "cli.rrd"
    assert main(["view", str(run["sim"]), str(run["out"]), "--save", str(out), "--cloud-points", "100",
                 "--mcap-topics", "^/tf$"]) == 0
    got = read_rrd(out)
    assert "Transform3D:translation" in got["tf"]["columns"]  # from Rerun's own MCAP importer, on request
    assert got[E.CLOUD]["rows"] == FRAMES
    assert max(len(p) for rb in got[E.CLOUD]["batches"] for p in rb.column("Points3D:positions").to_pylist()) == 100
    printed = capsys.readouterr().out
    assert f"stream4d view {out} --serve" in printed and f"rerun {out}" in printed


def test_demo_recording_from_the_demo_folder_and_view_refuses_a_missing_one(run, capsys):
    from ros2_stream4d.viewer.recording import write_demo_recording

    path = write_demo_recording(run["dir"])  # the fixture's folder has the demo's output_bag and input_bag
    assert path == run["dir"] / "demo.rrd"
    assert read_rrd(path)[E.GT_TRAJECTORY]["rows"] == FRAMES
    assert main(["view", str(run["dir"] / "missing.rrd"), "--serve"]) == 1
    assert "no such recording" in capsys.readouterr().out


def test_bounded_path_keeps_its_shape_in_constant_memory():
    path = BoundedPath(100)
    pts = np.stack([np.arange(10_000), np.zeros(10_000), np.zeros(10_000)], 1).astype(np.float32)
    for p in pts:
        path.append(p)
        assert len(path) <= 100
    a = path.array()
    assert a[0, 0] == 0 and a[-1, 0] == 9_999 and np.all(np.diff(a[:, 0]) > 0)


# ---------------------------------------------------------------------------------------------------- live viewer
def test_live_submit_never_blocks_and_drops_the_oldest(run, tmp_path):
    path = tmp_path / "live.rrd"
    viewer = LiveViewer("save", path=path, queue_size=3, options=OPTIONS, start=False)
    results = run["results"]
    for r, img in zip(results, run["images"]):
        assert viewer.submit(r, img) is True  # no thread is taking them: it must still return at once
    assert viewer.pending() == 3 and viewer.submitted == FRAMES and viewer.dropped == FRAMES - 3
    viewer.submit_map(*run["map"], stamp_ns=int(results[-1].stamp_ns))
    viewer.start()
    deadline = time.monotonic() + 30
    while (viewer.logged < 3 or viewer.maps_logged < 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    viewer.close()
    assert viewer.failure is None and viewer.logged == 3
    got = read_rrd(path)
    newest = sorted(int(r.stamp_ns) for r in results)[-3:]
    assert sorted(got[E.CAMERA]["stamps"]) == newest  # the newest three were kept
    for entity in (E.IMAGE, E.DEPTH, E.CONFIDENCE, E.CLOUD, E.TRAJECTORY):
        assert entity in got, entity  # the same entities as a recording of the bags
    assert got[E.MAP_CLOUD]["rows"] == 1
    assert viewer.submit(results[0]) is False  # closed: a no-op


def test_live_viewer_takes_one_camera(run, tmp_path):
    import dataclasses

    from ros2_stream4d.mapping.pipeline import Processed

    viewer = LiveViewer("save", path=tmp_path / "one.rrd", start=False, camera=0)
    r0 = run["results"][0]
    assert viewer.submit(Processed(r0)) is True  # the pipeline's outcome is taken as well
    assert viewer.submit(dataclasses.replace(r0, camera=1)) is False
    assert viewer.pending() == 1 and viewer.dropped == 0
    viewer.close()


def _listening_port() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _wait_for_failure(viewer: LiveViewer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while viewer.active and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("case", ["port taken", "no display", "nothing to connect to"])
def test_live_viewer_that_cannot_start_warns_once_and_mapping_goes_on(run, monkeypatch, case):
    warnings: list[str] = []
    if case == "port taken":
        blocker = _listening_port()
        port = blocker.getsockname()[1]
        viewer = LiveViewer("serve", grpc_port=port, web_port=0, warn=warnings.append)
    elif case == "nothing to connect to":
        blocker = None
        free = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()  # a port nobody listens on
        viewer = LiveViewer("connect", url=f"rerun+http://127.0.0.1:{port}/proxy", warn=warnings.append)
    else:
        blocker = None
        monkeypatch.delenv("DISPLAY", raising=False)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        monkeypatch.setattr(sys, "platform", "linux")
        viewer = LiveViewer("spawn", grpc_port=0, warn=warnings.append)
    try:
        _wait_for_failure(viewer)
        for r in run["results"]:
            assert viewer.submit(r) is False  # off: nothing queued, nothing held
        assert viewer.pending() == 0
    finally:
        viewer.close()
        if blocker is not None:
            blocker.close()
    assert len(warnings) == 1
    assert {"port taken": "taken", "no display": "display", "nothing to connect to": "nothing listens"}[case] \
        in warnings[0]
    assert "mapping goes on" in warnings[0]


def test_live_viewer_without_rerun_sdk_warns_once(tmp_path):
    code = ("import sys; sys.modules['rerun'] = None\n"  # as if rerun-sdk were not installed
            "from ros2_stream4d.viewer.live import LiveViewer\n"
            "w = []\n"
            f"v = LiveViewer('save', path={str(tmp_path / 'x.rrd')!r}, warn=w.append)\n"
            "v.ready.wait(30); active = v.active; v.close()\n"
            "print(len(w), w[0] if w else '', active)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 viewer:=rerun could not start (ModuleNotFoundError") or \
        out.stdout.startswith("1 viewer:=rerun could not start (ImportError"), out.stdout
    assert out.stdout.strip().endswith("False")


def test_live_viewer_stops_when_its_viewer_goes_away(run):
    """connect mode: the SDK would buffer every frame while the viewer is gone; the thread notices and stops."""
    listener = _listening_port()  # stands in for a viewer: it accepts connections (and says nothing)
    warnings: list[str] = []
    viewer = LiveViewer("connect", url=f"rerun+http://127.0.0.1:{listener.getsockname()[1]}/proxy",
                        warn=warnings.append)
    try:
        assert viewer.ready.wait(30) and viewer.active
        listener.close()
        deadline = time.monotonic() + 30
        while viewer.active and time.monotonic() < deadline:
            viewer.submit(run["results"][0])
            time.sleep(0.05)
        assert not viewer.active and viewer.submit(run["results"][0]) is False
    finally:
        viewer.close()
        listener.close()
    assert len(warnings) == 1 and "went away" in warnings[0]


def test_viewer_package_never_imports_ros():
    offenders = []
    for path in (ROOT / "ros2_stream4d" / "viewer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] in ("rclpy", "sensor_msgs", "geometry_msgs", "tf2_ros")
                          or n.startswith("ros2_stream4d.ros")]
    assert not offenders


# ---------------------------------------------------------------------------------------------------- browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Cdp:
    """Chrome DevTools Protocol over --remote-debugging-pipe (fds 3 and 4): no websocket library needed."""

    def __init__(self, binary: str, width: int, height: int):
        self.profile = tempfile.mkdtemp(prefix="s4d_chromium_")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds():
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-unsafe-swiftshader", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session = b"", 0, None

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            ready, _, _ = select.select([self._r], [], [], max(0.05, deadline - time.monotonic()))
            if not ready:
                continue
            data = os.read(self._r, 1 << 20)
            if not data:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += data

    def close(self) -> None:
        try:
            os.write(self._w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(10)
        except Exception:  # noqa: BLE001 - it is going away either way
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def look_at(png: bytes) -> tuple[bool, int]:
    """(the recording is on screen, the number of point-sized marks in the 3D view).

    On screen: the depth view (right column, middle, of entities.default_blueprint) shows its colour map. Marks:
    connected blobs of 4-400 pixels that differ from the 3D view's background (its most common colour); a drawn
    cloud gives hundreds, a blank view (grid, trajectory, camera frustum) none."""
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
    h, w = img.shape[:2]
    depth = img[int(0.40 * h):int(0.62 * h), int(0.78 * w):int(0.98 * w)].reshape(-1, 3)
    on_screen = bool(((depth.max(axis=1) - depth.min(axis=1)) > 60).mean() > 0.5)
    view = img[int(0.10 * h):int(0.94 * h), int(0.02 * w):int(0.73 * w)]
    colours, counts = np.unique(view.reshape(-1, 3)[::5], axis=0, return_counts=True)
    mask = (np.abs(view - colours[np.argmax(counts)]).max(axis=2) > 60).astype(np.uint8)
    _, _, blobs, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = blobs[1:, cv2.CC_STAT_AREA]
    return on_screen, int(((areas >= 4) & (areas <= 400)).sum())


def test_browser_shows_the_cloud_in_the_served_web_viewer(run, tmp_path):
    """Headless Chromium opens the served web viewer with the run's recording (default options, as `stream4d
    view` writes it): the recording is on screen and the 3D view shows the cloud."""
    from ros2_stream4d.viewer.server import ViewerUnavailable, serve_web

    binary = _chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; scripts/setup.sh does it)")
    t0 = time.monotonic()
    cdp = _Cdp(binary, 1000, 640)
    try:
        target = cdp.call("Target.createTarget", {"url": "about:blank"}, timeout=15, session=False)
        cdp.session = cdp.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                               timeout=15, session=False)["sessionId"]
    except (TimeoutError, RuntimeError, OSError) as exc:
        cdp.close()
        pytest.skip(f"Chromium ({binary}) cannot start here: {exc}")
    rrd = save_recording([run["out"], run["sim"]], tmp_path / "browser.rrd").path
    try:
        viewer = serve_web([rrd], web_port=0, grpc_port=0, log_path=tmp_path / "rerun.log")
    except ViewerUnavailable as exc:
        cdp.close()
        pytest.fail(f"the web viewer did not start: {exc}")
    try:
        cdp.call("Page.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", {"width": 1000, "height": 640, "deviceScaleFactor": 1,
                                                        "mobile": False})
        cdp.call("Page.navigate", {"url": viewer.url})
        on_screen, marks, shot = False, 0, b""
        while time.monotonic() - t0 < 50:
            time.sleep(2.0)
            shot = base64.b64decode(cdp.call("Page.captureScreenshot", {"format": "png"}, timeout=30)["data"])
            on_screen, marks = look_at(shot)
            if on_screen and marks >= 100:
                break
        (tmp_path / "viewer.png").write_bytes(shot)
        assert on_screen, f"the recording never came on screen; screenshot {tmp_path / 'viewer.png'}"
        assert marks >= 100, f"the 3D view looks blank ({marks} point marks); screenshot {tmp_path / 'viewer.png'}"
    finally:
        cdp.close()
        viewer.stop()


@pytest.mark.ros
def test_the_node_feeds_its_live_viewer_off_the_worker(tmp_path):
    """viewer:=rerun wired into stream4d_node: frames the worker processed reach the viewer (save mode: an .rrd, no
    viewer process), the worker never waits for it, and shutdown closes it."""
    import rclpy
    from rclpy.parameter import Parameter

    from ros2_stream4d.ros.conversions import ns_to_time, numpy_to_image
    from ros2_stream4d.ros.node import Stream4DNode

    rrd = tmp_path / "live.rrd"
    context = rclpy.Context()
    rclpy.init(context=context)
    overrides = [Parameter("model", value="random-small"), Parameter("input_width", value=56),
                 Parameter("window", value=4), Parameter("process_every_frame", value=True),
                 Parameter("viewer", value="rerun"), Parameter("viewer_mode", value="save"),
                 Parameter("viewer_path", value=str(rrd))]
    node = Stream4DNode(context=context, parameter_overrides=overrides)
    try:
        assert node.viewer is not None
        # the viewer starts in its own thread (rerun import, warm-up); until then, and whenever logging falls
        # behind, its 2-slot queue drops the oldest result rather than make the worker wait (CI once saw the first
        # frame dropped that way): wait for it to be up, then hand it one frame at a time
        assert node.viewer.ready.wait(60) and node.viewer.failure is None
        rng = np.random.default_rng(0)
        for i in range(4):
            rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            node._on_image(0, numpy_to_image(rgb, "rgb8", stamp=ns_to_time(1_000_000_000 + i * 100_000_000),
                                             frame_id="cam"))
            deadline = time.monotonic() + 60
            while node.viewer.logged < i + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert node.processor.frames_done == i + 1 and node.viewer.logged == i + 1
        assert node.viewer.dropped == 0
    finally:
        node.shutdown()  # closes the viewer: the recording is complete on disk
        node.destroy_node()
        context.try_shutdown()
    assert node.viewer is None
    entities = read_rrd(rrd)
    stamps = sorted({s for e in entities.values() for s in e["stamps"]})
    assert stamps == [1_000_000_000 + i * 100_000_000 for i in range(4)], "every processed frame, on its stamp"
