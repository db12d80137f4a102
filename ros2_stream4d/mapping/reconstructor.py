"""The streaming reconstructor: decoded frame -> FramePrediction (depth, confidence, world points, pose, K).

World frame = the first camera's optical frame (x right, y down, z forward), as the model defines it. Everything in
a FramePrediction is in the MODEL pixel geometry; helpers return depth/confidence/K in the source camera's geometry.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ros2_stream4d.mapping.conventions import extrinsic_to_pose, inverse, transform_points, unproject_depth
from ros2_stream4d.mapping.preprocess import PixelMapping, Preprocessor
from ros2_stream4d.model.session import StreamingSession

INTRINSICS = ("model", "camera_info")
POINTS_SOURCES = ("depth", "point_head")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class FramePrediction:
    stamp_ns: int
    depth: np.ndarray  # (h, w) float32 z-depth, model geometry, model units (times `scale`)
    depth_conf: np.ndarray  # (h, w) float32
    points_world: np.ndarray  # (h, w, 3) float32, world = first camera's optical frame
    points_conf: np.ndarray  # (h, w) float32
    T_world_cam: np.ndarray  # (4, 4) float64, world-from-camera (camera optical frame)
    K_model: np.ndarray  # (3, 3) float64 intrinsics of the model image
    mapping: PixelMapping
    rgb_model: np.ndarray  # (h, w, 3) uint8, the image the model saw (padding is white)
    # "model" (pose head FoV) | "camera_info" | "session" (exact, e.g. the oracle) | "fallback" (nominal_K)
    intrinsics_source: str = "model"
    scale: float = 1.0  # the metric scale already applied (1.0 = model units)
    descriptor: np.ndarray | None = None  # (D,) float32 place descriptor of a learned model (session "descriptor")

    @property
    def model_hw(self) -> tuple[int, int]:
        return self.mapping.model_hw

    @property
    def T_cam_world(self) -> np.ndarray:
        return inverse(self.T_world_cam)

    @property
    def K_source(self) -> np.ndarray:
        return self.mapping.model_to_source_K(self.K_model)

    def valid_mask(self) -> np.ndarray:
        """Model pixels with a usable prediction: on the camera image (not padding), finite, positive depth."""
        return self.mapping.valid_model_mask() & np.isfinite(self.depth) & (self.depth > 0) & np.isfinite(
            self.points_world
        ).all(axis=-1)

    def depth_source(self) -> np.ndarray:
        """Depth in the source camera geometry, NaN where the model saw nothing or predicted nothing usable."""
        return self.mapping.resample_to_source(np.where(self.valid_mask(), self.depth, np.nan).astype(np.float32))

    def depth_conf_source(self) -> np.ndarray:
        return self.mapping.resample_to_source(np.where(self.valid_mask(), self.depth_conf, np.nan).astype(np.float32))

    def points_camera(self) -> np.ndarray:
        """(h, w, 3) float32 points in the camera optical frame."""
        return transform_points(self.T_cam_world, self.points_world)

    def scaled(self, s: float) -> FramePrediction:
        """The same prediction with lengths multiplied by s (depth, points, translation); K is unchanged."""
        if not (np.isfinite(s) and s > 0):
            raise ValueError(f"scale must be finite and positive, got {s}")
        T = self.T_world_cam.copy()
        T[:3, 3] *= s
        return dataclasses.replace(
            self, depth=self.depth * np.float32(s), points_world=self.points_world * np.float32(s), T_world_cam=T,
            scale=self.scale * s,
        )


@dataclass
class ReconstructorStats:
    frames: int = 0
    last_s: dict[str, float] = field(default_factory=lambda: {"preprocess": 0.0, "model": 0.0, "postprocess": 0.0})
    total_s: dict[str, float] = field(default_factory=lambda: {"preprocess": 0.0, "model": 0.0, "postprocess": 0.0})
    fallback_intrinsics: int = 0  # frames whose model intrinsics were unusable (see nominal_K)

    def mean_s(self) -> dict[str, float]:
        return {k: v / max(1, self.frames) for k, v in self.total_s.items()}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


class StreamingReconstructor:
    """Runs one stream: each ``step`` feeds a frame to the session and returns its FramePrediction.

    session: a model/session.StreamingSession; every step passes the image, its stamp and its pixel mapping.
    intrinsics: "model" = from the pose encoding's field of view; "camera_info" = ``source_to_model_K(K_src)``
        when ``step`` gets K_src (otherwise the model's). Exact "extrinsic"/"intrinsic" outputs of a session
        (the oracle) take precedence over the pose encoding.
    points_source: "depth" = unproject depth with K and the pose (consistent with the published depth and TF);
        "point_head" = the point head's world points.
    """

    def __init__(self, session: StreamingSession, preprocessor: Preprocessor | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, intrinsics: str = "model", points_source: str = "depth"):
        if not isinstance(session, StreamingSession):
            raise TypeError(f"{type(session).__name__} does not implement the StreamingSession protocol "
                            "(model/session.py: window, anchors, frames_seen, step, reset, stats, shrunk)")
        if intrinsics not in INTRINSICS:
            raise ValueError(f"intrinsics must be one of {INTRINSICS}, got {intrinsics!r}")
        if points_source not in POINTS_SOURCES:
            raise ValueError(f"points_source must be one of {POINTS_SOURCES}, got {points_source!r}")
        self.session = session
        self.preprocessor = preprocessor or Preprocessor()
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.intrinsics = intrinsics
        self.points_source = points_source
        self.stats = ReconstructorStats()
        self._model_hw: tuple[int, int] | None = None

    def reset(self) -> None:
        """Start a new stream: the next frame defines a new world frame."""
        self.session.reset()
        self.stats = ReconstructorStats()
        self._model_hw = None

    def step(self, rgb: np.ndarray, stamp_ns: int, K_src=None) -> FramePrediction:
        t0 = time.perf_counter()
        image, mapping = self.preprocessor.prepare(rgb)
        if self._model_hw is not None and mapping.model_hw != self._model_hw:
            # the KV cache holds a fixed number of tokens per frame: a new geometry needs a new stream
            raise ValueError(
                f"model input size changed from {self._model_hw} to {mapping.model_hw} mid-stream (camera resolution "
                "changed?); call reset() first, or fix the size with Preprocessor(height=...)"
            )
        K_cam = None if K_src is None else mapping.source_to_model_K(K_src)
        batch = image[None].to(self.device, self.dtype)
        t1 = time.perf_counter()

        with torch.inference_mode():
            out = self.session.step(batch, stamp_ns=int(stamp_ns), mapping=mapping)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()

        pred = self._postprocess(out, image, mapping, int(stamp_ns), K_cam)
        self._model_hw = mapping.model_hw
        t3 = time.perf_counter()
        self._record(t1 - t0, t2 - t1, t3 - t2)
        return pred

    def _postprocess(self, out, image, mapping: PixelMapping, stamp_ns: int, K_cam) -> FramePrediction:
        if not isinstance(out, dict):
            raise TypeError(f"session.step must return a dict, got {type(out).__name__}")
        hw = mapping.model_hw
        depth = _frame(out, "depth", hw, trailing=(1,), squeeze_last=True)
        depth_conf = _frame(out, "depth_conf", hw)

        if "extrinsic" in out and "intrinsic" in out:
            extrinsic = _numpy(out["extrinsic"])[0]
            K = _numpy(out["intrinsic"])[0].astype(np.float64)
            source = "session"
        else:
            if "pose_enc" not in out:
                raise KeyError("session output has neither 'pose_enc' nor 'extrinsic'/'intrinsic'")
            from ros2_stream4d.model.geometry import pose_encoding_to_extri_intri

            pose_enc = out["pose_enc"].detach().float().cpu()
            extrinsic, K = pose_encoding_to_extri_intri(pose_enc, hw)
            extrinsic, K = _numpy(extrinsic).reshape(-1, 3, 4)[0], _numpy(K).reshape(-1, 3, 3)[0].astype(np.float64)
            source = "model"
        if self.intrinsics == "camera_info" and K_cam is not None:
            K, source = K_cam, "camera_info"
        elif not usable_K(K):
            # e.g. a zero field of view from an untrained model (the FoV activation is a ReLU)
            K, source = (K_cam, "camera_info") if K_cam is not None else (nominal_K(hw), "fallback")
            self.stats.fallback_intrinsics += 1
        if not np.all(np.isfinite(extrinsic)):
            raise RuntimeError(f"the model returned a non-finite pose for the frame at {stamp_ns} ns")
        T_world_cam = extrinsic_to_pose(extrinsic)

        if self.points_source == "depth":
            points = unproject_depth(depth, K, T_world_cam)
            points_conf = depth_conf
        else:
            points = _frame(out, "world_points", hw, trailing=(3,))
            points_conf = _frame(out, "world_points_conf", hw)
        rgb = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        descriptor = _numpy(out["descriptor"])[0].astype(np.float32).reshape(-1) if "descriptor" in out else None
        return FramePrediction(stamp_ns, depth, depth_conf, points, points_conf, T_world_cam, K, mapping, rgb, source,
                               descriptor=descriptor)

    def _record(self, *times: float) -> None:
        self.stats.frames += 1
        for key, t in zip(("preprocess", "model", "postprocess"), times):
            self.stats.last_s[key] = t
            self.stats.total_s[key] += t


NOMINAL_HFOV_DEG = 60.0


def nominal_K(hw, hfov_deg: float = NOMINAL_HFOV_DEG) -> np.ndarray:
    """Square-pixel intrinsics with the given horizontal field of view, principal point at (W/2, H/2) like the
    model's own intrinsics: the stand-in when the model's are unusable and no CameraInfo is available."""
    h, w = hw
    f = (w / 2.0) / np.tan(np.deg2rad(hfov_deg) / 2.0)
    return np.array([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]])


def usable_K(K: np.ndarray) -> bool:  # noqa: N802  (K: the intrinsics matrix)
    return bool(np.all(np.isfinite(K)) and K[0, 0] > 0 and K[1, 1] > 0 and abs(np.linalg.det(K)) > 0)


def _numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def _frame(out: dict, key: str, hw, trailing=(), squeeze_last=False) -> np.ndarray:
    """out[key][0] as float32 numpy, checked against the model geometry (h, w) + trailing."""
    if key not in out:
        raise KeyError(f"session output lacks {key!r} (has {sorted(out)})")
    a = _numpy(out[key])
    expect = (*hw, *trailing)
    if a.shape == expect or (squeeze_last and a.shape == tuple(hw)):  # unbatched output
        a = a[None]
    if a.shape[1:] != expect and not (squeeze_last and a.shape[1:] == tuple(hw)):
        raise ValueError(f"session output {key!r} has shape {a.shape}, expected [B, {', '.join(map(str, expect))}]")
    a = a[0]
    if squeeze_last and a.ndim == 3:
        a = a[..., 0]
    return np.ascontiguousarray(a, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- backends
RANDOM_SMALL = "random-small"


def model_card_dirs() -> list[Path]:
    """Where model cards (YAML) live: the source tree's model/ folder, then the installed share/ros2_stream4d/model."""
    dirs = [Path(__file__).resolve().parents[2] / "model"]
    try:
        from ament_index_python.packages import get_package_share_directory

        dirs.append(Path(get_package_share_directory("ros2_stream4d")) / "model")
    except Exception:  # ament is optional; any failure means "not installed as a ROS package"
        pass
    return [d for d in dirs if d.is_dir()]


def resolve_model_spec(model_spec: str) -> tuple[str, Path | None]:
    """("random", None) | ("card", path to YAML) | ("checkpoint", path). Clear error when nothing matches."""
    spec = str(model_spec).strip()
    if spec == RANDOM_SMALL:
        return "random", None
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        return "card", path
    if path.is_file():
        return "checkpoint", path
    for d in model_card_dirs():
        for name in (spec, f"{spec}.yaml", f"{spec}.yml"):
            if (d / name).is_file():
                return "card", d / name
    searched = ", ".join(str(d) for d in model_card_dirs()) or "(no model/ folder found)"
    raise FileNotFoundError(
        f"model {spec!r} is neither {RANDOM_SMALL!r}, a checkpoint file nor a model card in {searched}"
    )


class ModelBackendFactory:
    """Builds StreamVGGT sessions from a model spec. Checkpoint reading lives in ros2_stream4d.model.checkpoint
    (``load_checkpoint``); this only resolves what to load.

    Model card (YAML in the package's model/ folder, or any path):
        name: streamvggt-small        # informative
        config: {preset: small, ...}  # optional: ModelConfig fields; preset "small" = ModelConfig.small(**rest)
        weights: file.safetensors     # relative to the card; or a known hub name ("streamvggt"); absent = random
        seed: 0                       # random init seed when there are no weights
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 window: int | None = 16, anchors: int = 1, backend: str = "sdpa", allow_download: bool = False):
        self.device, self.dtype = torch.device(device), parse_dtype(dtype)
        self.window, self.anchors, self.backend = window, int(anchors), backend
        self.allow_download = allow_download  # only ever True when the user said so

    def load_model(self, model_spec: str):
        kind, path = resolve_model_spec(model_spec)
        if kind == "random":
            return self._random(_model_config({"preset": "small"}), seed=0)
        if kind == "checkpoint":
            return self._load(path, cfg=None)
        card = _read_card(path)
        if (card.get("config") or {}).get("kind") == "stream4d-small":  # the embedded default (model/small.py)
            from ros2_stream4d.model.small import from_card

            return from_card(card, path.parent, self.device)
        cfg = _model_config(card["config"]) if card.get("config") else None
        weights = card.get("weights")
        if not weights:
            if cfg is None:
                raise ValueError(f"model card {path} has neither weights nor config")
            return self._random(cfg, seed=int(card.get("seed", 0)))
        from ros2_stream4d.model.hub import resolve_checkpoint

        local = (path.parent / str(weights)).expanduser()
        return self._load(local if local.is_file()
                          else resolve_checkpoint(str(weights), allow_download=self.allow_download), cfg)

    def _random(self, cfg, seed: int):
        from ros2_stream4d.model.streamvggt import StreamVGGT

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = StreamVGGT(cfg)
        return model.set_attention_backend(self.backend).to(self.device).eval()

    def _load(self, path: Path, cfg):
        from ros2_stream4d.model.checkpoint import load_checkpoint

        model, _report = load_checkpoint(path, cfg=cfg, device=self.device, dtype=self.dtype)
        return model.set_attention_backend(self.backend).eval()

    def build_session(self, model_spec: str):
        return self.load_model(model_spec).stream(window=self.window, anchors=self.anchors)


def _read_card(path: Path) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        card = yaml.safe_load(f)
    if not isinstance(card, dict):
        raise ValueError(f"model card {path} must be a YAML mapping, got {type(card).__name__}")
    # input_width: the width the model was trained at; training/metrics: informative (written by `stream4d train`)
    unknown = set(card) - {"name", "description", "config", "weights", "seed", "license", "source", "input_width",
                           "training", "metrics"}
    if unknown:
        raise ValueError(f"model card {path} has unknown keys {sorted(unknown)}")
    return card


def model_input_width(model_spec: str, default: int = 518) -> int:
    """The input width a model card declares (``input_width``), else ``default`` (checkpoints, random-small)."""
    try:
        kind, path = resolve_model_spec(model_spec)
    except FileNotFoundError:
        return default
    if kind != "card":
        return default
    return int(_read_card(path).get("input_width", default))


def _model_config(d: dict):
    from ros2_stream4d.model.config import ModelConfig

    d = dict(d)
    preset = d.pop("preset", None)
    if preset is None:
        return ModelConfig.from_dict(d)
    if preset != "small":
        raise ValueError(f"unknown model config preset {preset!r} (known: 'small')")
    return ModelConfig.small(**d)


def build_session(model_spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                  window: int | None = 16, anchors: int = 1, backend: str = "sdpa", allow_download: bool = False):
    """A streaming session for ``model_spec`` (model card name or path, checkpoint path, or "random-small").
    dtype = the aggregator's weight dtype (heads stay fp32); on CUDA the model also autocasts to bf16 itself."""
    return ModelBackendFactory(device, dtype, window, anchors, backend, allow_download).build_session(model_spec)
