"""Real ROS 2 in tests: an isolated DDS domain per test process, child processes, waiting with timeouts.

Isolation: every pytest process (each xdist worker too) claims its own ROS_DOMAIN_ID with an exclusive lock
file, so concurrent runs on one machine never share a domain. DDS stays on loopback: automatic discovery
LOCALHOST plus the project's Fast DDS profile (SHM + UDP on 127.0.0.1 only).

Waiting: never fixed sleeps. `wait_until` spins a node until a condition holds or the timeout expires.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
FASTDDS_PROFILE = ROOT / "config" / "fastdds_loopback.xml"
# Above the 1..100 that scripts/ros_env.sh derives from a shell's pid, so tests never join a user's shell domain;
# 232 is the highest domain Fast DDS can map to ports.
DOMAIN_RANGE = range(101, 233)
_LOCK_DIR = pathlib.Path(tempfile.gettempdir()) / "ros2_stream4d_domains"
_held_lock = None  # keeps the claimed domain's lock file open for the life of the process


def claim_domain_id() -> int:
    """An unused ROS_DOMAIN_ID for this process, held (flock) until it exits. S4D_TEST_DOMAIN_ID forces one."""
    global _held_lock
    forced = os.environ.get("S4D_TEST_DOMAIN_ID")
    if forced:
        return int(forced)
    if _held_lock is not None:
        return int(pathlib.Path(_held_lock.name).stem)
    _LOCK_DIR.mkdir(exist_ok=True)
    start = os.getpid() % len(DOMAIN_RANGE)
    for i in range(len(DOMAIN_RANGE)):
        domain = DOMAIN_RANGE[(start + i) % len(DOMAIN_RANGE)]
        handle = open(_LOCK_DIR / f"{domain}.lock", "w")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _held_lock = handle
        return domain
    raise RuntimeError(f"all ROS domains {DOMAIN_RANGE.start}..{DOMAIN_RANGE.stop - 1} are claimed by other tests")


def ros_environment(domain_id: int) -> dict[str, str]:
    """The variables that keep DDS on this machine and in this test's domain."""
    return {
        "ROS_DOMAIN_ID": str(domain_id),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(FASTDDS_PROFILE),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "PYTHONUNBUFFERED": "1",
    }


def configure_process_environment() -> int:
    """Claim a domain and export the ROS variables into os.environ (inherited by every child process)."""
    domain = claim_domain_id()
    os.environ.update(ros_environment(domain))
    os.environ.pop("ROS_LOCALHOST_ONLY", None)  # deprecated; LOCALHOST discovery range replaces it
    return domain


def rclpy_available() -> tuple[bool, str]:
    try:
        import rclpy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return False, f"rclpy is not importable ({type(exc).__name__}: {exc})"
    return True, ""


# ------------------------------------------------------------------------------------------------ processes

