"""A seeded front-end drift model for evaluating the back-end (not a learned model's errors, a stand-in for them).

A streaming reconstruction model's odometry drifts with the distance travelled since its anchor frame: its scale
wanders (monocular scale drift) and its heading accumulates error (yaw drift is the dominant rotation error of a
camera moving on a floor). ``DriftModel`` turns exact camera poses into such odometry: each step's relative motion
is re-applied with its translation multiplied by the current scale s = exp(log-scale error) and rotated by the
accumulated yaw error about the world's up axis; per metre, the log-scale error grows by scale_per_m + scale_per_m2 x
d and the yaw error by yaw_deg_per_m + yaw_deg_per_m2 x d (d = distance since the anchor), plus seeded random walks.
The depth of a frame is multiplied by the same s (a model whose scale has drifted sees everything that much larger).
``reset()`` re-anchors: d restarts at 0 (the accumulated error stays), which is what segments exploit.
Optional terms (0 by default, so the streams above are unchanged; sim/oracle_noise.py sets them): a random walk of
the tilt (roll and pitch about the two horizontal axes, degrees per sqrt(m)), a random walk of the position itself
(metres per sqrt(m)), and a per-frame pose jitter that does not accumulate (each output pose is perturbed by a small
random rotation and translation; the odometry continues from the unperturbed pose).

Default magnitudes are illustrative, chosen so that a 25-40 m loop drifts by ~0.5-1.5 m and ~5-10 degrees before
correction (the order of the VGGT-Long TUM/KITTI chunk drift without loop closure); they are parameters, not
measurements of any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ros2_stream4d.mapping.conventions import inverse, rotation_from_vector


@dataclass
class DriftModel:
    scale_per_m: float = 0.004  # log-scale drift per metre since the anchor
    yaw_deg_per_m: float = 0.25  # heading drift per metre since the anchor
    scale_per_m2: float = 0.0  # growth of that rate per metre since the anchor (drift grows once the anchor is out
    yaw_deg_per_m2: float = 0.0  # of view: quadratic in distance; re-anchoring bounds it)
    scale_walk: float = 0.001  # random walk of log scale per sqrt(m)
    yaw_walk_deg: float = 0.05  # random walk of yaw per sqrt(m)
    seed: int = 0
    up: tuple = (0.0, 0.0, 1.0)  # the world's up axis: heading drift turns about it ((0, -1, 0) in a camera world)
    tilt_walk_deg: float = 0.0  # random walk of roll and pitch (about two horizontal axes) per sqrt(m)
    trans_walk: float = 0.0  # random walk of the position, metres per sqrt(m) (each axis)
    jitter_m: float = 0.0  # per-frame, non-accumulating translation error (sigma per axis, m)
    jitter_deg: float = 0.0  # per-frame, non-accumulating rotation error (sigma per axis, degrees)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self._prev_true: np.ndarray | None = None
        self._prev_odom: np.ndarray | None = None
        self.distance = 0.0
        self.log_scale = 0.0
        self.yaw = 0.0
        self.tilt = np.zeros(2)
        up = np.asarray(self.up, np.float64) / np.linalg.norm(self.up)
        h1 = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 1.0, 0.0])
        h1 /= np.linalg.norm(h1)
        self._axes = (up, h1, np.cross(up, h1))  # up and two horizontal axes

    def reset(self) -> None:
        """A new anchor: the drift rate restarts from its base (distance since the anchor = 0); the error already
        accumulated stays (the odometry continues from its last pose)."""
        self.distance = 0.0

    @property
    def scale(self) -> float:
        return float(np.exp(self.log_scale))

    def step(self, T_world_cam_true: np.ndarray) -> tuple[np.ndarray, float]:
        """(drifted T_odom_cam, depth scale) for the next frame's true pose (odom = world at the first frame)."""
        T = np.asarray(T_world_cam_true, np.float64)
        if self._prev_true is None:
            self._prev_true, self._prev_odom = T.copy(), T.copy()
            return T.copy(), self.scale
        step = float(np.linalg.norm(T[:3, 3] - self._prev_true[:3, 3]))
        self.distance += step
        d, w = self.distance, np.sqrt(step)
        self.log_scale += (self.scale_per_m + self.scale_per_m2 * d) * step \
            + self.scale_walk * w * self.rng.standard_normal()
        self.yaw += np.radians((self.yaw_deg_per_m + self.yaw_deg_per_m2 * d) * step
                               + self.yaw_walk_deg * w * self.rng.standard_normal())
        up, h1, h2 = self._axes
        if self.tilt_walk_deg:
            self.tilt += np.radians(self.tilt_walk_deg) * w * self.rng.standard_normal(2)
        R_err = rotation_from_vector(up * self.yaw)
        if self.tilt_walk_deg:
            R_err = R_err @ rotation_from_vector(h1 * self.tilt[0] + h2 * self.tilt[1])
        odom = np.eye(4)
        odom[:3, :3] = R_err @ T[:3, :3]
        odom[:3, 3] = self._prev_odom[:3, 3] + self.scale * (R_err @ (T[:3, 3] - self._prev_true[:3, 3]))
        if self.trans_walk:
            odom[:3, 3] += self.trans_walk * w * self.rng.standard_normal(3)
        self._prev_true, self._prev_odom = T.copy(), odom
        out = odom.copy()
        if self.jitter_deg:
            out[:3, :3] = rotation_from_vector(np.radians(self.jitter_deg) * self.rng.standard_normal(3)) @ out[:3, :3]
        if self.jitter_m:
            out[:3, 3] += self.jitter_m * self.rng.standard_normal(3)
        return out, self.scale

    def run(self, T_world_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drift a whole trajectory: (odometry poses (N, 4, 4), depth scales (N,))."""
        out = [self.step(T) for T in np.asarray(T_world_cam)]
        return np.stack([o[0] for o in out]), np.array([o[1] for o in out])


class DriftedSession:
    """A session wrapper (model/session.py protocol) that gives an exact session's stream the drift above: every
    segment (since the last reset) starts exact at its first frame and drifts with the distance travelled since it,
    like a model whose anchor frame falls behind. Depth and points are scaled by the drifted scale, poses drifted.
    Seeds: ``seed`` + the number of resets (reproducible). The session's world is its first camera's optical frame:
    for a level camera up is -y there (the default ``up``)."""

    def __init__(self, inner, seed: int = 0, **drift):
        drift.setdefault("up", (0.0, -1.0, 0.0))
        self.inner, self.seed, self.drift_params = inner, int(seed), drift
        self.window = inner.window  # the session protocol (model/session.py) declares both
        self.anchors = inner.anchors
        self.resets = 0
        self.model = DriftModel(seed=self.seed, **drift)

    @property
    def frames_seen(self) -> int:
        return self.inner.frames_seen

    def reset(self) -> None:
        self.inner.reset()
        self.resets += 1
        self.model = DriftModel(seed=self.seed + 1000 * self.resets, **self.drift_params)

    def stats(self):
        return self.inner.stats()

    def shrunk(self, window: int):
        return None

    def perturb(self, depth: np.ndarray, conf: np.ndarray):
        """Per-pixel errors on top of the drift: (depth, confidence) for this frame's drifted depth (h, w) and the
        inner session's confidence, or None for none (this class). Subclasses (sim/oracle_noise.py) override it."""
        return None

    def step(self, image=None, stamp_ns=None, mapping=None) -> dict:
        import torch

        from ros2_stream4d.mapping.conventions import extrinsic_to_pose, unproject_depth
        from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding

        out = self.inner.step(image, stamp_ns=stamp_ns, mapping=mapping)
        ext = out["extrinsic"][0].detach().double().cpu().numpy()
        K = out["intrinsic"][0].detach().double().cpu().numpy()
        T, s = self.model.step(extrinsic_to_pose(ext))
        depth = out["depth"][0, ..., 0].detach().cpu().numpy().astype(np.float64) * s
        perturbed = self.perturb(depth, out["depth_conf"][0].detach().cpu().numpy().astype(np.float64))
        if perturbed is not None:
            depth, conf = perturbed
        ext_d = inverse(T)[:3, :]
        dev = out["depth"].device

        def t(x):
            return torch.as_tensor(np.asarray(x, np.float32), device=dev)[None]

        res = dict(out)
        res["depth"] = out["depth"] * float(s) if perturbed is None else t(depth[..., None])
        if perturbed is not None:
            res["depth_conf"] = res["world_points_conf"] = t(conf)
        res["extrinsic"], res["intrinsic"] = t(ext_d), t(K)
        pts = unproject_depth(depth, K, T)
        pts[~(depth > 0)] = 0.0
        res["world_points"] = t(pts)
        res["pose_enc"] = extri_intri_to_pose_encoding(torch.as_tensor(ext_d), torch.as_tensor(K),
                                                       depth.shape).float().to(dev)[None]
        return res
