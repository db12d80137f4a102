"""Frames in, geometry out: preprocessing, the streaming reconstructor, scale, map fusion (no rclpy)."""
