"""The long-run back-end (ROS-free): Sim(3) alignment of segments and loops (sim3), a Sim(3) pose graph in a worker
(posegraph), place recognition and geometric verification over keyframes (loops), the segment / re-anchoring policy
(segments), and the front-end drift model used to evaluate them (drift).

Sim(3) elements are 4x4 float64 matrices ``[[s R, t], [0, 1]]`` acting on points as ``x -> s R x + t``;
``S_a_b`` maps points of frame b to frame a (the pose convention of the rest of the package, with a scale).
"""
