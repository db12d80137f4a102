"""Training data: procedural rooms rendered by Open3D raycasting, pools of pre-rendered sequences, clip sampling.

World frame of a scene: metres, z up, floor at z = 0. Camera poses are camera-to-world 4x4 matrices with OpenCV
optical axes (x right, y down, z forward). Intrinsics K follow the model's convention: cx = W/2, cy = H/2 and pixel
(u, v) at integer coordinates, so a ray of camera direction ((u - cx)/fx, (v - cy)/fy, 1) hits at t = z-depth.

This module has its own minimal renderer so that training never waits on anything else; a ``SequenceSource`` is
anything that yields ``Sequence`` objects, so another renderer (the synthetic-worlds module) can feed the same pool.

Pools are directories of ``shard_*.npz`` files (uint8 RGB, float16 depth, float32 poses and K, one kind per
sequence). ``render_pool`` writes them (seeded, resumable: existing shards are skipped); ``Pool`` loads them and
samples training clips under a curriculum stage (trajectory kinds, clip length, frame stride).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("ground", "handheld")


# ------------------------------------------------------------------------------------------------------ sequences
@dataclass
class Sequence:
    rgb: np.ndarray  # (L, H, W, 3) uint8
    depth: np.ndarray  # (L, H, W) float32/float16 z-depth in metres (0 = invalid)
    T_wc: np.ndarray  # (L, 4, 4) float32 camera-to-world, OpenCV axes
    K: np.ndarray  # (3, 3) float32
    kind: str = "ground"

    def __len__(self) -> int:
        return int(self.rgb.shape[0])


# --------------------------------------------------------------------------------------------------------- scenes
def _hash01(cells: np.ndarray, seed: int) -> np.ndarray:
    """int cells (N, 3) -> float32 in [0, 1), deterministic integer hash."""
    c = cells.astype(np.int64) & 0xFFFFFFFF
    h = (c[:, 0] * 73856093) ^ (c[:, 1] * 19349663) ^ (c[:, 2] * 83492791) ^ (seed * 2654435761)
    h &= 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 1274126177) & 0xFFFFFFFF
    h ^= h >> 16
    return (h & 0xFFFFFF).astype(np.float32) / float(1 << 24)


@dataclass
class Texture:
    pattern: str
    color_a: np.ndarray
    color_b: np.ndarray
    freq: float
    dirs: np.ndarray  # (3, 3) unit directions
    phase: np.ndarray  # (3,)
    seed: int
    detail: float  # amplitude of the fine cell noise

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """points (N, 3) -> RGB (N, 3) float32 in [0, 1]."""
        f = self.freq
        if self.pattern == "sinusoid":
            w = np.sin(2 * np.pi * f * (p @ self.dirs.T) + self.phase)  # (N, 3)
            v = 0.5 + 0.5 * w.mean(1) * 1.4
        elif self.pattern == "checker":
            cells = np.floor(p * f + self.phase[None, :] / (2 * np.pi))
            v = (cells.sum(1) % 2).astype(np.float32)
        elif self.pattern == "stripes":
            v = (np.sin(2 * np.pi * f * (p @ self.dirs[0]) + self.phase[0]) > 0).astype(np.float32)
        else:  # blocky noise, two octaves
            c1 = np.floor(p * f + self.phase[None, :] / (2 * np.pi)).astype(np.int64)
            c2 = np.floor(p * 2 * f + self.phase[None, :] / (2 * np.pi)).astype(np.int64)
            v = 0.65 * _hash01(c1, self.seed) + 0.35 * _hash01(c2, self.seed + 1)
        v = np.clip(v, 0.0, 1.0).astype(np.float32)[:, None]
        col = self.color_a[None] * (1 - v) + self.color_b[None] * v
        cells = np.floor(p / 0.07 + 0.37).astype(np.int64)
        col = col * (1.0 - self.detail + 2 * self.detail * _hash01(cells, self.seed + 7)[:, None])
        return col.astype(np.float32)


def _random_texture(rng: np.random.Generator, seed: int) -> Texture:
    dirs = rng.normal(size=(3, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    a = rng.uniform(0.1, 0.95, 3)
    b = np.clip(a + rng.uniform(-0.6, 0.6, 3), 0.05, 1.0)
    return Texture(
        pattern=str(rng.choice(["sinusoid", "checker", "stripes", "noise"])),
        color_a=a.astype(np.float32), color_b=b.astype(np.float32), freq=float(rng.uniform(0.8, 4.0)),
        dirs=dirs.astype(np.float32), phase=rng.uniform(0, 2 * np.pi, 3).astype(np.float32),
        seed=int(rng.integers(0, 2**31 - 1)), detail=float(rng.uniform(0.05, 0.25)),
    )


@dataclass
class Box:
    center: np.ndarray  # (3,) centre of the base footprint at floor height z = 0 -> centre (x, y), height h
    half: np.ndarray  # (3,) half extents
    yaw: float

    def contains_2d(self, xy: np.ndarray, margin: float = 0.0) -> bool:
        c, s = math.cos(-self.yaw), math.sin(-self.yaw)
        d = xy - self.center[:2]
        local = np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])
        return bool(np.all(np.abs(local) <= self.half[:2] + margin))


class Scene:
    """A closed room with boxes on the floor; each surface its own procedural texture; Lambert shading."""

    def __init__(self, seed: int):
        import open3d as o3d

        rng = np.random.default_rng(seed)
        self.seed = seed
        self.size = np.array([rng.uniform(4, 8), rng.uniform(4, 8), rng.uniform(2.5, 3.5)], dtype=np.float32)
        sx, sy, sz = (float(v) for v in self.size)
        self.boxes: list[Box] = []
        self.textures: list[Texture] = []
        self.rc = o3d.t.geometry.RaycastingScene()
        # 6 room planes as separate geometries (outward-facing normals do not matter for raycasting)
        quads = [
            ([0, 0, 0], [sx, 0, 0], [sx, sy, 0], [0, sy, 0]),  # floor
            ([0, 0, sz], [sx, 0, sz], [sx, sy, sz], [0, sy, sz]),  # ceiling
            ([0, 0, 0], [sx, 0, 0], [sx, 0, sz], [0, 0, sz]),
            ([0, sy, 0], [sx, sy, 0], [sx, sy, sz], [0, sy, sz]),
            ([0, 0, 0], [0, sy, 0], [0, sy, sz], [0, 0, sz]),
            ([sx, 0, 0], [sx, sy, 0], [sx, sy, sz], [sx, 0, sz]),
        ]
        for q in quads:
            v = np.array(q, dtype=np.float32)
            self._add(o3d, v, np.array([[0, 1, 2], [0, 2, 3]], dtype=np.uint32), rng)
        n_boxes = int(rng.integers(3, 9))
        for _ in range(200):
            if len(self.boxes) >= n_boxes:
                break
            half = np.array([rng.uniform(0.15, 0.7), rng.uniform(0.15, 0.7), rng.uniform(0.15, 0.6)], np.float32)
            c = np.array([rng.uniform(0.4 + half[0], sx - 0.4 - half[0]), rng.uniform(0.4 + half[1], sy - 0.4 - half[1]),
                          half[2]], np.float32)
            box = Box(c, half, float(rng.uniform(0, np.pi)))
            if any(np.linalg.norm(b.center[:2] - c[:2]) < np.linalg.norm(b.half[:2]) + np.linalg.norm(half[:2]) + 0.3
                   for b in self.boxes):
                continue
            self.boxes.append(box)
            self._add_box(o3d, box, rng)
        light = rng.normal(size=3)
        light[2] = abs(light[2]) + 1.0
        self.light_dir = (light / np.linalg.norm(light)).astype(np.float32)
        self.lamp = np.array([rng.uniform(0.3, 0.7) * sx, rng.uniform(0.3, 0.7) * sy, sz - 0.2], np.float32)
        self.ambient = float(rng.uniform(0.25, 0.45))

    def _add(self, o3d, verts: np.ndarray, tris: np.ndarray, rng: np.random.Generator) -> None:
        import open3d.core as o3c

        self.rc.add_triangles(o3c.Tensor(verts.astype(np.float32)), o3c.Tensor(tris.astype(np.uint32)))
        self.textures.append(_random_texture(rng, self.seed * 131 + len(self.textures)))

    def _add_box(self, o3d, box: Box, rng: np.random.Generator) -> None:
        hx, hy, hz = (float(v) for v in box.half)
        corners = np.array([[x, y, z] for z in (-hz, hz) for y in (-hy, hy) for x in (-hx, hx)], np.float32)
        c, s = math.cos(box.yaw), math.sin(box.yaw)
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float32)
        verts = corners @ R.T + box.center[None]
        faces = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]
        tris = np.array([t for a, b, cc, d in faces for t in ((a, b, cc), (a, cc, d))], np.uint32)
        self._add(o3d, verts, tris, rng)

    def clearance_2d(self, xy: np.ndarray) -> float:
        """Distance (m, approximate for boxes) from a floor point to the nearest wall or box."""
        sx, sy = float(self.size[0]), float(self.size[1])
        d = min(xy[0], sx - xy[0], xy[1], sy - xy[1])
        for b in self.boxes:
            c, s = math.cos(-b.yaw), math.sin(-b.yaw)
            dd = xy - b.center[:2]
            local = np.abs(np.array([c * dd[0] - s * dd[1], s * dd[0] + c * dd[1]])) - b.half[:2]
            d = min(d, float(np.linalg.norm(np.maximum(local, 0.0)) + min(local.max(), 0.0)))
        return float(d)

    def render(self, K: np.ndarray, T_wc: np.ndarray, hw: tuple[int, int], supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """-> (rgb uint8 (H, W, 3), z-depth float32 (H, W), 0 where nothing was hit)."""
        import open3d.core as o3c

        H, W = hw
        ss = max(1, int(supersample))
        offs = (np.arange(ss) + 0.5) / ss - 0.5
        v, u = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
        us = [u[..., None, None] + 0 * offs[None, None, :, None] + offs[None, None, None, :]]
        vs = [v[..., None, None] + offs[None, None, :, None] + 0 * offs[None, None, None, :]]
        uu = np.concatenate([u.reshape(-1), np.broadcast_to(us[0], (H, W, ss, ss)).reshape(-1)])
        vv = np.concatenate([v.reshape(-1), np.broadcast_to(vs[0], (H, W, ss, ss)).reshape(-1)])
        d_cam = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu)], -1)
        R, t = T_wc[:3, :3].astype(np.float32), T_wc[:3, 3].astype(np.float32)
        d_w = d_cam @ R.T
        rays = np.concatenate([np.broadcast_to(t, d_w.shape), d_w], -1).astype(np.float32)
        ans = self.rc.cast_rays(o3c.Tensor(rays))
        t_hit = ans["t_hit"].numpy()
        gid = ans["geometry_ids"].numpy().astype(np.int64)
        normals = ans["primitive_normals"].numpy()
        n_px = H * W
        depth = t_hit[:n_px].reshape(H, W)
        depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
        # shading of the supersampled rays
        th, g, nrm, dw = t_hit[n_px:], gid[n_px:], normals[n_px:], d_w[n_px:]
        hit = np.isfinite(th)
        p = t[None] + dw * np.where(hit, th, 0.0)[:, None]
        col = np.zeros((p.shape[0], 3), np.float32)
        for k in np.unique(g[hit]):
            m = hit & (g == k)
            col[m] = self.textures[int(k)](p[m])
        nrm = nrm * np.sign(-(nrm * dw).sum(1, keepdims=True) + 1e-12)  # face the camera
        lam = np.clip((nrm * self.light_dir[None]).sum(1), 0, 1)
        to_lamp = self.lamp[None] - p
        dist = np.linalg.norm(to_lamp, axis=1) + 1e-6
        lam2 = np.clip((nrm * to_lamp).sum(1) / dist, 0, 1) / (1 + 0.08 * dist**2)
        shade = self.ambient + (1 - self.ambient) * (0.55 * lam + 0.6 * lam2)
        col = np.clip(col * shade[:, None], 0, 1)
        rgb = col.reshape(H, W, ss * ss, 3).mean(2)
        return (rgb * 255 + 0.5).astype(np.uint8), depth


# --------------------------------------------------------------------------------------------------- trajectories
def look_rotation(forward: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world rotation (OpenCV axes) looking along `forward` with world z up, rolled about the view axis."""
    f = forward / np.linalg.norm(forward)
    right = np.cross(f, np.array([0.0, 0.0, 1.0]))
    if np.linalg.norm(right) < 1e-6:
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    if roll:
        c, s = math.cos(roll), math.sin(roll)
        right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, f], axis=1)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float, corr: float) -> np.ndarray:
    """Ornstein-Uhlenbeck-like smooth noise of stationary std ~ sigma."""
    out = np.zeros(n)
    x = rng.normal() * sigma
    k = math.sqrt(1 - corr**2)
    for i in range(n):
        x = corr * x + k * sigma * rng.normal()
        out[i] = x
    return out


