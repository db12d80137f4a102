"""Stand-ins for ROS tools that have no pip wheels on this machine (tf2_ros, ros2 launch, ros2 bag play/record).

- tf_buffer:  a TF buffer and /tf + /tf_static listener (tf2_ros is used instead when importable)
- minilaunch: resolves and runs the package's launch files without the launch package
- player:     plays a rosbag2 (mcap/sqlite3) over DDS with /clock and latched /tf_static (``stream4d play``)
- recorder:   records topics into a rosbag2 (the demo's output bag)
On a full ROS 2 install use tf2_ros, ``ros2 launch``, ``ros2 bag play`` and ``ros2 bag record``.
"""
