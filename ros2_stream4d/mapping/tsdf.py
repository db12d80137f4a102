"""TSDF volume and mesh on Open3D's tensor VoxelBlockGrid (CPU here, ``device="CUDA:0"`` on a robot).

Depth in: z-depth in metres (map units), NaN or <= 0 = invalid (the confidence mask is applied by the caller by
setting rejected pixels to NaN), rgb uint8, pinhole K of that image, and the camera's pose in ``map``. Mesh out:
vertices (V, 3) float32 in ``map``, triangles (T, 3) int32, vertex colours (V, 3) uint8.

The truncation distance is ``trunc_voxels`` voxels; voxels farther than ``depth_max`` from the camera are not
touched. Open3D integrates a frame into the blocks its depth touches (``compute_unique_block_coordinates``); the
hash map grows by itself when full (block_count is the initial capacity).

``contradicted(points, distance)`` tells which points of another product (the ~/map cloud) the fused surface
contradicts: they lie in space the volume has fused (an allocated block) yet farther than ``distance`` from its
surface; points outside every allocated block (never within depth_max of a camera) are not judged.
``fit(points, distance, pull)`` also moves the points it keeps part of the way to the surface's local plane (the
plane through the SURFACE_PLANE_NEIGHBOURS surface points nearest to their nearest one).

The voxel lattice is shifted by half a voxel from ``map`` (samples at (k + 1/2) voxel_size): a plane lying exactly on
a lattice plane (the floor at z = 0 under a robot's map origin) has sdf exactly 0 at the samples, which marching
cubes turns into holes; shifted, such planes fall midway between samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from ros2_stream4d.mapping.conventions import inverse
from ros2_stream4d.mapping.fusion import pack_voxel_keys

o3c = o3d.core

SURFACE_PLANE_NEIGHBOURS = 20  # surface points (about a voxel apart) a local plane of the fused surface is fitted to


@dataclass(frozen=True)
class SurfaceSnapshot:
    """A TSDF's surface points (map) and its allocated blocks (packed integer block coordinates, sorted), copied out
    of the volume: judging points against them needs neither the volume nor its lock."""

    surface: np.ndarray  # (N, 3) float64
    block_keys: np.ndarray  # (B,) int64, fusion.pack_voxel_keys of the block coordinates, sorted
    block_size: float  # m: voxel_size x block_resolution
    offset: np.ndarray  # the lattice's origin in map

    def allocated(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: each map point lies in an allocated block (fused space)."""
        pts = np.asarray(points, np.float64).reshape(-1, 3)
        if len(pts) == 0 or len(self.block_keys) == 0:
            return np.zeros(len(pts), bool)
        keys = pack_voxel_keys(np.floor((pts - self.offset) / self.block_size).astype(np.int64))
        at = np.minimum(np.searchsorted(self.block_keys, keys), len(self.block_keys) - 1)
        return self.block_keys[at] == keys

    def contradicted(self, points: np.ndarray, distance: float) -> np.ndarray:
        """(N,) bool: the fused surface contradicts the point: it lies in an allocated block and farther than
        ``distance`` (m) from every surface point (spaced about a voxel apart)."""
        return self._nearest(np.asarray(points, np.float64).reshape(-1, 3), distance)[0]

    def _nearest(self, pts: np.ndarray, distance: float, tree: cKDTree | None = None):
        """(contradicted (N,) bool, the index of the nearest surface point of each point in fused space that is not
        contradicted (-1 elsewhere))."""
        judged = self.allocated(pts)
        nearest = np.full(len(pts), -1, np.int64)
        if not judged.any() or len(self.surface) == 0:
            return judged, nearest
        tree = cKDTree(self.surface) if tree is None else tree
        # the bound is exclusive in scipy: a point exactly `distance` away must come back (it is not "farther")
        gap, idx = tree.query(pts[judged], k=1, distance_upper_bound=np.nextafter(distance, np.inf), workers=-1)
        near = gap <= distance
        out = np.zeros(len(pts), bool)
        at = np.flatnonzero(judged)
        out[at] = ~near
        nearest[at[near]] = idx[near]
        return out, nearest

    def local_planes(self, tree: cKDTree | None = None):
        """(centroids (N, 3), unit normals (N, 3)), one per surface point: the plane through its
        SURFACE_PLANE_NEIGHBOURS nearest surface points (their centroid, the direction of least spread). The surface
        points are the voxel edges' zero crossings, each a few mm to cm off the surface; a plane through twenty of
        them is not."""
        n = len(self.surface)
        if n < 3:
            raise ValueError(f"a local plane needs >= 3 surface points, the snapshot has {n}")
        k = min(SURFACE_PLANE_NEIGHBOURS, n)
        tree = cKDTree(self.surface) if tree is None else tree
        centroids, normals = np.empty((n, 3)), np.empty((n, 3))
        for lo in range(0, n, 50_000):  # bounded temporaries: (chunk, k, 3) at a time
            _, idx = tree.query(self.surface[lo:lo + 50_000], k=k, workers=-1)
            nb = self.surface[idx]
            c = nb.mean(axis=1)
            d = nb - c[:, None]
            _, vec = np.linalg.eigh(np.matmul(d.transpose(0, 2, 1), d))
            centroids[lo:lo + len(c)], normals[lo:lo + len(c)] = c, vec[:, :, 0]
        return centroids, normals

    def fit(self, points: np.ndarray, distance: float, pull: float) -> tuple[np.ndarray, np.ndarray]:
        """(keep (N,) bool, points (N, 3) float64): the points the surface does not contradict (as
        ``contradicted``), those it judged moved ``pull`` (0-1) of their distance to the fused surface's local plane
        at their nearest surface point (``local_planes``); points outside fused space are kept where they are, and
        so is every point when the surface has fewer than 3 points (no plane to pull toward).

        Why: a cloud voxel (2 cm) holds the few depth samples that fell in it, each with the frame's depth error; the
        TSDF's surface is the weighted mean of every frame that saw the place. Pulling a point part of the way to it
        averages the two; a pull of 1 puts every point on the TSDF's surface and takes the TSDF's own errors with it
        (docs/longrun/README.md: 0.75 against 1 on the long runs' maps)."""
        if not 0.0 <= pull <= 1.0:
            raise ValueError(f"pull must be in [0, 1], got {pull}")
        pts = np.asarray(points, np.float64).reshape(-1, 3)
        tree = cKDTree(self.surface) if len(self.surface) else None
        contradicted, nearest = self._nearest(pts, distance, tree)
        out = pts.copy()
        at = np.flatnonzero(nearest >= 0)
        if pull > 0 and len(at) and len(self.surface) >= 3:
            centroids, normals = self.local_planes(tree)
            c, nrm = centroids[nearest[at]], normals[nearest[at]]
            off = np.einsum("ni,ni->n", out[at] - c, nrm)
            out[at] -= (pull * off)[:, None] * nrm
        return ~contradicted, out