def ground_trajectory(scene: Scene, n: int, rng: np.random.Generator, max_step: float = 0.05,
                      max_yaw_deg: float = 2.0) -> np.ndarray:
    """Planar robot motion: a camera at fixed height and pitch, driving forward and turning, avoiding obstacles."""
    sx, sy = float(scene.size[0]), float(scene.size[1])
    h = rng.uniform(0.25, 0.6)
    pitch = math.radians(rng.uniform(-12, 2))
    for _ in range(500):
        xy = np.array([rng.uniform(0.6, sx - 0.6), rng.uniform(0.6, sy - 0.6)])
        if scene.clearance_2d(xy) > 0.6:
            break
    yaw = rng.uniform(-np.pi, np.pi)
    max_yaw = math.radians(max_yaw_deg)
    yaw_noise = _smooth_noise(rng, n, 0.8 * max_yaw, 0.95)
    speed_noise = _smooth_noise(rng, n, 0.35, 0.97)
    base_speed = rng.uniform(0.4, 0.9) * max_step
    poses = np.zeros((n, 4, 4), np.float32)
    for i in range(n):
        fwd_flat = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        fwd = fwd_flat * math.cos(pitch) + np.array([0, 0, math.sin(pitch)])
        T = np.eye(4)
        T[:3, :3] = look_rotation(fwd)
        T[:3, 3] = [xy[0], xy[1], h]
        poses[i] = T
        # choose the next yaw: smooth random turning, overridden when the way ahead is blocked
        omega = float(np.clip(yaw_noise[i], -max_yaw, max_yaw))
        ahead = scene.clearance_2d(xy + 0.7 * fwd_flat[:2])
        if ahead < 0.45:
            best = max((scene.clearance_2d(xy + 0.7 * np.array([math.cos(yaw + a), math.sin(yaw + a)])), a)
                       for a in (-max_yaw, max_yaw))
            omega = best[1]
        speed = float(np.clip(base_speed * (1 + speed_noise[i]), 0.0, max_step))
        speed *= float(np.clip((ahead - 0.3) / 0.5, 0.0, 1.0))
        yaw += omega
        nxt = xy + speed * np.array([math.cos(yaw), math.sin(yaw)])
        if scene.clearance_2d(nxt) > 0.3:
            xy = nxt
    return poses


