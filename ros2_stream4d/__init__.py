"""ros2_stream4d: live 3D geometry from cameras with a streaming visual-geometry transformer.

Layers (imports point down only):
    ros/      rclpy adapters: node, message conversion, TF, services, diagnostics, bag player
    mapping/  frames in, geometry out (numpy/torch/open3d; never rclpy)
    model/    the transformer, rolling KV cache, checkpoints (torch only)
Beside them: sim/ (synthetic worlds), eval/ (metrics, reports), bench/ (performance), cli.py, and codec.py
(ROS messages <-> numpy without ROS, for rclpy and rosbags messages alike; ros/, sim/ and eval/ use it).
Importing this package imports none of them (and never rclpy).
"""

__version__ = "0.1.0"
