#!/usr/bin/env bash
# Idempotent set-up: a .venv with everything ros2_stream4d needs. Fast when all is there already.
#   - system ROS 2 sourced (ROS_DISTRO set, rclpy importable): venv with --system-site-packages, no ROS wheels
#   - otherwise: ROS 2 wheels from PyPI + tf2_msgs built locally; STREAM4D_ROS_DISTRO picks the distribution:
#       kilted (default, requirements-ros.txt, venv .venv) or jazzy (LTS, requirements-ros-jazzy.txt, venv .venv-jazzy)
#       e.g. STREAM4D_ROS_DISTRO=jazzy scripts/setup.sh && . .venv-jazzy/bin/activate && . scripts/ros_env.sh
#   - torch: STREAM4D_TORCH (default torch==2.13.0, the CPU build on machines without CUDA)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DISTRO="${STREAM4D_ROS_DISTRO:-kilted}"; DISTRO="${DISTRO,,}"
case "$DISTRO" in
  kilted) REQ_ROS=requirements-ros.txt; DEFAULT_VENV="$ROOT/.venv" ;;
  jazzy) REQ_ROS=requirements-ros-jazzy.txt; DEFAULT_VENV="$ROOT/.venv-jazzy" ;;
  *) echo "[setup] STREAM4D_ROS_DISTRO=$DISTRO: expected kilted (the default) or jazzy" >&2; exit 2 ;;
esac
VENV="${STREAM4D_VENV:-$DEFAULT_VENV}"
STAMP="$VENV/.stream4d-setup"
T0=$(date +%s)
say() { echo "[setup] $*"; }

# Everything the last successful run installed is still in place: nothing to do.
fingerprint() { { echo "ros=$DISTRO root=$ROOT"; cat requirements.txt "$REQ_ROS" requirements-dev.txt setup.py scripts/setup.sh; } 2>/dev/null | sha1sum | cut -d' ' -f1; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] && "$VENV/bin/python" -c "import ros2_stream4d, torch, rclpy, tf2_msgs.msg" 2>/dev/null; then
  say "up to date ($VENV); nothing to install"
  exit 0
fi

if ! ldconfig -p | grep -q libusb-1.0.so.0 || ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  say "apt: libusb-1.0-0 (Open3D), cmake, g++"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq libusb-1.0-0 cmake g++ >/dev/null
fi
# Chromium (Debian package): the browser test looks at Rerun's web viewer with it; without it that test skips
if ! command -v chromium >/dev/null; then
  say "apt: chromium (browser test of the Rerun web viewer)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || say "chromium could not be installed with apt: the browser test will skip"
fi

SYSTEM_ROS=0
if [ -n "${ROS_DISTRO:-}" ] && python3 -c "import rclpy" 2>/dev/null; then SYSTEM_ROS=1; fi
if [ $SYSTEM_ROS = 1 ] && [ -n "${STREAM4D_ROS_DISTRO:-}" ] && [ "$STREAM4D_ROS_DISTRO" != "$ROS_DISTRO" ]; then
  say "note: STREAM4D_ROS_DISTRO=$STREAM4D_ROS_DISTRO ignored: the sourced system ROS 2 ($ROS_DISTRO) is used"
fi
# one venv holds one distribution: never mix Kilted and Jazzy wheels (and a tf2_msgs built against the other)
if [ $SYSTEM_ROS = 0 ] && [ -x "$VENV/bin/python" ]; then
  HAVE="$(cat "$VENV/.stream4d-ros-distro" 2>/dev/null || "$VENV/bin/python" -c "import importlib.metadata as m
for name, dist in (('jazzy', 'ros-jazzy-rclpy'), ('kilted', 'ros-rclpy')):
    try:
        m.version(dist); print(name); break
    except m.PackageNotFoundError:
        pass" 2>/dev/null || true)"
  if [ -n "$HAVE" ] && [ "$HAVE" != "$DISTRO" ]; then
    say "$VENV holds ROS 2 $HAVE, not $DISTRO: set STREAM4D_VENV to another folder or delete this one" >&2
    exit 1
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  if [ $SYSTEM_ROS = 1 ]; then
    say "system ROS 2 ($ROS_DISTRO) found: venv shares its site-packages"
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# this workplace's pip config lists local wheel folders that may be absent: hide those warnings, keep real errors
pipq() { pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ $SYSTEM_ROS = 0 ]; then
  say "pip: ROS 2 $DISTRO wheels ($REQ_ROS)"
  pipq -r "$REQ_ROS"
  echo "$DISTRO" >"$VENV/.stream4d-ros-distro"
fi
if ! python -c "import torch" 2>/dev/null; then
  say "pip: ${STREAM4D_TORCH:-torch==2.13.0}"
  pipq "${STREAM4D_TORCH:-torch==2.13.0}"
fi
say "pip: python dependencies"
pipq -r requirements.txt -r requirements-dev.txt

if [ $SYSTEM_ROS = 0 ] && ! python -c "from tf2_msgs.msg import TFMessage" 2>/dev/null; then
  say "build: tf2_msgs (no wheel exists)"
  python scripts/fix_ros_wheel_cmake.py
  BUILD="$(mktemp -d)"
  AMENT_PREFIX_PATH="$VIRTUAL_ENV" CMAKE_PREFIX_PATH="$VIRTUAL_ENV" cmake -S third_party/tf2_msgs -B "$BUILD" \
    -DCMAKE_INSTALL_PREFIX="$VIRTUAL_ENV" -DPython3_EXECUTABLE="$VIRTUAL_ENV/bin/python" \
    -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >"$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" >"$BUILD/build.log" 2>&1 || { tail -50 "$BUILD/build.log"; exit 1; }
  cmake --install "$BUILD" >/dev/null
  rm -rf "$BUILD"
  python -c "from tf2_msgs.msg import TFMessage"
fi

say "pip: ros2_stream4d (editable)"
pipq --no-deps --no-build-isolation -e .
# ament index + share/ros2_stream4d in the venv prefix so get_package_share_directory() finds launch/config/model
python scripts/install_share.py "$VIRTUAL_ENV"

fingerprint >"$STAMP"
say "done in $(( $(date +%s) - T0 )) s; venv size $(du -sh "$VENV" | cut -f1)"
