"""Render RGB and exact z-depth of a scene with Open3D's CPU raycasting (Embree).

Pinhole camera, OpenCV conventions: pixel (u, v) = (column, row) has its centre at integer coordinates, and its ray
is K^-1 [u, v, 1] in the camera optical frame (x right, y down, z forward). Because that direction has z = 1, the
ray parameter ``t_hit`` of the hit IS the z-depth. Depth is float32 metres, NaN where a ray hits nothing (sky).

Colour: procedural solid texture at the hit point (textures.py) times Lambert shading under the scene's directional
lights; open scenes get a sky gradient. Output is uint8 RGB. Rendering uses ``nthreads`` Embree threads
(default 1: one core), is deterministic, and reuses the per-resolution ray directions between frames.

Lens distortion: ``Renderer(..., lens=LensModel)`` (mapping/undistort.py) casts, for each pixel centre of the
distorted image, the exact ray of the lens model (``LensModel.unproject``, the inverse of the forward model,
checked by projecting back). That is the pinhole render sampled at each distorted pixel's undistorted position,
but without the interpolation of sampling a discrete render. ``depth`` is then the z-depth of those rays, so it
lies in the distorted geometry; sim bags keep their ground-truth depth pinhole (bag.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import open3d as o3d

from .scenes import Scene
from .textures import lambert

if TYPE_CHECKING:
    from ros2_stream4d.mapping.undistort import LensModel

INVALID_ID = o3d.t.geometry.RaycastingScene.INVALID_ID


@dataclass(frozen=True)
class CameraModel:
    """Pinhole intrinsics (pixels) for an image of width x height."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_hfov(cls, width: int, height: int, hfov_deg: float = 60.0) -> CameraModel:
        """Square pixels, principal point at (W/2, H/2) (the convention the StreamVGGT camera head assumes)."""
        f = (width / 2) / np.tan(np.radians(hfov_deg) / 2)
        return cls(int(width), int(height), float(f), float(f), width / 2, height / 2)

    @classmethod
    def from_K(cls, K, width: int, height: int) -> CameraModel:
        K = np.asarray(K, np.float64)
        return cls(int(width), int(height), float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    def ray_directions(self) -> np.ndarray:
        """(H*W, 3) float32 camera-frame ray directions with z = 1, row-major (v, u)."""
        u, v = np.meshgrid(np.arange(self.width, dtype=np.float64), np.arange(self.height, dtype=np.float64))
        d = np.stack([(u - self.cx) / self.fx, (v - self.cy) / self.fy, np.ones_like(u)], -1)
        return d.reshape(-1, 3).astype(np.float32)

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "fx": self.fx, "fy": self.fy, "cx": self.cx,
                "cy": self.cy}


@dataclass
class RenderedFrame:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres (z-depth), NaN = no hit
    K: np.ndarray  # (3, 3)
    T_world_cam: np.ndarray  # (4, 4) camera-to-world, optical convention
    geometry_ids: np.ndarray | None = None  # (H, W) uint32 part index, INVALID_ID = no hit


def lens_ray_directions(lens: LensModel) -> np.ndarray:
    """(H*W, 3) float32 camera-frame rays (z = 1) through the pixel centres of a (distorted) lens's image,
    row-major (v, u): the exact inverse of its lens model (mapping/undistort.py LensModel.unproject)."""
    u, v = np.meshgrid(np.arange(lens.width, dtype=np.float64), np.arange(lens.height, dtype=np.float64))
    x, y = lens.unproject(u, v)
    return np.stack([x, y, np.ones_like(x)], -1).reshape(-1, 3).astype(np.float32)


