"""2D occupancy grid for Nav2 from 3D points seen by a camera (numpy only; no rclpy).

The obstacle band above the floor, heights in (min_height, max_height], is cut into slabs of ``slab_height``; each
cell keeps votes per slab, so evidence is only compared at the height it was gathered: the floor seen under a
table (rays passing below the table top) does not clear the table top, which the 2D grid must show as an obstacle.

Per frame (``frame_votes``), with points and the camera position in ``map`` (z up, the floor at ``floor_z``):

- occupied vote: the (cell, slab) of every point whose height above the floor is in the band;
- floor vote: the cell of every floor point (height <= min_height);
- free vote: every (cell, slab) a 3D ray from the camera to an occupied (cell, slab) centre or a floor cell's centre
  passes through, sampled every cell length, stopping one cell width (horizontally) short of its end (so grazing rays
  do not clear the obstacles next to the one they end on). Points above max_height (ceilings) cast no rays; points
  farther than ``max_range`` (horizontally) from the camera are ignored. Only the farthest end per azimuth bin (one
  cell wide at max_range) and end slab casts a ray: the nearer ends in that direction lie on or beside it.

A frame votes at most once per (cell, slab) and class; occupied wins over free within a frame. The grid sums votes
over frames and decides each slab with OctoMap's default sensor model as log-odds: L = 0.85 occupied - 0.4 free.
A cell is occupied (100) when any of its slabs has L > 0; free (0) when none has, and it has free votes or a floor
vote; unknown (-1) when it has no votes. So an obstacle seen in half of the frames that see its slab stays
occupied; a point seen once and crossed by three rays at its height is cleared.

Cells: cell (i, j) covers x in [i r, (i + 1) r), y in [j r, (j + 1) r) of ``map``; ``to_arrays`` returns the
nav_msgs/OccupancyGrid layout: data (height, width) int8 row-major with row 0 at the lowest y, the origin = the
map position of the lower-left corner of cell (0, 0) of the array, yaw 0. Memory: (2 x slabs + 1) int32 per cell
of the bounding rectangle (7 slabs: 60 B per cell, 24 MB for 20 m x 20 m at 5 cm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

L_OCC, L_FREE = 0.85, -0.4  # log-odds of one hit / one miss (OctoMap defaults 0.7 / 0.4)
UNKNOWN, FREE, OCCUPIED = -1, 0, 100
RAY_STEP = 1.0  # ray samples every cell length (a diagonal may skip a corner-touched cell)


@dataclass(frozen=True)
class OccupancyOptions:
    resolution: float = 0.05  # m per cell
    floor_z: float = 0.0  # floor height in map (m)
    min_height: float = 0.1  # obstacle band above the floor (m): (min_height, max_height]
    max_height: float = 1.5
    max_range: float = 5.0  # horizontal range of votes from the camera (m)
    slab_height: float = 0.2  # m: height resolution of the evidence inside the band

    def __post_init__(self):
        if not (np.isfinite(self.resolution) and self.resolution > 0):
            raise ValueError(f"occupancy resolution must be > 0, got {self.resolution}")
        if not self.max_height > self.min_height:
            raise ValueError(f"occupancy band needs max_height > min_height, got {self.min_height}, {self.max_height}")
        if not self.max_range > 0:
            raise ValueError(f"occupancy max_range must be > 0, got {self.max_range}")
        if not self.slab_height > 0:
            raise ValueError(f"occupancy slab_height must be > 0, got {self.slab_height}")

    @property
    def slabs(self) -> int:
        return max(1, int(np.ceil((self.max_height - self.min_height) / self.slab_height - 1e-9)))

    def slab_of(self, height: np.ndarray) -> np.ndarray:
        """Slab index of heights above the floor inside the band."""
        s = np.ceil((height - self.min_height) / self.slab_height).astype(np.int64) - 1
        return np.clip(s, 0, self.slabs - 1)


@dataclass
class Votes:
    """One frame's votes on a local window of cells: cell (lo[0] + col, lo[1] + row) of ``map``."""

    lo: np.ndarray  # (2,) int64 cell index (i = x, j = y) of element [.., 0, 0]
    occ: np.ndarray  # (slabs, rows, cols) bool
    free: np.ndarray  # (slabs, rows, cols) bool, disjoint from occ
    floor: np.ndarray  # (rows, cols) bool

    def cells(self, which: str = "occ") -> np.ndarray:
        """(N, 2) int64 cell indices (i, j) with any vote of a class: "occ", "free" (free slab or floor), "any"."""
        if which == "occ":
            m = self.occ.any(axis=0)
        elif which == "free":
            m = (self.free.any(axis=0) | self.floor) & ~self.occ.any(axis=0)
        else:
            m = self.occ.any(axis=0) | self.free.any(axis=0) | self.floor
        jj, ii = np.nonzero(m)
        return np.stack([ii + self.lo[0], jj + self.lo[1]], axis=1).astype(np.int64)


