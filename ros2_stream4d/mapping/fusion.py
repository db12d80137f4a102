"""Bounded global map: a voxel hash fusing per-frame clouds (vectorised numpy).

Each occupied voxel keeps the running mean position and colour of the points that fell in it, their count, the
max and mean confidence, and when it was last observed. Voxels live in arrays sorted by an int64 key packing the
integer voxel coordinates (21 bits each, signed), so a frame merges with one ``searchsorted``.
"""

from __future__ import annotations

import numpy as np

_BITS = 21
_OFFSET = 1 << (_BITS - 1)  # voxel coordinates in [-2^20, 2^20) (about +-52 km at 5 cm voxels)
_MASK = (1 << _BITS) - 1
EVICTION = ("oldest", "lowest_confidence")


def pack_voxel_keys(ijk: np.ndarray) -> np.ndarray:
    """(N, 3) int64 voxel coordinates in [-2^20, 2^20) -> (N,) int64 keys; the order of keys is lexicographic."""
    u = ijk.astype(np.int64) + _OFFSET
    return (u[:, 0] << (2 * _BITS)) | (u[:, 1] << _BITS) | u[:, 2]


def unpack_voxel_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    return np.stack([(keys >> (2 * _BITS)) & _MASK, (keys >> _BITS) & _MASK, keys & _MASK], axis=1) - _OFFSET


