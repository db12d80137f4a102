#!/usr/bin/env bash
# The README's main job: set up (idempotent), then render a synthetic sequence, replay it as a rosbag over DDS
# (loopback only) into stream4d_node, and write the map, output bag, plots and metrics under out/demo.
#   ./scripts/demo.sh                       # defaults (see `stream4d demo --help`)
#   ./scripts/demo.sh --frames 300 --trajectory handheld
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# the venv setup.sh built: .venv (Kilted, the default) or .venv-<distro> (STREAM4D_ROS_DISTRO=jazzy)
case "${STREAM4D_ROS_DISTRO:-kilted}" in kilted|Kilted|KILTED) VENV_DIR=.venv ;; *) VENV_DIR=".venv-${STREAM4D_ROS_DISTRO,,}" ;; esac
# shellcheck disable=SC1091
. "${STREAM4D_VENV:-$ROOT/$VENV_DIR}/bin/activate"
# shellcheck disable=SC1091
. scripts/ros_env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
exec stream4d demo "$@"