def handheld_trajectory(scene: Scene, n: int, rng: np.random.Generator, max_step: float = 0.06,
                        max_rot_deg: float = 3.0) -> np.ndarray:
    """6-DoF hand-held motion above the boxes: smooth translation, yaw, pitch and a little roll."""
    sx, sy, sz = (float(v) for v in scene.size)
    top = max([float(b.center[2] + b.half[2]) for b in scene.boxes] + [0.0])
    zlo, zhi = max(1.2, top + 0.35), max(max(1.2, top + 0.35) + 0.1, sz - 0.4)
    p = np.array([rng.uniform(0.8, sx - 0.8), rng.uniform(0.8, sy - 0.8), rng.uniform(zlo, zhi)])
    vel = np.zeros(3)
    yaw = rng.uniform(-np.pi, np.pi)
    pitch = math.radians(rng.uniform(-30, 5))
    roll = 0.0
    r = math.radians(max_rot_deg)
    ny, npch, nr = (_smooth_noise(rng, n, r * s, 0.93) for s in (0.7, 0.35, 0.15))
    acc = rng.normal(size=(n, 3)) * max_step * 0.15
    poses = np.zeros((n, 4, 4), np.float32)
    for i in range(n):
        fwd = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
        T = np.eye(4)
        T[:3, :3] = look_rotation(fwd, roll)
        T[:3, 3] = p
        poses[i] = T
        vel = 0.9 * vel + acc[i]
        # stay inside the room, away from the walls
        lo = np.array([0.6, 0.6, zlo])
        hi = np.array([sx - 0.6, sy - 0.6, zhi])
        vel += 0.02 * (np.clip(p, lo, hi) - p)
        sp = np.linalg.norm(vel)
        if sp > max_step:
            vel *= max_step / sp
        p = p + vel
        yaw += float(np.clip(ny[i], -r, r))
        pitch = float(np.clip(pitch + np.clip(npch[i], -r, r), math.radians(-45), math.radians(20)))
        roll = float(np.clip(0.97 * roll + nr[i], math.radians(-12), math.radians(12)))
    return poses


