# Source me: DDS kept on this machine. Used by every script, test and CI run of ros2_stream4d.
#   . scripts/ros_env.sh
_s4d_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$_s4d_root/.venv/bin/activate" ]; then . "$_s4d_root/.venv/bin/activate"; fi
export AMENT_PREFIX_PATH="${VIRTUAL_ENV:-}${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}"
export FASTDDS_DEFAULT_PROFILES_FILE="$_s4d_root/config/fastdds_loopback.xml"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
unset _s4d_root