class VoxelMap:
    """Voxel-downsampled map holding at most ``max_points`` voxels.

    max_range: points farther than this from the sensor ``origin`` passed to ``integrate`` are ignored (far
        predictions are the least accurate). None = no limit.
    eviction: when over ``max_points`` after a frame, drop the voxels observed longest ago ("oldest"; ties: lowest
        max confidence first) or the least confident ("lowest_confidence"; ties: oldest first).
    """

    def __init__(self, voxel_size: float, max_points: int, max_range: float | None = None, eviction: str = "oldest"):
        if not (np.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(f"voxel_size must be finite and > 0, got {voxel_size}")
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        if max_range is not None and not max_range > 0:
            raise ValueError(f"max_range must be > 0 or None, got {max_range}")
        if eviction not in EVICTION:
            raise ValueError(f"eviction must be one of {EVICTION}, got {eviction!r}")
        self.voxel_size, self.max_points, self.max_range, self.eviction = (
            float(voxel_size), int(max_points), max_range, eviction)
        self.clear()

    def clear(self) -> None:
        self.keys = np.empty(0, np.int64)
        self.sum_xyz = np.empty((0, 3), np.float64)
        self.sum_rgb = np.empty((0, 3), np.float64)
        self.count = np.empty(0, np.int64)
        self.conf_max = np.empty(0, np.float32)
        self.conf_sum = np.empty(0, np.float64)
        self.last_seen = np.empty(0, np.int64)
        self.frames = 0  # integrate() calls so far; also the observation clock
        self.evicted = 0
        self.dropped = 0  # points rejected: non-finite, out of range or outside the key space

    def __len__(self) -> int:
        return int(self.keys.size)

    def integrate(self, xyz, rgb, conf=None, origin=None) -> int:
        """Fuse one cloud (N, 3) float, (N, 3) uint8, (N,) float or None (= 1). Returns the number of new voxels."""
        xyz = np.asarray(xyz, dtype=np.float64)
        rgb = np.asarray(rgb)
        n = xyz.shape[0] if xyz.ndim == 2 else -1
        if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != (n, 3):
            raise ValueError(f"need xyz (N, 3) and rgb (N, 3), got {xyz.shape} and {rgb.shape}")
        conf = np.ones(n, np.float64) if conf is None else np.asarray(conf, dtype=np.float64)
        if conf.shape != (n,):
            raise ValueError(f"conf must have shape ({n},), got {conf.shape}")
        self.frames += 1
        ok = np.isfinite(xyz).all(axis=1) & np.isfinite(conf)
        if self.max_range is not None:
            o = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64).reshape(3)
            ok &= ((xyz - o) ** 2).sum(axis=1) <= self.max_range**2
        ijk = np.floor(xyz / self.voxel_size)
        ok &= (np.abs(ijk + 0.5) < _OFFSET).all(axis=1)
        self.dropped += int(n - ok.sum())
        if not ok.any():
            return 0
        xyz, rgb, conf, ijk = xyz[ok], rgb[ok].astype(np.float64), conf[ok], ijk[ok]

        ukeys, inv = np.unique(pack_voxel_keys(ijk), return_inverse=True)
        m = ukeys.size
        f_count = np.bincount(inv, minlength=m)
        f_xyz = np.stack([np.bincount(inv, xyz[:, i], m) for i in range(3)], axis=1)
        f_rgb = np.stack([np.bincount(inv, rgb[:, i], m) for i in range(3)], axis=1)
        f_csum = np.bincount(inv, conf, m)
        f_cmax = np.full(m, -np.inf)
        np.maximum.at(f_cmax, inv, conf)

        pos = np.searchsorted(self.keys, ukeys)
        found = pos < self.keys.size
        found[found] = self.keys[pos[found]] == ukeys[found]
        p = pos[found]
        self.sum_xyz[p] += f_xyz[found]
        self.sum_rgb[p] += f_rgb[found]
        self.count[p] += f_count[found]
        self.conf_sum[p] += f_csum[found]
        self.conf_max[p] = np.maximum(self.conf_max[p], f_cmax[found])
        self.last_seen[p] = self.frames

        new = ~found
        at = pos[new]  # insertion points into the sorted arrays keep them sorted
        self.keys = np.insert(self.keys, at, ukeys[new])
        self.sum_xyz = np.insert(self.sum_xyz, at, f_xyz[new], axis=0)
        self.sum_rgb = np.insert(self.sum_rgb, at, f_rgb[new], axis=0)
        self.count = np.insert(self.count, at, f_count[new])
        self.conf_sum = np.insert(self.conf_sum, at, f_csum[new])
        self.conf_max = np.insert(self.conf_max, at, f_cmax[new].astype(np.float32))
        self.last_seen = np.insert(self.last_seen, at, self.frames)
        self._evict()
        return int(new.sum())

    def _evict(self) -> None:
        k = self.keys.size - self.max_points
        if k <= 0:
            return
        primary, secondary = (self.last_seen, self.conf_max) if self.eviction == "oldest" else (
            self.conf_max, self.last_seen)
        # Only voxels at or below the k-th smallest primary value can be evicted: sort just those.
        kth = np.partition(primary, k - 1)[k - 1]
        cand = np.flatnonzero(primary <= kth)
        order = np.lexsort((self.keys[cand], secondary[cand], primary[cand]))
        keep = np.ones(self.keys.size, bool)
        keep[cand[order[:k]]] = False
        for name in ("keys", "sum_xyz", "sum_rgb", "count", "conf_max", "conf_sum", "last_seen"):
            setattr(self, name, getattr(self, name)[keep])
        self.evicted += k

    def points(self, conf: str = "max", min_count: int = 1):
        """(xyz float32 (M, 3) voxel means, rgb uint8 (M, 3) mean colours, conf float32 (M,) max or mean)."""
        if conf not in ("max", "mean"):
            raise ValueError(f"conf must be 'max' or 'mean', got {conf!r}")
        sel = self.count >= min_count
        c = self.count[sel, None].astype(np.float64)
        xyz = (self.sum_xyz[sel] / c).astype(np.float32)
        rgb = np.clip(np.rint(self.sum_rgb[sel] / c), 0, 255).astype(np.uint8)
        cf = self.conf_max[sel] if conf == "max" else (self.conf_sum[sel] / c[:, 0]).astype(np.float32)
        return xyz, rgb, cf.astype(np.float32)

    def voxel_indices(self) -> np.ndarray:
        """(M, 3) int64 integer voxel coordinates of the stored voxels (in ``points()`` order)."""
        return unpack_voxel_keys(self.keys)
