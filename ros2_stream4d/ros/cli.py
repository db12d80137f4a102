"""`stream4d` sub-commands of the ROS layer: play (here), run and process (ros/process.py).

Imports of rclpy and the node happen inside the commands, so `stream4d --help` stays fast and ROS-free.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from ros2_stream4d.ros import process

    process.register(subparsers)  # run, process
    _register_play(subparsers)


# ------------------------------------------------------------------------------------------------ play

def _register_play(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "play", help="play a rosbag2 (mcap/sqlite3) with recorded timing and /clock, like `ros2 bag play --clock`",
        description="Republish a rosbag2 over DDS: recorded timing scaled by --rate, /clock from bag time, latched "
                    "topics (/tf_static) republished transient_local.")
    parser.add_argument("bag", help="rosbag2 directory (with metadata.yaml)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--loop", action="store_true", help="play again from the start when the bag ends")
    parser.add_argument("--clock", dest="clock", action=argparse.BooleanOptionalAction, default=True,
                        help="publish /clock from bag time (default: on)")
    parser.add_argument("--clock-hz", type=float, default=100.0, help="/clock rate in Hz (default 100)")
    parser.add_argument("--topics", nargs="+", metavar="TOPIC", help="play only these topics")
    parser.add_argument("--start-delay", type=float, default=0.0, metavar="S",
                        help="seconds to wait after creating publishers (discovery) before playing")
    parser.add_argument("--wait-for-subscribers", nargs="+", default=[], metavar="TOPIC",
                        help="wait until each of these topics has a subscriber before playing")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for --wait-for-subscribers (default 60)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(func=_play)


def _play(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from ros2_stream4d.ros.compat.player import BagPlayError, play_bag

    rclpy.init()
    try:
        stats = play_bag(args.bag, rate=args.rate, loop=args.loop, clock=args.clock, clock_hz=args.clock_hz,
                         topics=args.topics, start_delay=args.start_delay,
                         wait_for_matching=args.wait_for_subscribers, timeout=args.timeout, progress=not args.quiet,
                         should_stop=lambda: not rclpy.ok())
    except (BagPlayError, TimeoutError, ValueError) as exc:
        print(f"stream4d play: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, ExternalShutdownException):
        return 130
    finally:
        rclpy.try_shutdown()
    for topic, why in stats.skipped_topics.items():
        print(f"stream4d play: skipped {topic}: {why}", file=sys.stderr)
    counts = ", ".join(f"{topic}: {n}" for topic, n in sorted(stats.published.items()))
    print(f"stream4d play: published {sum(stats.published.values())} messages ({counts}), {stats.loops} pass(es)")
    return 0
