"""Segments and re-anchoring: a streaming session wrapper that restarts the model on a recent frame when its anchor
no longer overlaps the view, re-feeds the last K frames so consecutive segments overlap, and aligns each new segment
to the previous one by Sim(3) on those frames (VGGT-Long's chunk alignment, done online): by default
(``alignment="poses"``) its rotation and translation from the frames' camera poses in both segments and its scale
from their depth ratio (sim3.align_from_poses); ``"points"`` fits a Sim(3) to their point maps
(sim3.align_point_maps, as VGGT-Long does; a smooth depth error tilts that fit). docs/longrun/README.md compares the
two.

``SegmentedSession`` implements the session protocol (model/session.py: step, reset, window, anchors, frames_seen,
stats, shrunk), so the reconstructor and pipeline use it unchanged: its outputs are in one continuous frame (the first
segment's world), so published odometry stays continuous; every segment boundary is recorded as a ``SegmentEvent``
(its Sim(3), fit quality) for the pose graph. The model's KV cache is untouched: a segment starts with
``inner.reset()``.

``ReanchorPolicy`` decides when: after ``max_segment_frames`` frames, or when the fraction of the current frame's
valid points that the anchor camera also sees (inside its image, depth consistent within ``depth_tolerance``) falls
below ``min_anchor_overlap`` (not before ``min_segment_frames``). Re-anchoring costs K extra model steps on the frame
that triggers it.

A new segment's alignment is refused (the segment is still started, but aligned by the last camera pose only, scale
kept, and the event marked ``ok=False``) when its inlier ratio is below ``min_inlier_ratio``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ros2_stream4d.mapping.backend import sim3 as S3
from ros2_stream4d.mapping.conventions import extrinsic_to_pose, inverse, unproject_depth
from ros2_stream4d.mapping.reconstructor import nominal_K, usable_K

ALIGNMENTS = ("poses", "points")


@dataclass
class ReanchorPolicy:
    min_anchor_overlap: float = 0.3
    max_segment_frames: int = 120
    min_segment_frames: int = 24
    overlap_frames: int = 8  # K: frames re-fed into a new segment (the overlap of consecutive segments)
    depth_tolerance: float = 0.1  # relative
    overlap_samples: int = 2000
    min_inlier_ratio: float = 0.5
    # poses: sim3.align_from_poses; points: sim3.align_point_maps (VGGT-Long's). poses became the default once the
    # loops' scale was unbiased (symmetric scale): realistic noise, 6 lockstep runs, mean cloud F 0.861 -> 0.868 and
    # 0 false loops (2 with points) (docs/longrun/README.md, "an unbiased scale")
    alignment: str = "poses"

    def __post_init__(self):
        if not (1 <= self.overlap_frames < self.min_segment_frames <= self.max_segment_frames):
            raise ValueError("need 1 <= overlap_frames < min_segment_frames <= max_segment_frames")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")

    def reason(self, frames_in_segment: int, overlap: float) -> str | None:
        """Why to start a new segment now (None = keep going)."""
        if frames_in_segment >= self.max_segment_frames:
            return "max_segment_frames"
        if frames_in_segment >= self.min_segment_frames and overlap < self.min_anchor_overlap:
            return "anchor_overlap"
        return None


def anchor_overlap(anchor_depth, anchor_K, T_world_anchor, depth, K, T_world_cam, samples: int = 2000,
                   tolerance: float = 0.1) -> float:
    """Fraction of the current frame's valid depth points (a regular subsample) that the anchor camera sees."""
    valid = np.isfinite(depth) & (depth > 0)
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return 0.0
    idx = idx[np.linspace(0, len(idx) - 1, min(samples, len(idx))).astype(int)]
    pts = unproject_depth(depth, K, T_world_cam).reshape(-1, 3)[idx]
    T_a_w = inverse(T_world_anchor)
    p = pts @ T_a_w[:3, :3].T + T_a_w[:3, 3]
    z = p[:, 2]
    front = z > 1e-6
    u = np.full(len(z), -1.0)
    v = np.full(len(z), -1.0)
    u[front] = anchor_K[0, 0] * p[front, 0] / z[front] + anchor_K[0, 2]
    v[front] = anchor_K[1, 1] * p[front, 1] / z[front] + anchor_K[1, 2]
    h, w = anchor_depth.shape
    ui, vi = np.round(u).astype(int), np.round(v).astype(int)
    inside = front & (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    za = np.full(len(z), np.nan)
    za[inside] = anchor_depth[vi[inside], ui[inside]]
    seen = inside & np.isfinite(za) & (np.abs(za - z) <= tolerance * np.maximum(z, 1e-6))
    return float(seen.mean())


@dataclass
class SegmentEvent:
    segment: int  # the new segment's index
    frame: int  # index (frames_seen) of the frame that triggered it
    reason: str
    S_prev_new: np.ndarray  # the new segment's world in the previous segment's world
    S_odom_new: np.ndarray  # ... in the continuous frame
    inlier_ratio: float
    rmse: float
    ok: bool


@dataclass
class _Frame:
    image: torch.Tensor
    stamp_ns: int | None
    mapping: object
    T_seg_cam: np.ndarray  # in its segment's world
    depth: np.ndarray
    conf: np.ndarray
    K: np.ndarray


@dataclass
class SegmentStats:
    segments: int = 1
    refed_frames: int = 0
    failed_alignments: int = 0
    events: list = field(default_factory=list)


class SegmentedSession:
    """A session whose stream is cut into overlapping, Sim(3)-aligned segments (see the module docstring)."""

    def __init__(self, inner, policy: ReanchorPolicy | None = None, on_segment=None):
        self.inner = inner
        self.policy = policy or ReanchorPolicy()
        self.on_segment = on_segment
        self.window = inner.window  # the session protocol (model/session.py) declares both
        self.anchors = inner.anchors
        self._reset_state()

    def _reset_state(self) -> None:
        self.S_odom_seg = np.eye(4)  # the current segment's world in the continuous frame
        self.segment = 0
        self._in_segment = 0
        self._anchor: _Frame | None = None
        self._recent: deque[_Frame] = deque(maxlen=self.policy.overlap_frames)
        self._seen = 0
        self.segment_stats = SegmentStats()
        self.last_overlap = 1.0

    # ------------------------------------------------------------------ the session protocol
    @property
    def frames_seen(self) -> int:
        return self._seen

    def reset(self) -> None:
        self.inner.reset()
        self._reset_state()

    def stats(self):
        return self.inner.stats()

    def shrunk(self, window: int):
        smaller = self.inner.shrunk(window)
        return None if smaller is None else SegmentedSession(smaller, self.policy, self.on_segment)

    def step(self, image: torch.Tensor, stamp_ns: int | None = None, mapping=None) -> dict:
        out = self.inner.step(image, stamp_ns=stamp_ns, mapping=mapping)
        f = _frame_of(out, image, stamp_ns, mapping)
        self._seen += 1
        self._in_segment += 1
        if self._anchor is None:
            self._anchor = f
        self._recent.append(f)
        result = _transform_outputs(out, f, self.S_odom_seg)
        a = self._anchor
        self.last_overlap = anchor_overlap(a.depth, a.K, a.T_seg_cam, f.depth, f.K, f.T_seg_cam,
                                           self.policy.overlap_samples, self.policy.depth_tolerance)
        why = self.policy.reason(self._in_segment, self.last_overlap)
        if why is not None:
            self._new_segment(why)
        return result

    # ------------------------------------------------------------------ re-anchoring
    def _new_segment(self, reason: str) -> None:
        old = list(self._recent)
        self.inner.reset()
        new = []
        for f in old:  # the last K frames again, oldest first: the new anchor is the oldest of them
            out = self.inner.step(f.image, stamp_ns=f.stamp_ns, mapping=f.mapping)
            new.append(_frame_of(out, f.image, f.stamp_ns, f.mapping))
        self.segment_stats.refed_frames += len(old)
        conf_old = np.stack([f.conf for f in old])
        conf_new = np.stack([f.conf for f in new])
        ok, ratio, rmse = True, 0.0, float("nan")
        try:
            if self.policy.alignment == "poses":
                fit = S3.align_from_poses(
                    np.stack([f.T_seg_cam for f in old]), np.stack([f.T_seg_cam for f in new]),
                    np.stack([f.depth for f in old]), np.stack([f.depth for f in new]),
                    np.stack([f.K for f in old]), np.stack([f.K for f in new]), conf_old, conf_new, max_points=20000)
            else:
                pts_old = np.stack([unproject_depth(f.depth, f.K, f.T_seg_cam) for f in old])
                pts_new = np.stack([unproject_depth(f.depth, f.K, f.T_seg_cam) for f in new])
                c_old = np.stack([f.T_seg_cam[:3, 3] for f in old])
                c_new = np.stack([f.T_seg_cam[:3, 3] for f in new])
                fit = S3.align_point_maps(pts_old, pts_new, conf_old, conf_new, c_old, c_new, max_points=20000)
            S_prev_new, ratio, rmse = fit.S, fit.inlier_ratio, fit.rmse
            ok = ratio >= self.policy.min_inlier_ratio
        except ValueError:
            ok = False
        if not ok:  # fall back on the newest camera: rigid, the previous segment's scale
            self.segment_stats.failed_alignments += 1
            S_prev_new = old[-1].T_seg_cam @ inverse(new[-1].T_seg_cam)
        self.S_odom_seg = self.S_odom_seg @ S_prev_new
        self.segment += 1
        self.segment_stats.segments += 1
        self._anchor = new[0]
        self._recent = deque(new, maxlen=self.policy.overlap_frames)
        self._in_segment = len(new)
        ev = SegmentEvent(self.segment, self._seen - 1, reason, S_prev_new, self.S_odom_seg.copy(), ratio, rmse, ok)
        self.segment_stats.events.append(ev)
        if self.on_segment is not None:
            self.on_segment(ev)


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _frame_of(out: dict, image, stamp_ns, mapping) -> _Frame:
    depth = _np(out["depth"])[0]
    depth = depth[..., 0] if depth.ndim == 3 else depth
    conf = _np(out["depth_conf"])[0]
    if "extrinsic" in out and "intrinsic" in out:
        ext, K = _np(out["extrinsic"])[0], _np(out["intrinsic"])[0]
    else:
        from ros2_stream4d.model.geometry import pose_encoding_to_extri_intri

        e, k = pose_encoding_to_extri_intri(out["pose_enc"].detach().float().cpu(), depth.shape)
        ext, K = _np(e).reshape(-1, 3, 4)[0], _np(k).reshape(-1, 3, 3)[0]
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)
    K = K.astype(np.float64)
    if not usable_K(K):  # an untrained model's zero field of view: the reconstructor's stand-in, as it publishes
        K = nominal_K(depth.shape)
    return _Frame(image, stamp_ns, mapping, extrinsic_to_pose(ext.astype(np.float64)), depth.astype(np.float32),
                  conf.astype(np.float32), K.astype(np.float64))


