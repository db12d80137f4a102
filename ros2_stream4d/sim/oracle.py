"""Oracle backend: ground-truth predictions in the model's streaming output format, for exact-geometry testing.

``OracleSession`` stands in for a model session (``step`` / ``reset``). For each frame (looked up by image stamp)
it returns what a perfect StreamVGGT would return, at the model's input resolution:

    depth              [1, h, w, 1]  z-depth (times ``scale``); 0 where nothing was hit
    depth_conf         [1, h, w]     ``conf_valid`` where valid, 0 elsewhere
    world_points       [1, h, w, 3]  points in the FIRST frame's camera frame since the last reset (x ``scale``)
    world_points_conf  [1, h, w]
    pose_enc           [1, 9]        absT_quaR_FoV of the camera-from-world extrinsic (world = first camera):
                                     translation, quaternion xyzw, fov_h, fov_w (model/geometry.py)
    extrinsic          [1, 3, 4]     camera-from-world, exact
    intrinsic          [1, 3, 3]     K at the model resolution, exact

Resolution: ``mapping`` (mapping/preprocess.py PixelMapping, from the preprocessing of this frame) relates source
pixels to model pixels; K_model = mapping.source_to_model_K(K). With the scene mesh (``scene.ply`` of a sim bag)
depth is re-raycast at the model resolution with K_model, so depth, K and pose are exactly consistent; without it,
the ground-truth depth is resampled (nearest), which is exact only on constant-depth regions. ``mapping=None`` means
the image is at the source resolution (identity). Model pixels on padding are invalid.
All outputs are float32 torch tensors on the device of the input image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ros2_stream4d.mapping.conventions import inverse as inv_se3

from .render import mesh_raycasting_scene, raycast_depth, unproject


class OracleSession:
    """Ground-truth 'model' for a recorded or rendered sequence (see the module docstring).

    stamps (N,) int ns; T_world_cam (N, 4, 4) camera-to-world (optical); K (3, 3) source intrinsics;
    depths (N, H, W) float32 source depth (NaN = none); mesh: (vertices, triangles) for exact re-raycasting.
    """

    def __init__(self, stamps, T_world_cam, K, depths=None, source_hw=None, mesh=None, scale: float = 1.0,
                 conf_valid: float = 100.0, stamp_tolerance_ns: int = 0):
        self.stamps = np.asarray(stamps, np.int64)
        order = np.argsort(self.stamps)
        self.stamps = self.stamps[order]
        self.T_world_cam = np.asarray(T_world_cam, np.float64)[order]
        self.K = np.asarray(K, np.float64)
        self.depths = None if depths is None else np.asarray(depths)[order]
        if source_hw is None:
            if self.depths is None:
                raise ValueError("give source_hw when no depths are given")
            source_hw = self.depths.shape[1:3]
        self.source_hw = (int(source_hw[0]), int(source_hw[1]))
        if self.depths is None and mesh is None:
            raise ValueError("the oracle needs ground-truth depths or the scene mesh")
        self._rc = None if mesh is None else mesh_raycasting_scene(*mesh)
        self.scale = float(scale)
        self.conf_valid = float(conf_valid)
        self.tolerance = int(stamp_tolerance_ns)
        self._T_world_first: np.ndarray | None = None
        self._next = 0
        self._seen = 0
        self.window: int | None = None  # the session protocol (model/session.py): no cache, nothing to shrink
        self.anchors = 1

    @classmethod
    def from_bag(cls, path: str | Path, use_mesh: bool = True, **kwargs) -> OracleSession:
        """From a sim bag written by ``stream4d sim`` (uses its scene.ply when present and use_mesh)."""
        from .bag import read_ground_truth
        from .scenes import load_mesh

        gt = read_ground_truth(path, with_depth=True)
        mesh = load_mesh(gt.mesh_path) if (use_mesh and gt.mesh_path is not None) else None
        return cls(gt.stamps, gt.T_world_cam, gt.K, gt.depths, (gt.height, gt.width), mesh=mesh, **kwargs)

    def __len__(self) -> int:
        return len(self.stamps)

    def reset(self) -> None:
        """The next step defines a new world frame."""
        self._T_world_first = None
        self._seen = 0

    @property
    def frames_seen(self) -> int:
        return self._seen

    def stats(self) -> None:
        return None  # no KV cache

    def shrunk(self, window: int) -> None:
        return None  # nothing to shrink: the oracle holds no cache

    def index(self, stamp_ns: int) -> int:
        i = int(np.searchsorted(self.stamps, stamp_ns))
        best = min((j for j in (i - 1, i) if 0 <= j < len(self.stamps)),
                   key=lambda j: abs(int(self.stamps[j]) - int(stamp_ns)))
        if abs(int(self.stamps[best]) - int(stamp_ns)) > self.tolerance:
            raise KeyError(f"the oracle has no frame at stamp {stamp_ns} ns (tolerance {self.tolerance} ns)")
        return best

    def frame_arrays(self, i: int, model_hw=None, mapping=None) -> dict:
        """numpy outputs for frame i (no batch dims), relative to the current first frame."""
        T_wc = self.T_world_cam[i]
        if self._T_world_first is None:
            self._T_world_first = T_wc.copy()
        if mapping is None:
            if model_hw is not None and tuple(model_hw) != self.source_hw:
                raise ValueError(f"image is {tuple(model_hw)} but the source is {self.source_hw}: pass the "
                                 "preprocessing PixelMapping")
            h, w = self.source_hw
            K = self.K.copy()
            depth = self.depths[i] if self.depths is not None else raycast_depth(self._rc, K, T_wc, w, h)
            valid = np.ones((h, w), bool)
        else:
            if tuple(mapping.source_hw) != self.source_hw:
                raise ValueError(f"mapping source size {mapping.source_hw} != ground truth {self.source_hw}")
            h, w = mapping.model_hw
            K = mapping.source_to_model_K(self.K)
            if self._rc is not None:
                depth = raycast_depth(self._rc, K, T_wc, w, h)
            else:
                depth = mapping.resample_to_model(self.depths[i].astype(np.float32), fill=np.nan)
            valid = mapping.valid_model_mask()
        valid = valid & np.isfinite(depth) & (depth > 0)
        depth = np.where(valid, depth, 0.0)
        T_first_cam = inv_se3(self._T_world_first) @ T_wc
        points = unproject(depth, K, T_first_cam)  # first-camera frame
        points[~valid] = 0.0
        extrinsic = inv_se3(T_first_cam)[:3, :]
        s = self.scale
        extrinsic[:, 3] *= s
        conf = np.where(valid, self.conf_valid, 0.0)
        return {"depth": depth * s, "depth_conf": conf, "world_points": points * s, "world_points_conf": conf,
                "extrinsic": extrinsic, "intrinsic": K, "valid": valid}

    def step(self, image: torch.Tensor | None = None, stamp_ns: int | None = None, mapping=None) -> dict:
        """One streaming step. image [1, 3, h, w] (only its size and device are used); stamp_ns selects the frame
        (None: the frame after the previous one)."""
        i = self._next if stamp_ns is None else self.index(stamp_ns)
        if i >= len(self):
            raise IndexError("the oracle sequence is exhausted")
        self._next = i + 1
        self._seen += 1
        model_hw = None if image is None else tuple(image.shape[-2:])
        if mapping is not None and model_hw is not None and tuple(mapping.model_hw) != model_hw:
            raise ValueError(f"image is {model_hw} but the mapping's model size is {mapping.model_hw}")
        a = self.frame_arrays(i, model_hw, mapping)
        device = image.device if image is not None else torch.device("cpu")

        def t(x):
            return torch.as_tensor(np.asarray(x, np.float32), device=device)[None]

        h, w = a["depth"].shape
        out = {"depth": t(a["depth"][..., None]), "depth_conf": t(a["depth_conf"]),
               "world_points": t(a["world_points"]), "world_points_conf": t(a["world_points_conf"]),
               "extrinsic": t(a["extrinsic"]), "intrinsic": t(a["intrinsic"])}
        out["pose_enc"] = pose_encoding(a["extrinsic"], a["intrinsic"], (h, w)).to(device)[None]
        return out


def pose_encoding(extrinsic: np.ndarray, K: np.ndarray, hw) -> torch.Tensor:
    """absT_quaR_FoV [9] (float32) via model/geometry.py (translation, quaternion xyzw, fov_h, fov_w)."""
    from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding

    enc = extri_intri_to_pose_encoding(torch.as_tensor(extrinsic, dtype=torch.float64),
                                       torch.as_tensor(K, dtype=torch.float64), hw)
    return enc.float()