class Renderer:
    """Renders one scene with one camera model; call ``render(T_world_cam)`` per frame. With a distorted ``lens``
    (whose K and size are the camera's) images are rendered through that lens (see the module docstring)."""

    def __init__(self, scene: Scene, camera: CameraModel, nthreads: int = 1, lens: LensModel | None = None):
        self.scene, self.camera, self.nthreads = scene, camera, int(nthreads)
        self._rc = scene.raycasting_scene
        if lens is not None and ((lens.width, lens.height) != (camera.width, camera.height)
                                 or not np.allclose(lens.K_matrix, camera.K)):
            raise ValueError(f"lens {lens.width}x{lens.height} K={lens.K} does not match the camera {camera}")
        self.lens = lens if lens is not None and lens.distorted else None
        self._dirs = camera.ray_directions() if self.lens is None else lens_ray_directions(self.lens)
        self._ux = np.ascontiguousarray(self._dirs[:, 0])  # camera-frame ray (ux, uy, 1) per pixel
        self._uy = np.ascontiguousarray(self._dirs[:, 1])
        self._part_texture = scene.part_texture.astype(np.int16)  # small ints: argsort(stable) is a radix sort
        self._lights = scene.lights.astype(np.float32)
        self._intens = scene.light_intensities.astype(np.float32)

    def _world_dirs(self, T: np.ndarray) -> list[np.ndarray]:
        """World ray directions as three 1-D float32 arrays (the camera-frame rays rotated by T)."""
        R = np.asarray(T, np.float64)[:3, :3].astype(np.float32)
        return [self._ux * R[i, 0] + self._uy * R[i, 1] + R[i, 2] for i in range(3)]

    def cast(self, T_world_cam: np.ndarray) -> tuple[dict, list[np.ndarray]]:
        """Raw raycast: (open3d result dict, world ray directions [dx, dy, dz])."""
        d = self._world_dirs(T_world_cam)
        rays = np.empty((len(self._ux), 6), np.float32)
        rays[:, :3] = np.asarray(T_world_cam, np.float64)[:3, 3]
        for i in range(3):
            rays[:, 3 + i] = d[i]
        return self._rc.cast_rays(o3d.core.Tensor.from_numpy(rays), nthreads=self.nthreads), d

    def render_depth(self, T_world_cam: np.ndarray) -> np.ndarray:
        """(H, W) float32 z-depth, NaN where nothing is hit."""
        res, _ = self.cast(T_world_cam)
        return _depth_from_hits(res, self.camera.height, self.camera.width)

    def render(self, T_world_cam: np.ndarray, with_ids: bool = False) -> RenderedFrame:
        cam = self.camera
        res, d = self.cast(T_world_cam)
        t = res["t_hit"].numpy()
        gid = res["geometry_ids"].numpy()
        normals = res["primitive_normals"].numpy()
        hit = gid != INVALID_ID
        idx = None if hit.all() else np.flatnonzero(hit)
        img = np.empty((len(t), 3), np.uint8)
        if idx is None or len(idx):
            if idx is None:
                t_h, g_h, n_h, d_h = t, gid, normals, d
            else:
                t_h, g_h, n_h, d_h = t[idx], gid[idx], normals[idx], [c[idx] for c in d]
            shade = lambert(n_h, d_h, self._lights, self._intens, self.scene.ambient)
            origin = np.asarray(T_world_cam, np.float64)[:3, 3].astype(np.float32)
            xyz = [origin[i] + t_h * d_h[i] for i in range(3)]
            albedo = self._albedo(xyz, self._part_texture[g_h])
            for c in range(3):
                v = albedo[c] * shade
                v *= np.float32(255.0)
                v += np.float32(0.5)
                np.clip(v, 0.0, 255.0, out=v)
                if idx is None:
                    img[:, c] = v.astype(np.uint8)
                else:
                    img[idx, c] = v.astype(np.uint8)
        if idx is not None:
            miss = np.flatnonzero(~hit)
            sky = self._sky([c[miss] for c in d])
            img[miss] = (np.clip(sky, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
        depth = t.copy() if idx is None else np.where(hit, t, np.float32(np.nan)).astype(np.float32)
        return RenderedFrame(img.reshape(cam.height, cam.width, 3), depth.reshape(cam.height, cam.width), cam.K,
                             np.asarray(T_world_cam, np.float64),
                             gid.reshape(cam.height, cam.width) if with_ids else None)

    def _albedo(self, xyz: list[np.ndarray], tex: np.ndarray) -> list[np.ndarray]:
        """Albedo channels at hit points (x, y, z) whose textures are tex (N,) int16: each texture is evaluated
        once on its own hits (grouped by one stable radix sort)."""
        textures = self.scene.textures
        present = np.flatnonzero(np.bincount(tex, minlength=len(textures)))
        if len(present) == 1:
            return textures[present[0]].evaluate_xyz(xyz)
        order = np.argsort(tex, kind="stable")
        bounds = np.searchsorted(tex[order], np.arange(len(textures) + 1))
        out = [np.empty(len(tex), np.float32) for _ in range(3)]
        for k in present:
            sel = order[bounds[k]:bounds[k + 1]]
            channels = textures[k].evaluate_xyz([c[sel] for c in xyz])
            for c in range(3):
                out[c][sel] = channels[c]
        return out

    def _sky(self, dirs: list[np.ndarray]) -> np.ndarray:
        if self.scene.sky is None:
            return np.zeros((len(dirs[0]), 3), np.float32)
        horizon, zenith = (np.asarray(c, np.float32) for c in self.scene.sky)
        norm = np.sqrt(dirs[0] ** 2 + dirs[1] ** 2 + dirs[2] ** 2)
        elev = np.clip(dirs[2] / norm, 0.0, 1.0)[:, None]
        return horizon + (zenith - horizon) * np.sqrt(elev)


def cast_camera_rays(rc: o3d.t.geometry.RaycastingScene, dirs_cam: np.ndarray, T_world_cam: np.ndarray,
                     nthreads: int = 1) -> tuple[dict, np.ndarray]:
    """Cast the camera-frame rays (N, 3) (z = 1) from the pose T_world_cam: (open3d result dict, world dirs)."""
    T = np.asarray(T_world_cam, np.float64)
    dirs = dirs_cam @ T[:3, :3].T.astype(np.float32)
    rays = np.empty((len(dirs), 6), np.float32)
    rays[:, :3] = T[:3, 3]
    rays[:, 3:] = dirs
    return rc.cast_rays(o3d.core.Tensor.from_numpy(rays), nthreads=int(nthreads)), dirs


def _depth_from_hits(res: dict, height: int, width: int) -> np.ndarray:
    t = res["t_hit"].numpy()
    return np.where(np.isfinite(t), t, np.float32(np.nan)).astype(np.float32).reshape(height, width)


def raycast_depth(rc: o3d.t.geometry.RaycastingScene, K: np.ndarray, T_world_cam: np.ndarray, width: int,
                  height: int, nthreads: int = 1) -> np.ndarray:
    """Exact z-depth (H, W) float32 (NaN = no hit) of any triangle scene for intrinsics K and a camera pose."""
    dirs = CameraModel.from_K(K, width, height).ray_directions()
    res, _ = cast_camera_rays(rc, dirs, T_world_cam, nthreads)
    return _depth_from_hits(res, height, width)


def mesh_raycasting_scene(vertices: np.ndarray, triangles: np.ndarray) -> o3d.t.geometry.RaycastingScene:
    """A raycasting scene of one triangle mesh (e.g. a scene.ply from a sim bag)."""
    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(o3d.core.Tensor(np.asarray(vertices, np.float32)),
                     o3d.core.Tensor(np.asarray(triangles, np.uint32)))
    return rc


def unproject(depth: np.ndarray, K: np.ndarray, T_world_cam: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) points from z-depth (integer pixel centres), in the camera frame or, given T_world_cam, in world.
    NaN depth gives NaN points."""
    h, w = depth.shape
    K = np.asarray(K, np.float64)
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    z = depth.astype(np.float64)
    pts = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], -1)
    if T_world_cam is not None:
        T = np.asarray(T_world_cam, np.float64)
        pts = pts @ T[:3, :3].T + T[:3, 3]
    return pts
