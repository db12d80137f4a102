"""rclpy adapters: the node, message conversion, TF, services, diagnostics, bag player."""