class TsdfVolume:
    def __init__(self, voxel_size: float = 0.05, trunc_voxels: float = 6.0, depth_max: float = 5.0,
                 block_resolution: int = 8, block_count: int = 20_000, device: str = "CPU:0",
                 min_weight: float = 1.0):
        if not (np.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(f"tsdf voxel_size must be finite and > 0, got {voxel_size}")
        if not trunc_voxels > 0 or not depth_max > 0:
            raise ValueError("trunc_voxels and depth_max must be > 0")
        self.voxel_size, self.trunc_voxels, self.depth_max = float(voxel_size), float(trunc_voxels), float(depth_max)
        self.block_resolution, self.block_count, self.min_weight = int(block_resolution), int(block_count), min_weight
        self.device = o3c.Device(device)
        self.offset = np.full(3, 0.5 * self.voxel_size)  # the lattice's origin in map
        self.reset()

    def reset(self) -> None:
        self.vbg = o3d.t.geometry.VoxelBlockGrid(
            attr_names=("tsdf", "weight", "color"), attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
            attr_channels=((1), (1), (3)), voxel_size=self.voxel_size, block_resolution=self.block_resolution,
            block_count=self.block_count, device=self.device)
        self.frames = 0

    def integrate(self, depth: np.ndarray, rgb: np.ndarray, K: np.ndarray, T_map_cam: np.ndarray) -> bool:
        """Fuse one frame; False when it has no valid depth within depth_max (nothing integrated)."""
        d = np.asarray(depth, np.float32)
        if d.ndim != 2:
            raise ValueError(f"depth must be (h, w), got {d.shape}")
        rgb = np.asarray(rgb)
        if rgb.shape != (*d.shape, 3):
            raise ValueError(f"rgb must be {(*d.shape, 3)}, got {rgb.shape}")
        d = np.where(np.isfinite(d) & (d > 0) & (d <= self.depth_max), d, 0.0).astype(np.float32)
        if not d.any():
            return False
        depth_t = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(d))).to(self.device)
        color_t = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(rgb, np.float32) / 255.0)).to(self.device)
        K_t = o3c.Tensor(np.asarray(K, np.float64))
        T_vol_cam = np.asarray(T_map_cam, np.float64).copy()
        T_vol_cam[:3, 3] -= self.offset
        E_t = o3c.Tensor(inverse(T_vol_cam))  # camera-from-volume extrinsic
        try:
            blocks = self.vbg.compute_unique_block_coordinates(depth_t, K_t, E_t, 1.0, self.depth_max,
                                                               self.trunc_voxels)
        except RuntimeError as exc:
            # Open3D raises (no exception type of its own) when the valid pixels touch no block, e.g. a few
            # stray depths at the range limit: nothing to integrate, like the all-invalid case above
            if "No block is touched" not in str(exc):
                raise
            return False
        self.vbg.integrate(blocks, depth_t, color_t, K_t, K_t, E_t, 1.0, self.depth_max, self.trunc_voxels)
        self.frames += 1
        return True

    def blocks(self) -> int:
        return int(self.vbg.hashmap().size())

    def surface_points(self) -> np.ndarray:
        """(N, 3) float64 points where the fused surface (voxels of weight > min_weight) crosses the voxel edges,
        in map; empty when there is none."""
        if self.frames == 0 or self.blocks() == 0:
            return np.zeros((0, 3))
        try:
            pc = self.vbg.extract_point_cloud(weight_threshold=self.min_weight).cpu()
        except RuntimeError:  # Open3D raises when there is no surface at all
            return np.zeros((0, 3))
        if "positions" not in pc.point:
            return np.zeros((0, 3))
        return pc.point.positions.numpy().astype(np.float64) + self.offset

    def snapshot(self) -> SurfaceSnapshot:
        """The surface points and the allocated blocks, copied (SurfaceSnapshot judges points without the volume)."""
        keys = np.zeros((0, 3), np.int64)
        if self.blocks():
            hm = self.vbg.hashmap()
            keys = hm.key_tensor()[hm.active_buf_indices().to(o3c.int64)].cpu().numpy().astype(np.int64)
        return SurfaceSnapshot(self.surface_points(), np.sort(pack_voxel_keys(keys)),
                               self.voxel_size * self.block_resolution, self.offset.copy())

    def allocated(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: each map point lies in a block the volume has allocated (fused space)."""
        return self.snapshot().allocated(points)

    def contradicted(self, points: np.ndarray, distance: float) -> np.ndarray:
        """(N,) bool: the fused surface contradicts the point (SurfaceSnapshot.contradicted)."""
        return self.snapshot().contradicted(points, distance)

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vertices float32 (V, 3), triangles int32 (T, 3), colours uint8 (V, 3)) of the zero level set."""
        empty = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.uint8))
        if self.frames == 0 or self.blocks() == 0:
            return empty
        try:
            m = self.vbg.extract_triangle_mesh(weight_threshold=self.min_weight).cpu()
        except RuntimeError:  # Open3D raises when there is no surface at all
            return empty
        if "positions" not in m.vertex or m.vertex.positions.shape[0] == 0:
            return empty
        v = (m.vertex.positions.numpy().astype(np.float64) + self.offset).astype(np.float32)
        f = m.triangle.indices.numpy().astype(np.int32) if "indices" in m.triangle else np.zeros((0, 3), np.int32)
        c = m.vertex.colors.numpy() if "colors" in m.vertex else np.zeros_like(v)
        # Open3D's parallel extraction orders vertices and triangles differently from run to run: a canonical order
        # (vertices by position, triangles by their vertex indices) makes the same volume give the same arrays
        order = np.lexsort((v[:, 2], v[:, 1], v[:, 0]))
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        f = rank[f].astype(np.int32)
        if len(f):  # each triangle starts at its smallest index (a rotation keeps its orientation)
            first = np.argmin(f, axis=1)
            f = f[np.arange(len(f))[:, None], (first[:, None] + np.arange(3)) % 3]
        f = f[np.lexsort((f[:, 2], f[:, 1], f[:, 0]))] if len(f) else f
        return v[order], f, np.clip(np.rint(c[order] * 255.0), 0, 255).astype(np.uint8)