def _transform_outputs(out: dict, f: _Frame, S: np.ndarray) -> dict:
    """The session outputs with the segment's world mapped into the continuous frame by the Sim(3) S: poses and
    points transformed, depth scaled by its scale (the frame seen at that scale), confidences unchanged."""
    R, t, s = S3.decompose(S)
    T = np.eye(4)
    T[:3, :3] = R @ f.T_seg_cam[:3, :3]
    T[:3, 3] = s * R @ f.T_seg_cam[:3, 3] + t
    ext = inverse(T)[:3, :]
    res = dict(out)
    ref = out["depth"]

    def like(x):
        return torch.as_tensor(np.asarray(x, np.float32), device=ref.device)[None]

    res["depth"] = out["depth"] * s
    if "world_points" in out:
        wp = _np(out["world_points"])[0]
        res["world_points"] = like(wp @ (s * R).T.astype(np.float32) + t.astype(np.float32))
    res["extrinsic"], res["intrinsic"] = like(ext), like(f.K)
    if "pose_enc" in out:
        from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding

        res["pose_enc"] = extri_intri_to_pose_encoding(torch.as_tensor(ext, dtype=torch.float64),
                                                       torch.as_tensor(f.K, dtype=torch.float64),
                                                       f.depth.shape).float().to(ref.device)[None]
    return res
