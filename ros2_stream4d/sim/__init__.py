"""Synthetic worlds with exact ground truth: procedural scenes, trajectories, rendering, rosbag writing."""
