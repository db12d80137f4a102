"""A small rosbag2 recorder (for machines without `ros2 bag record`): raw CDR from DDS into an mcap/sqlite3 bag."""

from __future__ import annotations

import threading
from pathlib import Path


class BagRecorder:
    """Subscribes `topics` ({topic: "pkg/msg/Type"}) on `node` and writes every message, serialized as received,
    stamped with the node clock at arrival (what `ros2 bag record` does). Thread-safe; close() finishes the bag."""

    def __init__(self, node, out: str | Path, topics: dict[str, str], storage: str = "mcap",
                 latched: tuple[str, ...] = ()):
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        from ros2_stream4d.ros.conversions import message_class

        self._node = node
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {t: 0 for t in topics}
        self._writer = Writer(Path(out), version=9,
                              storage_plugin={"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage])
        self._writer.open()
        typestore = get_typestore(Stores.ROS2_KILTED)
        zero = QosTime(sec=0, nsec=0)
        latched_qos = Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                          durability=QosDurability.TRANSIENT_LOCAL, deadline=zero, lifespan=zero,
                          liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
                          avoid_ros_namespace_conventions=False)
        self._connections = {}
        self._subscriptions = []
        for topic, msgtype in topics.items():
            is_latched = topic in latched
            kw = {"offered_qos_profiles": [latched_qos]} if is_latched else {}
            self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=typestore, **kw)
            qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if is_latched else DurabilityPolicy.VOLATILE)
            self._subscriptions.append(node.create_subscription(
                message_class(msgtype), topic, lambda raw, t=topic: self._write(t, raw), qos, raw=True))

    def _write(self, topic: str, raw: bytes) -> None:
        with self._lock:
            if self._writer is None:
                return
            self._writer.write(self._connections[topic], self._node.get_clock().now().nanoseconds, raw)
            self.counts[topic] += 1

    def close(self) -> None:
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions = []
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
