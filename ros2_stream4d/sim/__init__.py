"""Synthetic worlds with exact ground truth: procedural scenes, trajectories, rendering, rosbag writing.

Modules: scenes (meshes), textures, trajectories, render (Open3D raycasting), bag (sim rosbag2 writing and
ground-truth reading), oracle (ground truth in the model's output format), cli (`stream4d sim`).
Importing this package imports nothing heavy (no open3d, no torch).
"""

SCENE_KINDS = ("room", "corridor", "objects", "outdoor", "office")
TRAJECTORY_KINDS = ("handheld", "ground_robot", "orbit", "loop", "figure_eight", "out_and_back")
