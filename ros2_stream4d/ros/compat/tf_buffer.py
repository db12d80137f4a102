"""A small TF reader for machines without tf2_ros (the pip ROS wheels have none).

`TfBuffer` keeps every parent->child edge (static, and a bounded history of each dynamic one), answers
`lookup(target, source, stamp_ns=None)` by chaining edges through the common ancestor (latest values, or each
dynamic edge interpolated at the stamp: translation linear, rotation slerp; a stamp outside a dynamic edge's
history is refused with TransformNotFound, as tf2 refuses to extrapolate),
and `has_parent(frame)`, which the node uses to learn whether something else already publishes
odom -> base_link. `TfListener` feeds a buffer from /tf_static (reliable, transient_local: latched) and /tf.
`make_tf_listener(node)` prefers tf2_ros when importable and falls back to this reader.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ros2_stream4d.mapping.conventions import interpolate_transform
from ros2_stream4d.ros.conversions import time_to_ns, transform_to_matrix
from ros2_stream4d.ros.tf_policy import TransformNotFound

HISTORY = 1000  # samples kept per dynamic edge (20 s of 50 Hz odometry)




@dataclass
class Edge:
    parent: str
    matrix: np.ndarray   # parent_from_child
    stamp_ns: int
    static: bool
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (stamp_ns, matrix), dynamic only

    def at(self, stamp_ns: int | None) -> np.ndarray:
        """parent_from_child at `stamp_ns` (None or static: the latest)."""
        if stamp_ns is None or self.static:
            return self.matrix
        stamps = [s for s, _ in self.history]
        if not stamps or stamp_ns < stamps[0] or stamp_ns > stamps[-1]:
            span = f"{stamps[0] / 1e9:.3f} .. {stamps[-1] / 1e9:.3f} s" if stamps else "none"
            raise TransformNotFound(f"{self.parent} -> child at {stamp_ns / 1e9:.3f} s is outside its history "
                                    f"({span}): no extrapolation")
        i = int(np.searchsorted(stamps, stamp_ns))
        if stamps[i] == stamp_ns:
            return self.history[i][1]
        (s0, m0), (s1, m1) = self.history[i - 1], self.history[i]
        return interpolate_transform(m0, m1, (stamp_ns - s0) / max(s1 - s0, 1))


def _strip(frame: str) -> str:
    return frame.lstrip("/")  # tf2 ignores a leading slash


def _invert(m: np.ndarray) -> np.ndarray:
    inv = np.eye(4)
    inv[:3, :3] = m[:3, :3].T
    inv[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return inv


class TfBuffer:
    """Latest transform per child frame. Thread-safe: ROS callbacks write, the model thread reads."""

    MAX_DEPTH = 100  # guards against cycles from inconsistent publishers

    def __init__(self, history: int = HISTORY) -> None:
        self.history = history  # samples kept per dynamic edge
        self._edges: dict[str, Edge] = {}
        self._lock = threading.Lock()

    def set_transform(self, msg: Any, static: bool = False) -> None:
        """Store a geometry_msgs/TransformStamped (header.frame_id = parent, child_frame_id = child)."""
        parent, child = _strip(msg.header.frame_id), _strip(msg.child_frame_id)
        if not parent or not child or parent == child:
            raise ValueError(f"invalid transform edge {parent!r} -> {child!r}")
        matrix = transform_to_matrix(msg)
        stamp = time_to_ns(msg.header.stamp)
        with self._lock:
            old = self._edges.get(child)
            edge = Edge(parent, matrix, stamp, static, deque(maxlen=self.history))
            if not static:
                if old is not None and not old.static and old.parent == parent:
                    edge.history = old.history
                    if edge.history and stamp < edge.history[-1][0]:
                        edge.history.clear()  # time went backwards (a bag looping): old samples are void
                edge.history.append((stamp, matrix))
            self._edges[child] = edge

    def set_transforms(self, tf_message: Any, static: bool = False) -> None:
        """Store every transform of a tf2_msgs/TFMessage; malformed entries are skipped, not fatal."""
        for transform in tf_message.transforms:
            try:
                self.set_transform(transform, static)
            except ValueError:
                continue

    def clear(self, dynamic_only: bool = True) -> None:
        """Forget dynamic edges (e.g. after a backwards time jump); static ones stay unless dynamic_only=False."""
        with self._lock:
            self._edges = {c: e for c, e in self._edges.items() if dynamic_only and e.static}

    def parent_of(self, frame: str) -> str | None:
        with self._lock:
            edge = self._edges.get(_strip(frame))
        return edge.parent if edge else None

    def has_parent(self, frame: str) -> bool:
        return self.parent_of(frame) is not None

    def frames(self) -> set[str]:
        with self._lock:
            return set(self._edges) | {e.parent for e in self._edges.values()}

    def edges(self) -> dict[str, Edge]:
        with self._lock:
            return dict(self._edges)

    def _ancestors(self, frame: str, edges: dict[str, Edge]) -> list[str]:
        """`frame` and its parents up to the root of its tree."""
        chain = [frame]
        for _ in range(self.MAX_DEPTH):
            edge = edges.get(chain[-1])
            if edge is None:
                return chain
            chain.append(edge.parent)
        raise TransformNotFound(f"TF tree has a cycle or is deeper than {self.MAX_DEPTH} above {frame!r}")

    @staticmethod
    def _up(chain: list[str], ancestor: str, edges: dict[str, Edge], stamp_ns: int | None) -> np.ndarray:
        """ancestor_from_chain[0], composing only the edges below `ancestor` (edges above it are not evaluated,
        so a stamp outside their history does not matter)."""
        m = np.eye(4)
        for frame in chain[: chain.index(ancestor)]:
            m = edges[frame].at(stamp_ns) @ m
        return m

    def lookup(self, target: str, source: str, stamp_ns: int | None = None) -> np.ndarray:
        """target_from_source 4x4 (maps points in `source` into `target`), like tf2's lookupTransform(target, source);
        at `stamp_ns` when given (dynamic edges interpolated; outside their history: TransformNotFound), else the
        latest."""
        target, source = _strip(target), _strip(source)
        if target == source:
            return np.eye(4)
        with self._lock:  # the history deques are shared with the writer: copy under the lock
            edges = {c: Edge(e.parent, e.matrix, e.stamp_ns, e.static, deque(e.history)) for c, e in self._edges.items()}
        up_source = self._ancestors(source, edges)
        up_target = self._ancestors(target, edges)
        common = next((f for f in up_source if f in up_target), None)
        if common is None:
            raise TransformNotFound(f"no TF chain between {target!r} and {source!r} (known frames: "
                                    f"{sorted(self.frames())})")
        return _invert(self._up(up_target, common, edges, stamp_ns)) @ self._up(up_source, common, edges, stamp_ns)

    def can_transform(self, target: str, source: str) -> bool:
        try:
            self.lookup(target, source)
            return True
        except TransformNotFound:
            return False

    def wait_for_stamp(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> bool:
        """Wait (polling) until every dynamic edge between the frames has a sample at or after stamp_ns, so
        lookup(..., stamp_ns) interpolates instead of holding the last value. False on timeout."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            edges = self.edges()
            up_source, up_target = self._ancestors(_strip(source), edges), self._ancestors(_strip(target), edges)
            common = next((f for f in up_source if f in up_target), None)
            below = (up_source[: up_source.index(common)] + up_target[: up_target.index(common)]
                     if common is not None else up_source + up_target)
            dynamic = [edges[f] for f in below if f in edges and not edges[f].static]
            if all(e.stamp_ns >= stamp_ns for e in dynamic):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)


