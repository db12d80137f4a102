#!/usr/bin/env bash
# The README's main job: set up (idempotent), then render a synthetic sequence, replay it as a rosbag over DDS
# (loopback only) into stream4d_node, and write the map, output bag, plots and metrics under out/demo.
#   ./scripts/demo.sh                       # defaults (see `stream4d demo --help`)
#   ./scripts/demo.sh --frames 300 --trajectory handheld
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# shellcheck disable=SC1091
. scripts/ros_env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
exec stream4d demo "$@"
