#!/usr/bin/env bash
# The README's test command: set up (idempotent), then lint and run the test suite with DDS kept on loopback.
#   ./scripts/test.sh                 # default suite (excludes tests marked slow)
#   ./scripts/test.sh -m slow         # extra pytest arguments are passed through
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
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST   # belt and braces: never let discovery leave this machine
echo "[test] ruff"
ruff check .
echo "[test] pytest (ROS_DOMAIN_ID base $ROS_DOMAIN_ID, DDS on loopback)"
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
python -m pytest "$@"