def frame_votes(points_map: np.ndarray, camera_xyz, opt: OccupancyOptions) -> Votes:
    """Occupied, free and floor votes of one frame (see the module docstring), on a window around the camera."""
    p = np.asarray(points_map, np.float64).reshape(-1, 3)
    c = np.asarray(camera_xyz, np.float64).reshape(3)
    r, S = opt.resolution, opt.slabs
    ok = np.isfinite(p).all(axis=1) & (((p[:, 0] - c[0]) ** 2 + (p[:, 1] - c[1]) ** 2) <= opt.max_range**2)
    p = p[ok]
    h = p[:, 2] - opt.floor_z
    band = (h > opt.min_height) & (h <= opt.max_height)
    floor_pts = h <= opt.min_height
    # the window: the cells of the points used and the camera (rays stay inside their bounding box)
    used = p[band | floor_pts, :2]
    if len(used) == 0:
        return Votes(np.zeros(2, np.int64), np.zeros((S, 0, 0), bool), np.zeros((S, 0, 0), bool),
                     np.zeros((0, 0), bool))
    lo = np.floor(np.minimum(used.min(axis=0), c[:2]) / r).astype(np.int64)
    hi = np.floor(np.maximum(used.max(axis=0), c[:2]) / r).astype(np.int64)
    ny, nx = int(hi[1] - lo[1]) + 1, int(hi[0] - lo[0]) + 1
    ij = np.floor(p[:, :2] / r).astype(np.int64) - lo
    occ = np.zeros((S, ny, nx), bool)
    occ[opt.slab_of(h[band]), ij[band, 1], ij[band, 0]] = True
    floor = np.zeros((ny, nx), bool)
    floor[ij[floor_pts, 1], ij[floor_pts, 0]] = True
    free = np.zeros((S, ny, nx), bool)
    ts, tj, ti = np.nonzero(occ)
    fj, fi = np.nonzero(floor)
    # ray ends: occupied slab centres and floor cell centres (at floor height)
    ends_xy = (np.concatenate([np.stack([ti, tj], 1), np.stack([fi, fj], 1)]) + lo + 0.5) * r
    ends_h = np.concatenate([opt.min_height + (ts + 0.5) * opt.slab_height, np.zeros(len(fi))])
    if len(ends_xy):
        d = ends_xy - c[:2]
        dz = ends_h + opt.floor_z - c[2]
        length = np.hypot(d[:, 0], d[:, 1])
        # one ray per azimuth bin (one cell wide at max_range) and end height: the farthest; nearer ends in the
        # same direction lie on or beside it (their own cells are voted anyway)
        kind = np.concatenate([ts, np.full(len(fi), S)])
        az = np.floor((np.arctan2(d[:, 1], d[:, 0]) + np.pi) * (opt.max_range / r)).astype(np.int64)
        key = az * (S + 1) + kind
        order = np.lexsort((length, key))
        last = np.r_[key[order][1:] != key[order][:-1], True]
        sel = order[last]
        d, dz, length = d[sel], dz[sel], length[sel]
        step = RAY_STEP * r
        steps = np.maximum(0, np.ceil((length - r) / step).astype(np.int64))
        total = int(steps.sum())
        if total:
            ray = np.repeat(np.arange(len(steps)), steps)
            k = np.arange(total) - np.repeat(np.cumsum(steps) - steps, steps)
            t = k * step / np.maximum(length[ray], 1e-12)
            hh = c[2] - opt.floor_z + dz[ray] * t
            inb = (hh > opt.min_height) & (hh <= opt.max_height)
            xy = c[:2] + d[ray[inb]] * t[inb, None]
            cells = np.floor(xy / r).astype(np.int64) - lo
            keep = (cells >= 0).all(axis=1) & (cells[:, 0] < nx) & (cells[:, 1] < ny)
            free[opt.slab_of(hh[inb][keep]), cells[keep, 1], cells[keep, 0]] = True
    free &= ~occ
    any2d = occ.any(axis=0) | free.any(axis=0) | floor
    rows, cols = np.flatnonzero(any2d.any(axis=1)), np.flatnonzero(any2d.any(axis=0))
    if rows.size == 0:
        return Votes(lo, np.zeros((S, 0, 0), bool), np.zeros((S, 0, 0), bool), np.zeros((0, 0), bool))
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return Votes(lo + np.array([cols[0], rows[0]]), occ[:, sl[0], sl[1]], free[:, sl[0], sl[1]], floor[sl])