def make_K(hw: tuple[int, int], fov_w_deg: float) -> np.ndarray:
    H, W = hw
    fx = (W / 2) / math.tan(math.radians(fov_w_deg) / 2)
    return np.array([[fx, 0, W / 2], [0, fx, H / 2], [0, 0, 1]], np.float32)


def render_sequence(seed: int, kind: str, n_frames: int, hw: tuple[int, int], fov_range=(54.0, 66.0),
                    scene: Scene | None = None) -> Sequence:
    """Render one seeded sequence (scene seed = seed unless a scene is given)."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    scene = scene or Scene(seed)
    K = make_K(hw, float(rng.uniform(*fov_range)))
    traj = ground_trajectory(scene, n_frames, rng) if kind == "ground" else handheld_trajectory(scene, n_frames, rng)
    rgb = np.zeros((n_frames, hw[0], hw[1], 3), np.uint8)
    depth = np.zeros((n_frames, hw[0], hw[1]), np.float32)
    for i in range(n_frames):
        rgb[i], depth[i] = scene.render(K, traj[i], hw)
    return Sequence(rgb=rgb, depth=depth, T_wc=traj, K=K, kind=kind)


# ---------------------------------------------------------------------------------------------------------- pools
def render_pool(out_dir: str | Path, n_sequences: int, n_frames: int, hw: tuple[int, int], seed0: int = 0,
                per_shard: int = 16, kinds: Seq[str] = KINDS, log=print) -> list[Path]:
    """Render sequences with seeds seed0 .. seed0 + n_sequences - 1 (kinds alternate) into shards; existing shards
    are kept, so an interrupted call resumes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    t0 = time.time()
    for s0 in range(0, n_sequences, per_shard):
        path = out / f"shard_{seed0 + s0:07d}.npz"
        paths.append(path)
        if path.exists():
            continue
        seqs = [render_sequence(seed0 + s, kinds[s % len(kinds)], n_frames, hw)
                for s in range(s0, min(n_sequences, s0 + per_shard))]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            rgb=np.stack([q.rgb for q in seqs]), depth=np.stack([q.depth for q in seqs]).astype(np.float16),
            T_wc=np.stack([q.T_wc for q in seqs]), K=np.stack([q.K for q in seqs]),
            kind=np.array([KINDS.index(q.kind) for q in seqs], np.int64),
        )
        tmp.rename(path)
        log(f"pool: {path.name} ({min(n_sequences, s0 + per_shard)}/{n_sequences} sequences, "
            f"{time.time() - t0:.0f} s)")
    return paths


