"""See what the robot sees: Rerun recordings of a run (`stream4d view`, the demo's demo.rrd) and a live viewer.

ROS-free: this package reads bags through eval/ and sim/ (rosbags, no rclpy) and takes the mapping layer's
FrameResult in the live viewer. Both paths log the same entities through entities.RunLogger.
"""