class OccupancyGrid:
    """Vote counts per slab on a dense, growing array (see the module docstring). ``add(..., sign=-1)`` removes
    the votes of a frame again."""

    def __init__(self, options: OccupancyOptions | None = None):
        self.options = options or OccupancyOptions()
        self.clear()

    def clear(self) -> None:
        S = self.options.slabs
        self.lo = np.zeros(2, np.int64)  # cell index of array element [.., 0, 0] (i = x, j = y)
        self.occ = np.zeros((S, 0, 0), np.int32)  # indexed [slab, j - lo[1], i - lo[0]] (row = y)
        self.free = np.zeros((S, 0, 0), np.int32)
        self.floor = np.zeros((0, 0), np.int32)

    def _grow(self, ij: np.ndarray) -> None:
        lo, hi = ij.min(axis=0), ij.max(axis=0) + 1
        H, W = self.floor.shape
        if self.floor.size:
            cur_hi = self.lo + np.array([W, H])
            if (lo >= self.lo).all() and (hi <= cur_hi).all():
                return
            lo, hi = np.minimum(lo, self.lo), np.maximum(hi, cur_hi)
        margin = 64  # cells; amortises re-allocation as the robot explores
        new_lo, new_hi = lo - margin, hi + margin
        shape = (int(new_hi[1] - new_lo[1]), int(new_hi[0] - new_lo[0]))
        S = self.options.slabs
        occ, free, floor = np.zeros((S, *shape), np.int32), np.zeros((S, *shape), np.int32), np.zeros(shape, np.int32)
        if self.floor.size:
            oy, ox = int(self.lo[1] - new_lo[1]), int(self.lo[0] - new_lo[0])
            occ[:, oy:oy + H, ox:ox + W] = self.occ
            free[:, oy:oy + H, ox:ox + W] = self.free
            floor[oy:oy + H, ox:ox + W] = self.floor
        self.lo, self.occ, self.free, self.floor = new_lo, occ, free, floor

    def add(self, votes: Votes, sign: int = 1) -> None:
        if votes.floor.size == 0:
            return
        rows, cols = votes.floor.shape
        self._grow(np.stack([votes.lo, votes.lo + np.array([cols - 1, rows - 1])]))
        y, x = int(votes.lo[1] - self.lo[1]), int(votes.lo[0] - self.lo[0])
        self.occ[:, y:y + rows, x:x + cols] += sign * votes.occ
        self.free[:, y:y + rows, x:x + cols] += sign * votes.free
        self.floor[y:y + rows, x:x + cols] += sign * votes.floor

    def to_arrays(self, crop: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
        """(data int8 (height, width) with -1/0/100, origin (x, y) of the lower-left corner, resolution)."""
        r = self.options.resolution
        if self.floor.size == 0:
            return np.zeros((0, 0), np.int8), np.zeros(2), r
        occupied = ((L_OCC * self.occ + L_FREE * self.free) > 0).any(axis=0)
        seen = occupied | (self.free > 0).any(axis=0) | (self.floor > 0)
        lo = self.lo.copy()
        if crop:
            rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
            if rows.size == 0:
                return np.zeros((0, 0), np.int8), np.zeros(2), r
            sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            seen, occupied = seen[sl], occupied[sl]
            lo = lo + np.array([cols[0], rows[0]])
        data = np.full(seen.shape, UNKNOWN, np.int8)
        data[seen] = FREE
        data[occupied] = OCCUPIED
        return data, lo.astype(np.float64) * r, r


def grid_msg_fields(data: np.ndarray, origin, resolution: float, frame_id: str = "map") -> dict:
    """The fields of a nav_msgs/OccupancyGrid (info + flat data list order) as plain values."""
    h, w = data.shape
    return {"header": {"frame_id": frame_id},
            "info": {"resolution": float(resolution), "width": int(w), "height": int(h),
                     "origin": {"position": {"x": float(origin[0]), "y": float(origin[1]), "z": 0.0},
                                "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}}},
            "data": np.ascontiguousarray(data, np.int8).reshape(-1)}
