#!/usr/bin/env python3
"""A stand-in for `ros2 topic` where ros2cli is not installed (pip ROS wheels): list, echo, hz.

    python scripts/rostopic.py list [-t]
    python scripts/rostopic.py echo /tf_static [--latched] [-n 1] [--type tf2_msgs/msg/TFMessage]
    python scripts/rostopic.py hz /camera/image_raw [--window 50] [--best-effort]

Run after `. scripts/ros_env.sh` so it joins the same (loopback-only) DDS domain as the nodes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

DISCOVERY_S = 1.5  # the project's Fast DDS profile discovers peers in well under a second


def message_class(type_name: str):
    package, kind, name = type_name.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def discover(node, seconds: float = DISCOVERY_S) -> dict[str, list[str]]:
    import rclpy
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    return dict(node.get_topic_names_and_types())


def topic_type(node, topic: str, explicit: str | None):
    if explicit:
        return message_class(explicit)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        types = discover(node, 0.3).get(topic)
        if types:
            return message_class(types[0])
    raise SystemExit(f"rostopic: no publisher of {topic} found (give --type to subscribe anyway)")


def qos(latched: bool, best_effort: bool):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=10,
                      reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def to_text(value, indent: int = 0, max_items: int = 16) -> str:
    """A message as YAML-like text; long arrays are shortened (images, clouds)."""
    pad = "  " * indent
    if hasattr(value, "get_fields_and_field_types"):
        lines = []
        for name in value.get_fields_and_field_types():
            field = getattr(value, name)
            if hasattr(field, "get_fields_and_field_types"):
                lines.append(f"{pad}{name}:\n{to_text(field, indent + 1, max_items)}")
            else:
                lines.append(f"{pad}{name}: {to_text(field, indent + 1, max_items)}")
        return "\n".join(lines)
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "tolist")
                                             and not isinstance(value, (str, bytes))):
        items = list(value[:max_items])
        if items and hasattr(items[0], "get_fields_and_field_types"):
            return "\n" + "\n".join(f"{pad}- \n{to_text(item, indent + 1, max_items)}" for item in items)
        more = f", ... ({len(value)} items)" if len(value) > max_items else ""
        return "[" + ", ".join(str(item) for item in items) + more + "]"
    return repr(value) if isinstance(value, str) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rostopic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    list_parser = sub.add_parser("list", help="topics seen on the graph")
    list_parser.add_argument("-t", "--show-types", action="store_true")
    echo = sub.add_parser("echo", help="print messages of a topic")
    echo.add_argument("topic")
    echo.add_argument("--type", help="message type, e.g. sensor_msgs/msg/Image (default: from the graph)")
    echo.add_argument("--latched", action="store_true", help="transient_local (for /tf_static and latched maps)")
    echo.add_argument("--best-effort", action="store_true", help="best-effort reliability (sensor data)")
    echo.add_argument("-n", "--count", type=int, default=0, help="stop after N messages (default: run until Ctrl-C)")
    echo.add_argument("--max-items", type=int, default=16, help="array items shown (default 16)")
    hz = sub.add_parser("hz", help="message rate of a topic")
    hz.add_argument("topic")
    hz.add_argument("--type")
    hz.add_argument("--window", type=int, default=100, help="messages in the rate window (default 100)")
    hz.add_argument("--best-effort", action="store_true")
    args = parser.parse_args(argv)

    import rclpy
    from rclpy.executors import ExternalShutdownException
    rclpy.init()
    node = rclpy.create_node("rostopic", start_parameter_services=False)
    try:
        if args.command == "list":
            for topic, types in sorted(discover(node).items()):
                print(f"{topic} [{', '.join(types)}]" if args.show_types else topic)
            return 0
        msg_type = topic_type(node, args.topic, args.type)
        if args.command == "echo":
            received = []

            def on_echo(msg):
                received.append(1)
                print(to_text(msg, max_items=args.max_items) + "\n---", flush=True)

            node.create_subscription(msg_type, args.topic, on_echo, qos(args.latched, args.best_effort))
            while rclpy.ok() and (args.count == 0 or len(received) < args.count):
                rclpy.spin_once(node, timeout_sec=0.1)
        else:
            arrivals: list[float] = []

            def on_hz(_msg):
                arrivals.append(time.monotonic())
                del arrivals[:-args.window - 1]

            node.create_subscription(msg_type, args.topic, on_hz, qos(False, args.best_effort), raw=True)
            next_report = time.monotonic() + 1.0
            while rclpy.ok():
                rclpy.spin_once(node, timeout_sec=0.05)
                if time.monotonic() >= next_report:
                    next_report += 1.0
                    if len(arrivals) >= 2:
                        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
                        mean = sum(gaps) / len(gaps)
                        print(f"average rate: {1.0 / mean:.3f} Hz  min {min(gaps):.4f} s  max {max(gaps):.4f} s  "
                              f"window {len(gaps)}", flush=True)
                    else:
                        print("no new messages", flush=True)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