class RosProcess:
    """A child process in the test's ROS environment; output goes to a file (no pipe can fill and block it)."""

    def __init__(self, cmd: Sequence[str], name: str | None = None, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        self.cmd = [str(c) for c in cmd]
        self.name = name or pathlib.Path(self.cmd[min(1, len(self.cmd) - 1)]).name
        self._log = tempfile.NamedTemporaryFile("w+", prefix=f"s4d_{self.name}_", suffix=".log", delete=False)
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=str(cwd or ROOT), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def output(self) -> str:
        with open(self._log.name, errors="replace") as handle:
            return handle.read()

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        """Block until `text` appears in the output; fails early if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.poll()} before printing {text!r}:\n{self.output()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not print {text!r} within {timeout} s:\n{self.output()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{self.name} still running after {timeout} s:\n{self.output()}") from exc

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (clean ROS shutdown), then SIGKILL if it does not exit within `timeout`. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def close(self) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)

    def describe(self) -> str:
        return f"--- {self.name} (pid {self.pid}, rc {self.popen.returncode}): {' '.join(self.cmd)}\n{self.output()}"


def python_command(*args: Any) -> list[str]:
    """argv running this venv's python (the ros-wheels bootstrap sets LD_LIBRARY_PATH in children too)."""
    return [sys.executable, *[str(a) for a in args]]


# ------------------------------------------------------------------------------------------------ waiting

def wait_until(condition: Callable[[], bool], timeout: float, node: Any = None, what: str = "condition") -> None:
    """Spin `node` in small steps until condition() is true; TimeoutError naming `what` if it is not in time.

    A node already added to an executor is assumed to be spun by its owner; then this only polls.
    """
    executor = None
    if node is not None and node.executor is None:
        from rclpy.executors import SingleThreadedExecutor
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            if executor is not None:
                executor.spin_once(timeout_sec=0.02)
            else:
                time.sleep(0.02)
    finally:
        if executor is not None:
            executor.remove_node(node)
            executor.shutdown()


def wait_for_subscribers(node: Any, publisher: Any, count: int = 1, timeout: float = 10.0) -> None:
    wait_until(lambda: publisher.get_subscription_count() >= count, timeout, node,
               f"{count} subscriber(s) on {publisher.topic_name}")


def wait_for_publishers(node: Any, subscription: Any, count: int = 1, timeout: float = 10.0) -> None:
    wait_until(lambda: subscription.get_publisher_count() >= count, timeout, node,
               f"{count} publisher(s) on {subscription.topic_name}")


class MessageCollector:
    """Subscribes a topic and keeps every message (optionally with the node clock at arrival)."""

    def __init__(self, node: Any, msg_type: Any, topic: str, qos: Any = 10, with_clock: bool = False) -> None:
        self.node, self.topic = node, topic
        self.messages: list[Any] = []
        self.arrival_ns: list[int] = []
        self._with_clock = with_clock
        self.subscription = node.create_subscription(msg_type, topic, self._on_message, qos)

    def _on_message(self, msg: Any) -> None:
        self.messages.append(msg)
        if self._with_clock:
            self.arrival_ns.append(self.node.get_clock().now().nanoseconds)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        wait_until(lambda: len(self.messages) >= count, timeout, self.node,
                   f"{count} message(s) on {self.topic} (got {len(self.messages)})")
        return self.messages


# ------------------------------------------------------------------------------------------------ TF checks

def assert_tf_tree(tf_messages: Sequence[Any]) -> None:
    """Every recorded /tf and /tf_static message together form a tree: one parent per frame, no cycles."""
    from ros2_stream4d.ros.tf_policy import check_one_parent

    edges = [(t.header.frame_id, t.child_frame_id) for m in tf_messages for t in m.transforms]
    assert edges, "no TF recorded"
    problems = check_one_parent(edges)
    assert not problems, "TF tree broken: " + "; ".join(problems)


def assert_tf_matches_poses(node_edges: Sequence[Any], tf_messages: Sequence[Any], static_messages: Sequence[Any],
                            poses: Sequence[Any], camera_frame: str, tol_m: float = 1e-3) -> None:
    """The node's published edges, composed with the rest of the recorded tree at each stamp, put the camera
    where ~/camera_pose says (catches an inverted or mis-composed transform)."""
    import numpy as np

    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.conversions import pose_to_matrix, time_to_ns

    buffer = TfBuffer()
    for m in static_messages:
        buffer.set_transforms(m, static=True)
    for m in tf_messages:
        buffer.set_transforms(m, static=False)
    by_stamp = {time_to_ns(p.header.stamp): pose_to_matrix(p) for p in poses}
    checked = 0
    for edge in node_edges:
        stamp = time_to_ns(edge.header.stamp)
        if stamp not in by_stamp:
            continue
        from ros2_stream4d.ros.conversions import transform_to_matrix
        from ros2_stream4d.ros.tf_policy import TransformNotFound

        T_map_child = transform_to_matrix(edge)
        try:
            T_child_cam = buffer.lookup(edge.child_frame_id, camera_frame, stamp)
        except TransformNotFound:  # the recording missed the other publisher's sample at this stamp
            continue
        T_map_cam = T_map_child @ T_child_cam
        expected = by_stamp[stamp]
        assert np.abs(T_map_cam[:3, 3] - expected[:3, 3]).max() < tol_m, (stamp, T_map_cam, expected)
        assert np.abs(T_map_cam[:3, :3] - expected[:3, :3]).max() < 1e-3
        checked += 1
    assert checked >= max(1, len(node_edges) // 2), f"only {checked} of {len(node_edges)} edges had a pose"