def tf_static_qos():
    """/tf_static QoS as tf2_ros uses it: reliable, transient_local (latched), keep last."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def tf_qos():
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


class TfListener:
    """Subscribes /tf_static and /tf on `node` and keeps a TfBuffer; the same reading API as the buffer."""

    def __init__(self, node: Any, buffer: TfBuffer | None = None, dynamic: bool = True,
                 tf_topic: str = "/tf", tf_static_topic: str = "/tf_static") -> None:
        from tf2_msgs.msg import TFMessage
        self.buffer = buffer or TfBuffer()
        self._subscriptions = [node.create_subscription(
            TFMessage, tf_static_topic, lambda msg: self.buffer.set_transforms(msg, static=True), tf_static_qos())]
        if dynamic:
            self._subscriptions.append(node.create_subscription(
                TFMessage, tf_topic, lambda msg: self.buffer.set_transforms(msg, static=False), tf_qos()))
        self._node = node

    def lookup(self, target: str, source: str, stamp_ns: int | None = None) -> np.ndarray:
        return self.buffer.lookup(target, source, stamp_ns)

    def can_transform(self, target: str, source: str) -> bool:
        return self.buffer.can_transform(target, source)

    def has_parent(self, frame: str) -> bool:
        return self.buffer.has_parent(frame)

    def wait_for_stamp(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> bool:
        return self.buffer.wait_for_stamp(target, source, stamp_ns, timeout_s)

    def parent_of(self, frame: str) -> str | None:
        return self.buffer.parent_of(frame)

    def destroy(self) -> None:
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions = []


class Tf2RosListener:
    """The same reading API on top of tf2_ros (used on full ROS installs)."""

    def __init__(self, node: Any) -> None:
        import tf2_ros
        self._tf2_ros = tf2_ros
        self._buffer = tf2_ros.Buffer()
        self._listener = tf2_ros.TransformListener(self._buffer, node)

    def lookup(self, target: str, source: str, stamp_ns: int | None = None) -> np.ndarray:
        from rclpy.time import Time
        try:
            when = Time() if stamp_ns is None else Time(nanoseconds=stamp_ns)
            msg = self._buffer.lookup_transform(_strip(target), _strip(source), when)
        except self._tf2_ros.TransformException as exc:
            raise TransformNotFound(str(exc)) from exc
        return transform_to_matrix(msg)

    def can_transform(self, target: str, source: str) -> bool:
        try:
            self.lookup(target, source)
            return True
        except TransformNotFound:
            return False

    def parent_of(self, frame: str) -> str | None:
        import yaml
        frames = yaml.safe_load(self._buffer.all_frames_as_yaml()) or {}
        entry = frames.get(_strip(frame)) if isinstance(frames, dict) else None
        return entry.get("parent") if isinstance(entry, dict) else None

    def has_parent(self, frame: str) -> bool:
        return self.parent_of(frame) is not None

    def wait_for_stamp(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> bool:
        from rclpy.duration import Duration
        from rclpy.time import Time
        return bool(self._buffer.can_transform(_strip(target), _strip(source), Time(nanoseconds=stamp_ns),
                                               Duration(nanoseconds=int(timeout_s * 1e9))))

    def destroy(self) -> None:
        unregister = getattr(self._listener, "unregister", None)
        if unregister:
            unregister()


def make_tf_listener(node: Any, prefer_tf2_ros: bool = True) -> TfListener | Tf2RosListener:
    """tf2_ros when importable (and preferred), otherwise this module's reader."""
    if prefer_tf2_ros:
        try:
            import tf2_ros  # noqa: F401
        except ImportError:
            pass
        else:
            return Tf2RosListener(node)
    return TfListener(node)
