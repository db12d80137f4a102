"""2D occupancy grid for Nav2 from 3D points seen by a camera (numpy only; no rclpy).

Per frame (``frame_votes``), with points and the camera position in ``map`` (z up, the floor at ``floor_z``):

- occupied vote: the cell of every point whose height above the floor is in (min_height, max_height];
- free vote: the cell of every floor point (height <= min_height), and every cell crossed by the 2D ray from the
  camera to the centre of an occupied or floor point's cell, stopping one cell width short of that centre (so
  grazing rays do not clear the obstacles next to the one they end on). Points above max_height (ceilings) cast no rays: a ray to the ceiling says nothing about
  the band below it. Points farther than ``max_range`` (horizontally) from the camera are ignored.

A frame votes at most once per cell and class (occupied wins over free within one frame). The grid sums votes over
frames and decides per cell with OctoMap's default sensor model as log-odds: L = 0.85 * occupied - 0.4 * free;
L > 0 -> occupied (100), L < 0 -> free (0), no votes or L == 0 -> unknown (-1). An obstacle seen in half of the
frames that see its cell stays occupied; a point seen once and then crossed by three rays is cleared.

Cells: cell (i, j) covers x in [i r, (i + 1) r), y in [j r, (j + 1) r) of ``map``; ``to_arrays`` returns the
nav_msgs/OccupancyGrid layout: data (height, width) int8 row-major with row 0 at the lowest y, the origin = the
map position of the lower-left corner of cell (0, 0) of the array, yaw 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

L_OCC, L_FREE = 0.85, -0.4  # log-odds of one hit / one miss (OctoMap defaults 0.7 / 0.4)
UNKNOWN, FREE, OCCUPIED = -1, 0, 100


@dataclass(frozen=True)
class OccupancyOptions:
    resolution: float = 0.05  # m per cell
    floor_z: float = 0.0  # floor height in map (m)
    min_height: float = 0.1  # obstacle band above the floor (m): (min_height, max_height]
    max_height: float = 1.5
    max_range: float = 5.0  # horizontal range of votes from the camera (m)

    def __post_init__(self):
        if not (np.isfinite(self.resolution) and self.resolution > 0):
            raise ValueError(f"occupancy resolution must be > 0, got {self.resolution}")
        if not self.max_height > self.min_height:
            raise ValueError(f"occupancy band needs max_height > min_height, got {self.min_height}, {self.max_height}")
        if not self.max_range > 0:
            raise ValueError(f"occupancy max_range must be > 0, got {self.max_range}")


@dataclass
class Votes:
    """One frame's votes on a local window of cells: cell (lo[0] + col, lo[1] + row) of ``map``."""

    lo: np.ndarray  # (2,) int64 cell index (i = x, j = y) of element [0, 0]
    occ: np.ndarray  # (rows, cols) bool
    free: np.ndarray  # (rows, cols) bool, disjoint from occ

    def cells(self, which: str = "occ") -> np.ndarray:
        """(N, 2) int64 cell indices (i, j) of the occupied or free votes."""
        jj, ii = np.nonzero(getattr(self, which))
        return np.stack([ii + self.lo[0], jj + self.lo[1]], axis=1).astype(np.int64)


def frame_votes(points_map: np.ndarray, camera_xyz, opt: OccupancyOptions) -> Votes:
    """Occupied and free votes of one frame (see the module docstring), on a dense window around the camera."""
    p = np.asarray(points_map, np.float64).reshape(-1, 3)
    c = np.asarray(camera_xyz, np.float64).reshape(3)
    r = opt.resolution
    ok = np.isfinite(p).all(axis=1) & (((p[:, 0] - c[0]) ** 2 + (p[:, 1] - c[1]) ** 2) <= opt.max_range**2)
    p = p[ok]
    h = p[:, 2] - opt.floor_z
    band = (h > opt.min_height) & (h <= opt.max_height)
    floor = h <= opt.min_height
    lo = np.floor((c[:2] - opt.max_range) / r).astype(np.int64) - 1
    n = int(np.ceil(2 * opt.max_range / r)) + 3
    ij = np.floor(p[:, :2] / r).astype(np.int64) - lo
    inside = ((ij >= 0) & (ij < n)).all(axis=1)
    band &= inside
    floor &= inside
    occ = np.zeros((n, n), bool)
    occ[ij[band, 1], ij[band, 0]] = True
    free = np.zeros((n, n), bool)
    free[ij[floor, 1], ij[floor, 0]] = True
    tj, ti = np.nonzero(occ | free)
    if ti.size:
        # one ray per target cell (to its centre), sampled every half cell, stopping one cell width short of it
        d = (np.stack([ti, tj], axis=1) + lo + 0.5) * r - c[:2]
        length = np.hypot(d[:, 0], d[:, 1])
        steps = np.maximum(0, np.ceil((length - r) / (0.5 * r)).astype(np.int64))
        total = int(steps.sum())
        if total:
            ray = np.repeat(np.arange(len(steps)), steps)
            k = np.arange(total) - np.repeat(np.cumsum(steps) - steps, steps)
            t = k * (0.5 * r) / np.maximum(length[ray], 1e-12)
            cells = np.floor((c[:2] + d[ray] * t[:, None]) / r).astype(np.int64) - lo
            keep = ((cells >= 0) & (cells < n)).all(axis=1)
            free[cells[keep, 1], cells[keep, 0]] = True
    free &= ~occ
    rows, cols = np.flatnonzero((occ | free).any(axis=1)), np.flatnonzero((occ | free).any(axis=0))
    if rows.size == 0:
        return Votes(lo, np.zeros((0, 0), bool), np.zeros((0, 0), bool))
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return Votes(lo + np.array([cols[0], rows[0]]), occ[sl], free[sl])