def load_shard(path: str | Path) -> list[Sequence]:
    with np.load(path) as z:
        rgb, depth, T, K, kind = z["rgb"], z["depth"], z["T_wc"], z["K"], z["kind"]
    return [Sequence(rgb[i], depth[i], T[i], K[i], KINDS[int(kind[i])]) for i in range(rgb.shape[0])]


@dataclass
class Stage:
    """A curriculum stage: which trajectories, how many frames per clip, which frame strides."""

    name: str
    until: float  # fraction of the run at which the next stage starts
    kinds: tuple[str, ...] = ("ground",)
    frames: tuple[int, int] = (2, 4)  # inclusive range
    strides: tuple[int, ...] = (1,)


DEFAULT_CURRICULUM = (
    Stage("ground-short", 0.25, ("ground",), (2, 4), (1,)),
    Stage("ground+handheld", 0.55, ("ground", "ground", "handheld"), (3, 6), (1, 2)),
    Stage("long", 1.0, ("ground", "handheld"), (4, 8), (1, 2, 3)),
)


def stage_at(curriculum: Seq[Stage], progress: float) -> Stage:
    for st in curriculum:
        if progress < st.until:
            return st
    return curriculum[-1]


class Pool:
    """Pre-rendered sequences in memory; ``refresh()`` picks up shards written since (a renderer may run beside)."""

    def __init__(self, directory: str | Path, max_shards: int | None = None):
        self.dir = Path(directory)
        self.max_shards = max_shards
        self.loaded: set[str] = set()
        self.seqs: dict[str, list[Sequence]] = {k: [] for k in KINDS}
        self.refresh()

    def refresh(self) -> int:
        new = 0
        for p in sorted(self.dir.glob("shard_*.npz")):
            if p.name.endswith(".tmp.npz") or p.name in self.loaded:
                continue
            if self.max_shards is not None and len(self.loaded) >= self.max_shards:
                break
            for q in load_shard(p):
                self.seqs[q.kind].append(q)
            self.loaded.add(p.name)
            new += 1
        return new

    def __len__(self) -> int:
        return sum(len(v) for v in self.seqs.values())

    def sample_batch(self, rng: np.random.Generator, batch: int, stage: Stage) -> dict[str, np.ndarray]:
        kinds = [k for k in stage.kinds if self.seqs[k]] or [k for k in KINDS if self.seqs[k]]
        if not kinds:
            raise RuntimeError(f"pool {self.dir} is empty")
        S = int(rng.integers(stage.frames[0], stage.frames[1] + 1))
        clips = []
        for _ in range(batch):
            kind = kinds[int(rng.integers(len(kinds)))]
            seq = self.seqs[kind][int(rng.integers(len(self.seqs[kind])))]
            stride = int(stage.strides[int(rng.integers(len(stage.strides)))])
            stride = max(1, min(stride, (len(seq) - 1) // max(1, S - 1)))
            span = (S - 1) * stride
            start = int(rng.integers(0, len(seq) - span))
            idx = start + stride * np.arange(S)
            if rng.random() < 0.3:
                idx = idx[::-1]
            clips.append(make_clip(seq, idx))
        out = collate(clips)
        # photometric jitter per clip (same for all its frames)
        gain = rng.uniform(0.8, 1.2, (batch, 1, 1, 1, 1)).astype(np.float32)
        bias = rng.uniform(-0.06, 0.06, (batch, 1, 1, 1, 1)).astype(np.float32)
        out["images"] = np.clip(out["images"] * gain + bias, 0, 1)
        return out


# ----------------------------------------------------------------------------------------------------- clip targets
def make_clip(seq: Sequence, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Targets for the frames idx of a sequence, in the first frame's camera, normalised by its mean depth.

    images (S, 3, H, W) float32 in [0, 1]; depth (S, H, W) normalised; valid (S, H, W) bool; extrinsics (S, 3, 4)
    camera-from-world with world = the clip's first camera; K (S, 3, 3); world_points (S, H, W, 3); scale: metres per
    unit (frame 0's mean depth).
    """
    rgb = seq.rgb[idx]
    depth = seq.depth[idx].astype(np.float32)
    valid = depth > 1e-3
    scale = float(depth[0][valid[0]].mean()) if valid[0].any() else 1.0
    T = seq.T_wc[idx].astype(np.float64)
    T0 = T[0]
    # camera-from-world' (world' = first camera): E_i = inv(T_i) @ T_0
    Tinv = np.linalg.inv(T)
    E = Tinv @ T0[None]
    E[:, :3, 3] /= scale
    depth_n = depth / scale
    S, H, W = depth.shape
    K = np.broadcast_to(seq.K, (S, 3, 3)).astype(np.float32)
    v, u = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
    cam = np.stack([(u - K[0, 0, 2]) / K[0, 0, 0], (v - K[0, 1, 2]) / K[0, 1, 1], np.ones_like(u)], -1)
    cam = cam[None] * depth_n[..., None]  # (S, H, W, 3)
    c2w = np.linalg.inv(E)  # first-camera-from-camera_i (normalised units)
    pts = np.einsum("sij,shwj->shwi", c2w[:, :3, :3], cam) + c2w[:, None, None, :3, 3]
    return dict(
        images=rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255.0,
        depth=depth_n.astype(np.float32), valid=valid, extrinsics=E[:, :3, :].astype(np.float32), K=K,
        world_points=pts.astype(np.float32), scale=np.float32(scale),
    )


def collate(clips: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([c[k] for c in clips]) for k in clips[0]}


def iterate_on_the_fly(seed0: int, hw: tuple[int, int], n_frames: int = 32) -> Iterator[Sequence]:
    """The on-the-fly option: an endless stream of freshly rendered sequences (no pool)."""
    s = seed0
    while True:
        yield render_sequence(s, KINDS[s % len(KINDS)], n_frames, hw)
        s += 1


# ------------------------------------------------------------------------------------ the synthetic-worlds module
SIM_KINDS = {"ground": "ground_robot", "handheld": "handheld"}


def sim_sequence(seed: int, kind: str, n_frames: int, hw: tuple[int, int], scene_kind: str = "room",
                 fps: float = 10.0, hfov_deg: float = 60.0) -> Sequence:
    """A sequence rendered by the project's synthetic-worlds module (ros2_stream4d.sim) instead of this module's
    own renderer: same Sequence layout, so pools, clips and the evaluation take it unchanged. ``kind`` is
    "ground" or "handheld" (the sim's "ground_robot" / "handheld")."""
    from ros2_stream4d.sim.render import CameraModel, Renderer
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    H, W = hw
    scene = build_scene(scene_kind, seed=seed)
    traj = make_trajectory(scene, SIM_KINDS[kind], n_frames=n_frames, fps=fps, seed=seed)
    cam = CameraModel.from_hfov(W, H, hfov_deg)
    renderer = Renderer(scene, cam)
    T = traj.T_world_cam
    rgb = np.zeros((n_frames, H, W, 3), np.uint8)
    depth = np.zeros((n_frames, H, W), np.float32)
    for i in range(n_frames):
        fr = renderer.render(T[i])
        rgb[i] = fr.rgb
        depth[i] = np.nan_to_num(fr.depth, nan=0.0)
    return Sequence(rgb=rgb, depth=depth, T_wc=T.astype(np.float32), K=cam.K.astype(np.float32), kind=kind)
