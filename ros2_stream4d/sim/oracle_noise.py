"""A front-end error model for the oracle: exact ground truth made to err like a streaming geometry model.

``NoisyOracleSession`` wraps an exact session (``OracleSession``) and keeps its protocol (model/session.py) and its
output keys (sim/oracle.py). On top of the exact stream it adds, seeded:

- drift of the odometry with the distance travelled since the anchor frame (``DriftModel`` in
  mapping/backend/drift.py, the one home of the pose-error model): log-scale and heading drift (rates growing with
  distance, plus random walks), a random walk of roll/pitch and of the position, and a per-frame pose jitter that
  does not accumulate (what a relative pose error between consecutive frames measures). Depth is multiplied by the
  drifted scale, as a model whose scale has drifted sees everything that much larger;
- depth noise growing with depth: sigma(z) = sqrt((depth_rel_sigma z)^2 + (depth_quad_sigma z^2)^2), part of its
  variance (``depth_smooth``) in a smooth field (a coarse random grid, bilinearly upsampled: a learned model's
  depth errors are spatially correlated), the rest per pixel;
- outlier pixels: a fraction ``outlier_fraction`` of valid pixels whose depth is off by a factor drawn log-uniformly
  between ``outlier_min_factor`` and ``outlier_max_factor`` (nearer or farther with equal odds);
- a confidence that is lower where depth is wrong: conf = conf_min + (c - conf_min) exp(-|e| / conf_err_scale) x a
  log-normal factor (sigma ``conf_noise``), with c the exact session's confidence and e the pixel's relative depth
  error (the model's own error, not the global scale drift it cannot know). VGGT-style confidences are >= 1.

``load_noise(spec)``: "none" (no wrapper), "realistic" (``REALISTIC``) or the path of a YAML mapping whose keys
override the realistic magnitudes (unknown keys are refused, naming the key). Where the realistic numbers come from
(published figures, and which ones are our choice): docs/longrun/README.md, "The oracle's error model". The same
numbers are in config/oracle_noise_realistic.yaml (a test keeps them equal).

Seeds: the pose drift uses ``seed`` (+ 1000 per reset, as ``DriftedSession``), the pixel errors their own generator
seeded by (seed, resets): the same seed gives bit-identical output. Nothing here imports ROS.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

import numpy as np

from ros2_stream4d.mapping.backend.drift import DriftedSession

DRIFT_FIELDS = ("scale_per_m", "scale_per_m2", "yaw_deg_per_m", "yaw_deg_per_m2", "scale_walk", "yaw_walk_deg",
                "tilt_walk_deg", "trans_walk", "jitter_m", "jitter_deg")


@dataclass(frozen=True)
class OracleNoise:
    """Magnitudes of the oracle's errors (all 0 = the exact oracle). Units in the comments."""

    # pose drift with the distance d travelled since the anchor (DriftModel)
    scale_per_m: float = 0.0  # log-scale drift per metre
    scale_per_m2: float = 0.0  # growth of that rate per metre of d
    yaw_deg_per_m: float = 0.0  # heading drift, degrees per metre
    yaw_deg_per_m2: float = 0.0  # growth of that rate per metre of d
    scale_walk: float = 0.0  # random walk of log scale per sqrt(m)
    yaw_walk_deg: float = 0.0  # random walk of heading, degrees per sqrt(m)
    tilt_walk_deg: float = 0.0  # random walk of roll and pitch, degrees per sqrt(m)
    trans_walk: float = 0.0  # random walk of the position, m per sqrt(m)
    jitter_m: float = 0.0  # per-frame pose jitter (not accumulated), m per axis
    jitter_deg: float = 0.0  # per-frame pose jitter, degrees per axis
    # depth
    depth_rel_sigma: float = 0.0  # sigma of the depth error relative to depth
    depth_quad_sigma: float = 0.0  # 1/m: sigma grows as depth_quad_sigma * z^2 (stereo-like growth with depth)
    depth_smooth: float = 0.5  # fraction of the error variance in a smooth field (0 = all per pixel)
    depth_smooth_cells: int = 8  # cells of the smooth field across the image width
    outlier_fraction: float = 0.0  # fraction of valid pixels with a wrong depth
    outlier_min_factor: float = 1.15  # an outlier's depth is off by a factor in [min, max] (or its inverse)
    outlier_max_factor: float = 2.0
    # confidence
    conf_err_scale: float = 0.1  # relative depth error at which the confidence falls by a factor e
    conf_noise: float = 0.3  # log-normal spread of the confidence (it is not a perfect error predictor)
    conf_min: float = 1.0  # the floor of the confidence (VGGT-style: >= 1)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"oracle noise {f.name}: expected a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"oracle noise {f.name} must be >= 0, got {v}")
        for name in ("depth_smooth", "outlier_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(f"oracle noise {name} must be in [0, 1], got {getattr(self, name)}")
        if not 1.0 <= self.outlier_min_factor <= self.outlier_max_factor:
            raise ValueError("oracle noise needs 1 <= outlier_min_factor <= outlier_max_factor, got "
                             f"{self.outlier_min_factor}, {self.outlier_max_factor}")
        if self.conf_err_scale <= 0 or self.depth_smooth_cells < 1:
            raise ValueError("oracle noise needs conf_err_scale > 0 and depth_smooth_cells >= 1")

    @property
    def drift(self) -> dict:
        """The DriftModel keyword arguments."""
        return {name: float(getattr(self, name)) for name in DRIFT_FIELDS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The "realistic" magnitudes (sources and our choices: docs/longrun/README.md; also config/oracle_noise_realistic.yaml)
REALISTIC = OracleNoise(
    scale_per_m=0.003, scale_per_m2=0.0003, yaw_deg_per_m=0.3, yaw_deg_per_m2=0.02, scale_walk=0.002,
    yaw_walk_deg=0.05, tilt_walk_deg=0.05, trans_walk=0.005, jitter_m=0.007, jitter_deg=0.2,
    depth_rel_sigma=0.055, depth_quad_sigma=0.01, depth_smooth=0.5, depth_smooth_cells=8,
    outlier_fraction=0.02, outlier_min_factor=1.15, outlier_max_factor=2.0,
    conf_err_scale=0.1, conf_noise=0.3, conf_min=1.0)


def load_noise(spec: str) -> OracleNoise | None:
    """"none" -> None (the exact oracle); "realistic" -> REALISTIC; a YAML file -> REALISTIC with its keys replaced."""
    if spec == "none":
        return None
    if spec == "realistic":
        return REALISTIC
    import yaml

    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"oracle_noise {spec!r} is not none, realistic or an existing YAML file")
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: expected a mapping of oracle noise magnitudes, got {type(data).__name__}")
    known = {f.name for f in fields(OracleNoise)}
    for key in data:
        if key not in known:
            raise ValueError(f"{spec}: unknown oracle noise key {key!r}; known keys: {', '.join(sorted(known))}")
    try:
        return dataclasses.replace(REALISTIC, **data)
    except ValueError as exc:
        raise ValueError(f"{spec}: {exc}") from None


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) zero-mean, unit-variance smooth random field: a (gh, gw) grid of normal draws, bilinearly upsampled."""
    gw = int(cells) + 1
    gh = max(2, int(round(cells * h / max(w, 1))) + 1)
    grid = rng.standard_normal((gh, gw))
    ys, xs = np.linspace(0, gh - 1, h), np.linspace(0, gw - 1, w)
    rows = np.stack([np.interp(xs, np.arange(gw), grid[i]) for i in range(gh)])  # (gh, w)
    field = np.stack([np.interp(ys, np.arange(gh), rows[:, j]) for j in range(w)], axis=1)  # (h, w)
    field -= field.mean()
    sd = field.std()
    return field / sd if sd > 0 else field


def perturb_depth(depth: np.ndarray, conf: np.ndarray, noise: OracleNoise, rng: np.random.Generator):
    """(noisy depth, confidence, outlier mask) for a depth map (h, w) (0 = invalid) and its exact confidence."""
    depth = np.asarray(depth, np.float64)
    valid = depth > 0
    z = np.where(valid, depth, 0.0)
    h, w = z.shape
    sigma = np.hypot(noise.depth_rel_sigma * z, noise.depth_quad_sigma * z * z)
    n = np.sqrt(1.0 - noise.depth_smooth) * rng.standard_normal((h, w))
    if noise.depth_smooth > 0:
        n += np.sqrt(noise.depth_smooth) * smooth_field(rng, h, w, noise.depth_smooth_cells)
    out = np.maximum(z + sigma * n, 0.05 * z)
    lo, hi = np.log(noise.outlier_min_factor), np.log(noise.outlier_max_factor)
    outlier = valid & (rng.random((h, w)) < noise.outlier_fraction)
    log_factor = rng.uniform(lo, hi, (h, w)) * np.where(rng.random((h, w)) < 0.5, -1.0, 1.0)
    out = np.where(outlier, z * np.exp(log_factor), out)
    rel_err = np.abs(out / np.where(valid, z, 1.0) - 1.0)
    spread = np.exp(noise.conf_noise * rng.standard_normal((h, w)))
    c = np.asarray(conf, np.float64)
    new_conf = noise.conf_min + np.maximum(c - noise.conf_min, 0.0) * np.exp(-rel_err / noise.conf_err_scale) * spread
    new_conf = np.where(valid, np.maximum(new_conf, noise.conf_min), c)
    return np.where(valid, out, 0.0), new_conf, outlier


class NoisyOracleSession(DriftedSession):
    """An exact session (the oracle) with the errors of ``noise`` (module docstring), seeded by ``seed``."""

    def __init__(self, inner, noise: OracleNoise, seed: int = 0):
        super().__init__(inner, seed=seed, **noise.drift)
        self.noise = noise
        self.last_outliers: np.ndarray | None = None  # the last frame's outlier mask (for tests and evaluation)
        self._pixel_rng = np.random.default_rng([self.seed, 0, 77])

    def reset(self) -> None:
        super().reset()
        self._pixel_rng = np.random.default_rng([self.seed, self.resets, 77])

    def perturb(self, depth: np.ndarray, conf: np.ndarray):
        depth, conf, self.last_outliers = perturb_depth(depth, conf, self.noise, self._pixel_rng)
        return depth, conf


def noisy_session(session, spec: str, seed: int = 0):
    """(session, description) for the loader: the session itself for "none", else wrapped in NoisyOracleSession."""
    noise = load_noise(spec)
    if noise is None:
        return session, "exact"
    return NoisyOracleSession(session, noise, seed=seed), f"noise {spec}, seed {seed}"