class OccupancyGrid:
    """Vote counts on a dense, growing 2D array (see the module docstring). ``add(..., sign=-1)`` removes the
    votes of a frame again (a pose correction re-votes the frames it moved)."""

    def __init__(self, options: OccupancyOptions | None = None):
        self.options = options or OccupancyOptions()
        self.clear()

    def clear(self) -> None:
        self.lo = np.zeros(2, np.int64)  # cell index of array element [0, 0] (i = x, j = y)
        self.occ = np.zeros((0, 0), np.int32)  # indexed [j - lo[1], i - lo[0]] (row = y)
        self.free = np.zeros((0, 0), np.int32)

    def _grow(self, ij: np.ndarray) -> None:
        lo, hi = ij.min(axis=0), ij.max(axis=0) + 1
        if self.occ.size:
            cur_hi = self.lo + np.array([self.occ.shape[1], self.occ.shape[0]])
            if (lo >= self.lo).all() and (hi <= cur_hi).all():
                return
            lo, hi = np.minimum(lo, self.lo), np.maximum(hi, cur_hi)
        margin = 64  # cells; amortises re-allocation as the robot explores
        new_lo, new_hi = lo - margin, hi + margin
        shape = (int(new_hi[1] - new_lo[1]), int(new_hi[0] - new_lo[0]))
        occ, free = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        if self.occ.size:
            oy, ox = int(self.lo[1] - new_lo[1]), int(self.lo[0] - new_lo[0])
            occ[oy:oy + self.occ.shape[0], ox:ox + self.occ.shape[1]] = self.occ
            free[oy:oy + self.free.shape[0], ox:ox + self.free.shape[1]] = self.free
        self.lo, self.occ, self.free = new_lo, occ, free

    def add(self, votes: Votes, sign: int = 1) -> None:
        if votes.occ.size == 0:
            return
        rows, cols = votes.occ.shape
        self._grow(np.stack([votes.lo, votes.lo + np.array([cols - 1, rows - 1])]))
        y, x = int(votes.lo[1] - self.lo[1]), int(votes.lo[0] - self.lo[0])
        self.occ[y:y + rows, x:x + cols] += sign * votes.occ
        self.free[y:y + rows, x:x + cols] += sign * votes.free

    def log_odds(self) -> np.ndarray:
        return L_OCC * self.occ + L_FREE * self.free

    def to_arrays(self, crop: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
        """(data int8 (height, width) with -1/0/100, origin (x, y) of the lower-left corner, resolution)."""
        r = self.options.resolution
        if self.occ.size == 0:
            return np.zeros((0, 0), np.int8), np.zeros(2), r
        seen = (self.occ + self.free) > 0
        lo = self.lo.copy()
        occ, free, L = self.occ, self.free, self.log_odds()
        if crop:
            rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
            if rows.size == 0:
                return np.zeros((0, 0), np.int8), np.zeros(2), r
            sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            seen, L = seen[sl], L[sl]
            lo = lo + np.array([cols[0], rows[0]])
            del occ, free
        data = np.full(seen.shape, UNKNOWN, np.int8)
        data[seen & (L > 0)] = OCCUPIED
        data[seen & (L < 0)] = FREE
        return data, lo.astype(np.float64) * r, r


def grid_msg_fields(data: np.ndarray, origin, resolution: float, frame_id: str = "map") -> dict:
    """The fields of a nav_msgs/OccupancyGrid (info + flat data list order) as plain values."""
    h, w = data.shape
    return {"header": {"frame_id": frame_id},
            "info": {"resolution": float(resolution), "width": int(w), "height": int(h),
                     "origin": {"position": {"x": float(origin[0]), "y": float(origin[1]), "z": 0.0},
                                "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}}},
            "data": np.ascontiguousarray(data, np.int8).reshape(-1)}
