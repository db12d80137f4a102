"""A rosbag2 player for machines without rosbag2 (`stream4d play BAG`).

The bag (mcap or sqlite3, read by `rosbags`) is republished as raw CDR bytes, so nothing is deserialised:
`publisher.publish(bytes)` with the message class found by importlib. Recorded timing is kept (scaled by
`rate`), /clock (rosgraph_msgs/Clock) carries bag time at `clock_hz` and at every message so use_sim_time nodes
follow the bag, and topics recorded with transient_local durability (/tf_static) are republished latched.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NS = 1_000_000_000
MAX_LATCHED_DEPTH = 1000


class BagPlayError(RuntimeError):
    """The bag cannot be played: missing, unreadable, or nothing left to play."""


@dataclass
class PlayStats:
    published: Counter = field(default_factory=Counter)   # topic -> messages published
    loops: int = 0
    skipped_topics: dict[str, str] = field(default_factory=dict)  # topic -> why it was not played
    bag_start_ns: int = 0
    bag_end_ns: int = 0


def is_latched(connection: Any) -> bool:
    """Recorded with transient_local durability (how rosbag2 stores /tf_static and other latched topics)."""
    profiles = getattr(connection.ext, "offered_qos_profiles", None) or []
    return any(getattr(getattr(q, "durability", None), "name", "") == "TRANSIENT_LOCAL" for q in profiles)


def publisher_qos(latched: bool, latched_depth: int = 1) -> Any:
    """Reliable publishers: they serve reliable and best-effort subscribers alike."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    if latched:
        return QoSProfile(depth=max(1, min(latched_depth, MAX_LATCHED_DEPTH)), history=HistoryPolicy.KEEP_LAST,
                          reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    return QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def _clock_msg(ns: int) -> Any:
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock
    return Clock(clock=Time(sec=ns // _NS, nanosec=ns % _NS))


def _default_progress(stats: PlayStats, bag_ns: int, total: int) -> None:
    done = sum(stats.published.values())
    elapsed = (bag_ns - stats.bag_start_ns) / _NS
    length = (stats.bag_end_ns - stats.bag_start_ns) / _NS
    print(f"\r[play] {elapsed:7.2f} / {length:.2f} s bag time, {done}/{total} messages, loop {stats.loops + 1}",
          end="", file=sys.stderr, flush=True)


def play_bag(path: str | Path, rate: float = 1.0, loop: bool = False, clock: bool = True, clock_hz: float = 100.0,
             topics: Sequence[str] | None = None, start_delay: float = 0.0, wait_for_matching: Sequence[str] = (),
             timeout: float = 30.0, node: Any = None, progress: bool | Callable[[PlayStats, int, int], None] = False,
             should_stop: Callable[[], bool] | None = None) -> PlayStats:
    """Play a rosbag2 directory; returns what was published.

    rate: playback speed factor (2.0 = twice as fast). clock: publish /clock at clock_hz (wall rate) and at every
    message. topics: only these (default: all). start_delay: seconds to wait after creating the publishers.
    wait_for_matching: topics that must have at least one subscriber before playing (TimeoutError after `timeout`
    seconds). node: an rclpy node to publish with (default: a node of its own, with rclpy initialised if needed).
    progress: True prints a progress line on stderr about once a second; a callable gets (stats, bag_ns, total).
    should_stop: polled between messages; True ends the playback early.
    """
    from rosbags.rosbag2 import Reader

    from ros2_stream4d.ros.conversions import message_class

    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    path = Path(path)
    if not path.exists():
        raise BagPlayError(f"bag {path} does not exist")

    import rclpy
    from rclpy.duration import Duration

    own_context = None
    if node is None:
        if not rclpy.ok():
            own_context = rclpy.Context()
            rclpy.init(context=own_context)
        node = rclpy.create_node("stream4d_player", context=own_context)
        own_node = True
    else:
        own_node = False
    stats = PlayStats()
    report = _default_progress if progress is True else (progress or None)
    try:
        try:
            reader = Reader(path)
            reader.open()
        except Exception as exc:  # rosbags raises its own error types for missing metadata, bad storage ...
            raise BagPlayError(f"cannot open bag {path}: {exc}") from exc
        try:
            wanted = set(topics) if topics else None
            connections, publishers = [], {}
            for conn in reader.connections:
                if wanted is not None and conn.topic not in wanted:
                    continue
                try:
                    msg_type = message_class(conn.msgtype)
                except (ImportError, AttributeError, ValueError) as exc:
                    stats.skipped_topics[conn.topic] = f"message type {conn.msgtype} not importable ({exc})"
                    continue
                connections.append(conn)
                if conn.topic not in publishers:
                    latched = is_latched(conn) or conn.topic == "/tf_static"
                    count = sum(c.msgcount for c in reader.connections if c.topic == conn.topic)
                    publishers[conn.topic] = node.create_publisher(msg_type, conn.topic, publisher_qos(latched, count))
            if wanted:
                for topic in sorted(wanted - {c.topic for c in reader.connections}):
                    stats.skipped_topics[topic] = "not in the bag"
            if not connections:
                raise BagPlayError(f"nothing to play in {path} (topics {sorted(wanted) if wanted else 'all'}; "
                                   f"skipped: {stats.skipped_topics})")
            clock_pub = node.create_publisher(_clock_msg(0).__class__, "/clock", 10) if clock else None
            waitable = dict(publishers, **({"/clock": clock_pub} if clock_pub is not None else {}))
            _wait_for_subscribers(waitable, wait_for_matching, timeout)
            if start_delay > 0:
                time.sleep(start_delay)
            stats.bag_start_ns, stats.bag_end_ns = reader.start_time, reader.end_time
            total = sum(c.msgcount for c in connections)
            while True:
                if not _play_once(reader, connections, publishers, clock_pub, rate, clock_hz, stats, report, total,
                                  should_stop):
                    break
                stats.loops += 1
                if not loop:
                    break
            if report is _default_progress:
                print(file=sys.stderr)
            for publisher in publishers.values():  # let reliable subscribers receive the tail before we leave
                publisher.wait_for_all_acked(Duration(seconds=2.0))
        finally:
            reader.close()
    finally:
        if own_node:
            node.destroy_node()
        if own_context is not None:
            own_context.try_shutdown()
    return stats


def _wait_for_subscribers(publishers: dict[str, Any], topics: Sequence[str], timeout: float) -> None:
    for topic in topics:
        if topic not in publishers:
            raise BagPlayError(f"cannot wait for subscribers on {topic}: not played from this bag "
                               f"(played: {sorted(publishers)})")
    deadline = time.monotonic() + timeout
    for topic in topics:
        while publishers[topic].get_subscription_count() == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no subscriber on {topic} after {timeout} s")
            time.sleep(0.02)


def _play_once(reader, connections, publishers, clock_pub, rate, clock_hz, stats, report, total, should_stop) -> bool:
    """One pass over the bag; False when stopped early."""
    wall0 = bag0 = None
    next_clock = next_report = 0.0
    clock_period = 1.0 / clock_hz if clock_pub is not None and clock_hz > 0 else None
    for conn, bag_ns, raw in reader.messages(connections=connections):
        if wall0 is None:
            wall0, bag0 = time.monotonic(), bag_ns
        target = wall0 + (bag_ns - bag0) / _NS / rate
        while True:  # sleep until the message is due, ticking /clock meanwhile
            if should_stop is not None and should_stop():
                return False
            now = time.monotonic()
            if clock_period is not None and now >= next_clock:
                clock_pub.publish(_clock_msg(min(bag0 + int((now - wall0) * rate * _NS), bag_ns)))
                next_clock = now + clock_period
            if now >= target:
                break
            time.sleep(min(target - now, (next_clock - now) if clock_period else 0.05, 0.05))
        if clock_pub is not None:
            clock_pub.publish(_clock_msg(bag_ns))
        publishers[conn.topic].publish(bytes(raw))
        stats.published[conn.topic] += 1
        if report is not None and time.monotonic() >= next_report:
            report(stats, bag_ns, total)
            next_report = time.monotonic() + 1.0
    if report is not None and wall0 is not None:
        report(stats, bag_ns, total)
    return True
