"""Which TF edges the node publishes (REP-105: one parent per frame, ever), decided once per stream.

Camera only (no base_frame):
  the camera's static tree is walked up from the image frame (camera_color_optical_frame -> camera_link, as a
  camera driver publishes on /tf_static); the node publishes ``map -> <root>`` (the root's pose composed with the
  static chain), or ``map -> <image frame>`` when the image frame has no parent.
Robot (base_frame set):
  ``odom -> base_frame`` (the estimate) plus ``map -> odom`` (identity until a back-end corrects drift) when
  nothing else publishes base_frame's parent, else only ``map -> odom`` (another node, e.g. wheel odometry, owns
  ``odom -> base_frame``; the node's estimate goes to ``map -> odom`` so odometry stays continuous).
``tf_mode`` forces one of: map_to_camera (the camera tree's root, as above), odom_to_base, map_to_odom.

With the long-run back-end (``backend:=true``) the estimate is odometry and the back-end's correction is
``map -> odom``: camera only publishes ``map -> odom`` (the correction) and ``odom -> <root>``; a robot publishes
the correction as ``map -> odom`` (composed with the node's map -> odom estimate when another node owns
``odom -> base_frame``).

An edge whose child already has a parent published by another node is never published: the policy reports one
clear error (``conflict``) and the node publishes no TF for that stream. The decision is made at the first frame
of each stream (TF seen by then: the camera driver's /tf_static is latched) and kept until the stream resets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class TransformNotFound(LookupError):
    """No chain of transforms connects the two frames (yet)."""


class TfView(Protocol):
    """What the policy needs of a TF buffer (ros/compat's TfBuffer and the tf2_ros adapter implement it)."""

    def parent_of(self, frame: str) -> str | None: ...

    def lookup(self, target: str, source: str, stamp_ns: int | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class TfDecision:
    mode: str  # map_to_camera | odom_to_base | map_to_odom | none
    parent: str  # header frame of ~/odometry: the parent of the edge that carries the estimate
    child: str  # child of that edge; for map_to_camera the camera tree's root
    moving_frame: str  # the body whose pose ~/odometry reports (its child_frame_id)
    conflict: str = ""  # why nothing is published ("" when fine)

    def edges(self, cfg: Any) -> list[tuple[str, str]]:
        """(parent, child) of every edge the node publishes in this stream."""
        if self.mode == "none":
            return []
        if self.mode == "odom_to_base":
            return [(cfg.map_frame, cfg.odom_frame), (cfg.odom_frame, cfg.base_frame)]
        if self.mode == "map_to_camera" and cfg.backend:
            return [(cfg.map_frame, cfg.odom_frame), (self.parent, self.child)]
        return [(self.parent, self.child)]


MAX_DEPTH = 64


def camera_tree_root(tf: TfView, frame: str, own_edges: set[tuple[str, str]]) -> str:
    """The top of `frame`'s tree, ignoring the edges this node published itself."""
    seen = [frame]
    for _ in range(MAX_DEPTH):
        parent = tf.parent_of(seen[-1])
        if parent is None or (parent, seen[-1]) in own_edges:
            return seen[-1]
        if parent in seen:
            raise TransformNotFound(f"TF cycle above {frame!r}: {' -> '.join(seen + [parent])}")
        seen.append(parent)
    raise TransformNotFound(f"TF tree above {frame!r} is deeper than {MAX_DEPTH}")


def decide(cfg: Any, tf: TfView, camera_frame: str, external_odom: bool,
           own_edges: set[tuple[str, str]]) -> TfDecision:
    """The stream's TF edge. `external_odom`: another node publishes base_frame's parent (seen before we ever
    published it). `own_edges`: (parent, child) pairs this node has published (not other publishers' edges)."""
    mode = cfg.tf_mode
    if mode == "auto":
        mode = "map_to_camera" if not cfg.base_frame else ("map_to_odom" if external_odom else "odom_to_base")
    if mode == "map_to_camera":
        root = camera_tree_root(tf, camera_frame, own_edges)
        # with the back-end, odom is the parent of the root this node publishes: a tree already under odom conflicts
        if root == cfg.map_frame or (cfg.backend and root == cfg.odom_frame):
            return TfDecision("none", "", camera_frame, camera_frame,
                              f"{camera_frame!r} already hangs below {root!r} through another node's TF: "
                              "the node publishes no TF")
        if cfg.backend:  # the estimate is odometry; the back-end's correction is map -> odom
            parent = tf.parent_of(cfg.odom_frame)
            if parent is not None and (parent, cfg.odom_frame) not in own_edges:
                return TfDecision("none", "", camera_frame, camera_frame,
                                  f"{cfg.odom_frame!r} already has the parent {parent!r} from another node: the "
                                  f"back-end cannot publish {cfg.map_frame} -> {cfg.odom_frame}")
            return TfDecision(mode, cfg.odom_frame, root, root)
        return TfDecision(mode, cfg.map_frame, root, root)
    if mode == "odom_to_base":
        for frame in (cfg.base_frame, cfg.odom_frame):
            parent = tf.parent_of(frame)
            if (frame == cfg.base_frame and external_odom) or (parent is not None
                                                                and (parent, frame) not in own_edges):
                return TfDecision("none", "", cfg.base_frame, cfg.base_frame,
                                  f"{frame!r} already has the parent {parent!r} from another node: the node "
                                  f"publishes no {cfg.odom_frame} -> {cfg.base_frame} (use tf_mode map_to_odom)")
        return TfDecision(mode, cfg.odom_frame, cfg.base_frame, cfg.base_frame)
    # map_to_odom: another node owns odom -> base_frame
    parent = tf.parent_of(cfg.odom_frame)
    if parent is not None and (parent, cfg.odom_frame) not in own_edges:
        return TfDecision("none", "", cfg.odom_frame, cfg.base_frame,
                          f"{cfg.odom_frame!r} already has the parent {parent!r} from another node: the node "
                          f"publishes no {cfg.map_frame} -> {cfg.odom_frame}")
    return TfDecision("map_to_odom", cfg.map_frame, cfg.odom_frame, cfg.base_frame)


def body_pose(decision: TfDecision, result: Any, tf: TfView, camera_frame: str) -> np.ndarray | None:
    """The moving frame's pose in the odometry header frame (decision.parent) for one frame result. With a
    back-end the result's poses are odometry: in map_to_odom mode (the header frame is map) they are corrected."""
    if decision.mode == "map_to_camera":
        if decision.child == camera_frame:
            return result.T_map_cam
        # map -> root = map -> camera (estimated) composed with camera -> root (the static chain)
        return result.T_map_cam @ tf.lookup(camera_frame, decision.child, result.stamp_ns)
    T = result.T_map_base if result.T_map_base is not None else result.T_map_cam
    if decision.mode == "map_to_odom" and result.odom_correction is not None:
        return result.odom_correction @ T
    return T


def edge_transforms(decision: TfDecision, cfg: Any, result: Any, body: np.ndarray
                    ) -> list[tuple[str, str, np.ndarray]]:
    """(parent, child, parent_from_child) of the stream's edges for one frame result, given its body_pose; an edge
    that cannot be formed this frame (map -> odom without the other node's odometry at this stamp) is left out."""
    # the back-end's map <- odom (identity without one: the map origin is the odom origin)
    C = result.odom_correction if result.odom_correction is not None else np.eye(4)
    if decision.mode == "map_to_camera":
        if cfg.backend:
            return [(cfg.map_frame, cfg.odom_frame, C), (decision.parent, decision.child, body)]
        return [(decision.parent, decision.child, body)]
    if decision.mode == "odom_to_base":  # nothing else estimates odometry
        return [(cfg.map_frame, cfg.odom_frame, C), (cfg.odom_frame, cfg.base_frame, result.T_map_base)]
    if decision.mode == "map_to_odom" and result.T_map_odom is not None:
        return [(cfg.map_frame, cfg.odom_frame, C @ result.T_map_odom)]
    return []


def check_one_parent(transforms: list[tuple[str, str]]) -> list[str]:
    """Problems of a recorded TF tree: frames with two parents, cycles. [(parent, child)] of every message seen."""
    problems = []
    parents: dict[str, set[str]] = {}
    for parent, child in transforms:
        parents.setdefault(child.lstrip("/"), set()).add(parent.lstrip("/"))
    for child, ps in sorted(parents.items()):
        if len(ps) > 1:
            problems.append(f"{child!r} has {len(ps)} parents: {sorted(ps)}")
    single = {c: next(iter(ps)) for c, ps in parents.items()}
    for start in single:
        seen, frame = {start}, start
        while frame in single:
            frame = single[frame]
            if frame in seen:
                problems.append(f"cycle through {frame!r}")
                break
            seen.add(frame)
    return sorted(set(problems))
