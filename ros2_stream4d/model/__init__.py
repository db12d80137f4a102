"""The streaming visual-geometry transformer (torch only; never imports rclpy)."""
