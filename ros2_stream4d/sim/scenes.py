"""Procedural scenes built from triangle meshes: rooms, corridors, objects on a floor, open outdoor-like scenes.

World frame: metres, z up, the floor (ground) is the plane z = 0 in every scene (ground robots drive on it).
A scene is fully determined by ``(kind, seed, overrides)``: ``build_scene`` draws every size, position and texture
from ``numpy.random.default_rng(seed)`` in a fixed order, so rebuilding it gives bit-identical meshes.

Besides the meshes a scene carries what trajectories need: a box where cameras may be (``free_lo``/``free_hi``),
a rectangle for closed loops (``path_lo``/``path_hi``) or, for scenes viewed from outside ("around" layout), the
radii of the ring around ``focus``; obstacle boxes; and a nominal walking speed. A scene may also carry named
ground-robot routes (``routes``: waypoints in xy, see trajectories.py) that follow its corridors (the office).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open3d as o3d

from ros2_stream4d.mapping.conventions import rot_z

from . import SCENE_KINDS
from .textures import Texture, random_texture


@dataclass
class Part:
    """One mesh of the scene with one texture."""

    name: str
    vertices: np.ndarray  # (V, 3) float64, world metres
    triangles: np.ndarray  # (T, 3) int32
    texture: int  # index into Scene.textures
    obstacle: bool = True  # cameras keep out of its bounding box

    @property
    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        return self.vertices.min(axis=0), self.vertices.max(axis=0)


@dataclass
class Scene:
    kind: str
    seed: int
    overrides: dict
    params: dict  # the drawn sizes, for the JSON written beside bags
    parts: list[Part]
    textures: list[Texture]
    free_lo: np.ndarray  # (3,) camera positions must lie in [free_lo, free_hi]
    free_hi: np.ndarray
    focus: np.ndarray  # (3,) what orbits look at
    layout: str = "inside"  # "inside": loops in path_lo..path_hi; "around": loops on a ring around focus
    path_lo: np.ndarray | None = None  # (2,) xy rectangle for loops ("inside")
    path_hi: np.ndarray | None = None
    ring: tuple[float, float] = (0.0, 0.0)  # (r_min, r_max) for loops and orbits around focus ("around")
    speed: float = 0.4  # nominal hand-held walking speed, m/s
    lights: np.ndarray = field(default_factory=lambda: _unit([[0.35, 0.25, 1.0], [-0.6, -0.4, 0.3]]))
    light_intensities: np.ndarray = field(default_factory=lambda: np.array([0.6, 0.25], np.float32))
    ambient: float = 0.3
    sky: tuple | None = None  # ((horizon rgb), (zenith rgb)) for open scenes; None = closed (every ray hits)
    routes: dict = field(default_factory=dict)  # name -> (K, 2) waypoints of a ground-robot route (trajectories.py)
    _rc: o3d.t.geometry.RaycastingScene | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------ geometry queries
    @property
    def raycasting_scene(self) -> o3d.t.geometry.RaycastingScene:
        """Open3D raycasting scene with one geometry per part, geometry id == part index."""
        if self._rc is None:
            rc = o3d.t.geometry.RaycastingScene()
            for i, part in enumerate(self.parts):
                gid = rc.add_triangles(o3d.core.Tensor(part.vertices.astype(np.float32)),
                                       o3d.core.Tensor(part.triangles.astype(np.uint32)))
                if gid != i:
                    raise RuntimeError(f"unexpected geometry id {gid} for part {i}")
            self._rc = rc
        return self._rc

    @property
    def part_texture(self) -> np.ndarray:
        """(n_parts,) texture index per part (= per geometry id)."""
        return np.array([p.texture for p in self.parts], np.int64)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Unsigned distance (N,) from points (N, 3) to the scene surface."""
        q = o3d.core.Tensor(np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 3))
        return self.raycasting_scene.compute_distance(q).numpy()

    def in_obstacle(self, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """(N,) True where a point lies inside an obstacle's bounding box grown by margin."""
        pts = np.asarray(points, np.float64).reshape(-1, 3)
        hit = np.zeros(len(pts), bool)
        for part in self.parts:
            if part.obstacle:
                lo, hi = part.aabb
                hit |= np.all((pts >= lo - margin) & (pts <= hi + margin), axis=1)
        return hit

    def camera_ok(self, points: np.ndarray, clearance: float = 0.3) -> np.ndarray:
        """(N,) True where a camera may be: in the free box, outside obstacles, at least ``clearance`` from any
        surface."""
        pts = np.asarray(points, np.float64).reshape(-1, 3)
        ok = np.all((pts >= self.free_lo) & (pts <= self.free_hi), axis=1)
        ok &= ~self.in_obstacle(pts, margin=clearance)
        ok &= self.distance(pts) >= clearance
        return ok

    # ------------------------------------------------------------------ export
    def mesh(self) -> o3d.geometry.TriangleMesh:
        """All parts as one legacy triangle mesh, vertex colours = each texture's mean colour (for viewing)."""
        verts, tris, cols, n = [], [], [], 0
        for part in self.parts:
            verts.append(part.vertices)
            tris.append(part.triangles + n)
            cols.append(np.tile(self.textures[part.texture].mean_color(), (len(part.vertices), 1)))
            n += len(part.vertices)
        m = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(np.concatenate(verts)),
                                      o3d.utility.Vector3iVector(np.concatenate(tris).astype(np.int32)))
        m.vertex_colors = o3d.utility.Vector3dVector(np.concatenate(cols).astype(np.float64))
        return m

    def write_ply(self, path: str | Path) -> None:
        if not o3d.io.write_triangle_mesh(str(path), self.mesh(), write_ascii=False):
            raise OSError(f"could not write {path}")

    def to_dict(self) -> dict:
        """JSON-able description: enough to rebuild (kind, seed, overrides) plus what was drawn."""
        return {
            "kind": self.kind, "seed": self.seed, "overrides": self.overrides, "params": self.params,
            "layout": self.layout, "focus": self.focus.tolist(), "free_lo": self.free_lo.tolist(),
            "free_hi": self.free_hi.tolist(), "speed": self.speed,
            "n_triangles": int(sum(len(p.triangles) for p in self.parts)),
            "parts": [{"name": p.name, "texture": p.texture, "obstacle": p.obstacle,
                       "aabb": [p.aabb[0].tolist(), p.aabb[1].tolist()]} for p in self.parts],
            "textures": [t.to_dict() for t in self.textures],
            **({"routes": {k: np.asarray(v).tolist() for k, v in self.routes.items()}} if self.routes else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Rebuild from ``to_dict`` output (deterministic: same meshes, same textures)."""
        return build_scene(d["kind"], d["seed"], **d.get("overrides", {}))


def load_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices float64 (V, 3), triangles int32 (T, 3)) of a PLY scene mesh."""
    m = o3d.io.read_triangle_mesh(str(path))
    if len(m.triangles) == 0:
        raise ValueError(f"{path}: no triangles")
    return np.asarray(m.vertices), np.asarray(m.triangles, np.int32)


def scene_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------- builders
def build_scene(kind: str = "room", seed: int = 0, **overrides) -> Scene:
    """A procedural scene. ``overrides`` fix drawn parameters (e.g. size_x=6.0 for a room, n_objects=4)."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {SCENE_KINDS}")
    rng = np.random.default_rng([seed, SCENE_KINDS.index(kind)])
    b = _Builder(rng)
    scene = _BUILDERS[kind](b, dict(overrides))
    scene.kind, scene.seed, scene.overrides = kind, int(seed), dict(overrides)
    return scene


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _param(overrides: dict, params: dict, name: str, draw):
    """A parameter: the override if given, else a draw (always drawn, so the random stream does not shift)."""
    drawn = draw()
    value = overrides.pop(name, drawn)
    params[name] = value.item() if isinstance(value, np.generic) else value
    return value


class _Builder:
    """Collects parts and textures; shape helpers place meshes in world coordinates."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.parts: list[Part] = []
        self.textures: list[Texture] = []

    def texture(self, family: str) -> int:
        self.textures.append(random_texture(self.rng, family))
        return len(self.textures) - 1

    def add(self, name, mesh_or_vt, family_or_tex, obstacle=True, yaw=0.0, at=(0.0, 0.0, 0.0)) -> Part:
        if isinstance(mesh_or_vt, o3d.geometry.TriangleMesh):
            v, t = np.asarray(mesh_or_vt.vertices, np.float64), np.asarray(mesh_or_vt.triangles, np.int32)
        else:
            v, t = mesh_or_vt
        v = v @ rot_z(yaw).T + np.asarray(at, np.float64)
        tex = self.texture(family_or_tex) if isinstance(family_or_tex, str) else int(family_or_tex)
        part = Part(name, v, np.asarray(t, np.int32), tex, obstacle)
        self.parts.append(part)
        return part

    # shapes, all resting on z = 0 in their local frame unless stated, centred on the z axis
    @staticmethod
    def quad(c0, c1, c2, c3):
        return np.array([c0, c1, c2, c3], np.float64), np.array([[0, 1, 2], [0, 2, 3]], np.int32)

    @staticmethod
    def box(sx, sy, sz):
        m = o3d.geometry.TriangleMesh.create_box(sx, sy, sz)
        return np.asarray(m.vertices) - [sx / 2, sy / 2, 0], np.asarray(m.triangles, np.int32)

    @staticmethod
    def cylinder(r, h, res=24):
        m = o3d.geometry.TriangleMesh.create_cylinder(r, h, resolution=res, split=1)
        return np.asarray(m.vertices) + [0, 0, h / 2], np.asarray(m.triangles, np.int32)

    @staticmethod
    def sphere(r, res=16):
        m = o3d.geometry.TriangleMesh.create_sphere(r, resolution=res)
        return np.asarray(m.vertices) + [0, 0, r], np.asarray(m.triangles, np.int32)

    @staticmethod
    def cone(r, h, res=24):
        m = o3d.geometry.TriangleMesh.create_cone(r, h, resolution=res)
        return np.asarray(m.vertices), np.asarray(m.triangles, np.int32)

    @staticmethod
    def torus(R, r):
        m = o3d.geometry.TriangleMesh.create_torus(R, r, radial_resolution=24, tubular_resolution=12)
        v = np.asarray(m.vertices)
        return v + [0, 0, r], np.asarray(m.triangles, np.int32)

    def room_shell(self, x0, x1, y0, y1, h, floor="floor", wall="wall", ceiling="wall"):
        """Floor, ceiling and four walls of an axis-aligned box, seen from inside (not obstacles)."""
        self.add("floor", self.quad((x0, y0, 0), (x1, y0, 0), (x1, y1, 0), (x0, y1, 0)), floor, obstacle=False)
        self.add("ceiling", self.quad((x0, y0, h), (x0, y1, h), (x1, y1, h), (x1, y0, h)), ceiling, obstacle=False)
        walls = {"wall_south": ((x0, y0), (x1, y0)), "wall_east": ((x1, y0), (x1, y1)),
                 "wall_north": ((x1, y1), (x0, y1)), "wall_west": ((x0, y1), (x0, y0))}
        for name, ((ax, ay), (bx, by)) in walls.items():
            self.add(name, self.quad((ax, ay, 0), (bx, by, 0), (bx, by, h), (ax, ay, h)), wall, obstacle=False)

    def furniture(self, name: str, xy, yaw: float, kind: str):
        """A floor object of a random size; returns its part(s)."""
        rng = self.rng
        if kind == "box":
            size = rng.uniform([0.3, 0.3, 0.25], [1.0, 0.9, 1.1])
            return [self.add(name, self.box(*size), "object", yaw=yaw, at=(*xy, 0))]
        if kind == "cabinet":
            size = rng.uniform([0.5, 0.35, 1.4], [1.2, 0.6, 2.0])
            return [self.add(name, self.box(*size), "object", yaw=yaw, at=(*xy, 0))]
        if kind == "cylinder":
            r, h = rng.uniform(0.15, 0.4), rng.uniform(0.4, 1.2)
            return [self.add(name, self.cylinder(r, h), "object", at=(*xy, 0))]
        if kind == "sphere":
            r = rng.uniform(0.2, 0.45)
            return [self.add(name, self.sphere(r), "object", at=(*xy, 0))]
        if kind == "cone":
            r, h = rng.uniform(0.2, 0.4), rng.uniform(0.5, 1.2)
            return [self.add(name, self.cone(r, h), "object", at=(*xy, 0))]
        if kind == "torus":
            R, r = rng.uniform(0.25, 0.4), rng.uniform(0.06, 0.12)
            return [self.add(name, self.torus(R, r), "object", at=(*xy, 0))]
        if kind == "table":
            sx, sy, h = rng.uniform(0.8, 1.4), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.8)
            tex = self.texture("object")
            parts = [self.add(name + "_top", self.box(sx, sy, 0.05), tex, yaw=yaw,
                              at=np.r_[xy, h - 0.05])]
            for i, (dx, dy) in enumerate(((-1, -1), (1, -1), (1, 1), (-1, 1))):
                leg = rot_z(yaw)[:2, :2] @ [dx * (sx / 2 - 0.05), dy * (sy / 2 - 0.05)]
                parts.append(self.add(f"{name}_leg{i}", self.box(0.05, 0.05, h - 0.05), tex, yaw=yaw,
                                      at=(*(np.asarray(xy) + leg), 0)))
            return parts
        raise ValueError(kind)


def _footprint_overlaps(parts: list[Part], others: list[Part], gap: float) -> bool:
    for p in parts:
        lo, hi = p.aabb
        for o in others:
            olo, ohi = o.aabb
            if np.all(lo[:2] - gap < ohi[:2]) and np.all(olo[:2] - gap < hi[:2]):
                return True
    return False


def _place(b: _Builder, name: str, kinds, sample_xy, accept, tries: int = 60) -> list[Part]:
    """Place one object of a random kind at sample_xy() so that accept(parts) holds; [] if no spot was found."""
    for _ in range(tries):
        kind = kinds[b.rng.integers(len(kinds))]
        xy, yaw = sample_xy(), float(b.rng.uniform(0, 2 * np.pi))
        n_parts, n_tex = len(b.parts), len(b.textures)
        parts = b.furniture(name, xy, yaw, kind)
        if accept(parts):
            return parts
        del b.parts[n_parts:], b.textures[n_tex:]
    return []


# ---------------------------------------------------------------------------------------------------- room
def _room(b: _Builder, ov: dict) -> Scene:
    rng, params = b.rng, {}
    sx = float(_param(ov, params, "size_x", lambda: rng.uniform(4.0, 8.0)))
    sy = float(_param(ov, params, "size_y", lambda: rng.uniform(4.0, 8.0)))
    h = float(_param(ov, params, "height", lambda: rng.uniform(2.5, 3.5)))
    n_obj = int(_param(ov, params, "n_objects", lambda: rng.integers(3, 9)))
    _check_unused(ov)
    x0, x1, y0, y1 = -sx / 2, sx / 2, -sy / 2, sy / 2
    b.room_shell(x0, x1, y0, y1, h)
    ring = 1.2  # objects stand in a band this wide along the walls; the centre stays free
    inner = np.array([sx / 2 - ring, sy / 2 - ring])

    def sample_xy():
        while True:
            xy = rng.uniform([x0 + 0.3, y0 + 0.3], [x1 - 0.3, y1 - 0.3])
            if np.any(np.abs(xy) > inner + 0.3):
                return xy

    placed: list[Part] = []

    def accept(parts):
        lo = np.min([p.aabb[0] for p in parts], axis=0)
        hi = np.max([p.aabb[1] for p in parts], axis=0)
        inside = lo[0] > x0 + 0.02 and hi[0] < x1 - 0.02 and lo[1] > y0 + 0.02 and hi[1] < y1 - 0.02
        clear_centre = np.any(lo[:2] > inner) or np.any(hi[:2] < -inner)
        return inside and clear_centre and not _footprint_overlaps(parts, placed, 0.1)

    kinds = ("box", "cabinet", "cylinder", "sphere", "cone", "torus", "table")
    for i in range(n_obj):
        placed += _place(b, f"object{i}", kinds, sample_xy, accept)
    # pictures on the walls (thin boxes)
    for i in range(int(rng.integers(2, 5))):
        wall = int(rng.integers(4))
        w, hh, zc = rng.uniform(0.4, 1.2), rng.uniform(0.3, 0.8), rng.uniform(1.3, min(1.9, h - 0.5))
        along = rng.uniform(-0.5, 0.5) * ((sx if wall % 2 == 0 else sy) - w - 0.6)
        at, yaw = {0: ((along, y0 + 0.01), 0.0), 1: ((x1 - 0.01, along), np.pi / 2),
                   2: ((along, y1 - 0.01), 0.0), 3: ((x0 + 0.01, along), np.pi / 2)}[wall]
        b.add(f"picture{i}", b.box(w, 0.02, hh), "object", obstacle=False, yaw=yaw, at=(*at, zc - hh / 2))
    return Scene("room", 0, {}, params, b.parts, b.textures,
                 free_lo=np.array([x0 + 0.4, y0 + 0.4, 0.25]), free_hi=np.array([x1 - 0.4, y1 - 0.4, h - 0.35]),
                 focus=np.array([0.0, 0.0, 1.0]), layout="inside", path_lo=-inner, path_hi=inner, speed=0.4)


# ---------------------------------------------------------------------------------------------------- corridor
def _corridor(b: _Builder, ov: dict) -> Scene:
    rng, params = b.rng, {}
    length = float(_param(ov, params, "length", lambda: rng.uniform(12.0, 20.0)))
    width = float(_param(ov, params, "width", lambda: rng.uniform(2.0, 2.8)))
    h = float(_param(ov, params, "height", lambda: rng.uniform(2.5, 3.2)))
    _check_unused(ov)
    x0, x1, y0, y1 = -length / 2, length / 2, -width / 2, width / 2
    b.room_shell(x0, x1, y0, y1, h)
    max_intrusion = 0.3
    pillar_tex, door_tex = b.texture("wall"), b.texture("object")
    x = x0 + rng.uniform(1.0, 2.0)
    i = 0
    while x < x1 - 1.0:
        depth, wid = rng.uniform(0.15, 0.25), rng.uniform(0.3, 0.5)
        for side, yw in ((0, y0 + depth / 2), (1, y1 - depth / 2)):
            b.add(f"pillar{i}_{side}", b.box(wid, depth, h), pillar_tex, at=(x, yw, 0))
        # a door between this pillar and the next, on a random side
        side = int(rng.integers(2))
        dx = x + rng.uniform(1.0, 1.5)
        if dx < x1 - 1.0:
            yd = y0 + 0.02 if side == 0 else y1 - 0.02
            b.add(f"door{i}", b.box(0.9, 0.04, 2.05), door_tex, obstacle=False, at=(dx, yd, 0))
        # sometimes a box on the floor against a wall
        if rng.random() < 0.5:
            sz = rng.uniform([0.3, 0.2, 0.2], [0.6, max_intrusion, 0.7])
            side = int(rng.integers(2))
            yb = y0 + sz[1] / 2 + 0.02 if side == 0 else y1 - sz[1] / 2 - 0.02
            b.add(f"box{i}", b.box(*sz), "object", at=(x + rng.uniform(0.5, 1.0) + 0.5, yb, 0))
        b.add(f"lamp{i}", b.box(1.2, 0.3, 0.05), "object", obstacle=False, at=(x + 1.2, 0.0, h - 0.06))
        x += rng.uniform(2.5, 3.5)
        i += 1
    band = width / 2 - max_intrusion - 0.45
    return Scene("corridor", 0, {}, params, b.parts, b.textures,
                 free_lo=np.array([x0 + 0.5, y0 + 0.35, 0.25]), free_hi=np.array([x1 - 0.5, y1 - 0.35, h - 0.35]),
                 focus=np.array([0.0, 0.0, 1.2]), layout="inside", path_lo=np.array([x0 + 1.2, -band]),
                 path_hi=np.array([x1 - 1.2, band]), speed=0.6)


# ---------------------------------------------------------------------------------------------------- objects
def _objects(b: _Builder, ov: dict) -> Scene:
    rng, params = b.rng, {}
    radius = float(_param(ov, params, "radius", lambda: rng.uniform(1.5, 3.0)))
    n_obj = int(_param(ov, params, "n_objects", lambda: rng.integers(6, 13)))
    _check_unused(ov)
    half = 20.0
    b.add("floor", b.quad((-half, -half, 0), (half, -half, 0), (half, half, 0), (-half, half, 0)), "floor",
          obstacle=False)
    placed: list[Part] = []

    def sample_xy():
        r, a = radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        return np.array([r * np.cos(a), r * np.sin(a)])

    def accept(parts):
        lo = np.min([p.aabb[0] for p in parts], axis=0)
        hi = np.max([p.aabb[1] for p in parts], axis=0)
        within = np.max(np.abs(np.r_[lo[:2], hi[:2]])) < radius + 0.3
        return within and not _footprint_overlaps(parts, placed, 0.1)

    kinds = ("box", "cylinder", "sphere", "cone", "torus", "table", "box", "sphere")
    for i in range(n_obj):
        placed += _place(b, f"object{i}", kinds, sample_xy, accept)
    # backdrop: walls and blocks far away, so that views are not mostly sky
    for i in range(int(rng.integers(5, 10))):
        a, r = rng.uniform(0, 2 * np.pi), rng.uniform(9.0, 15.0)
        size = rng.uniform([1.0, 0.3, 1.0], [5.0, 2.0, 4.0])
        b.add(f"backdrop{i}", b.box(*size), "building", yaw=a + np.pi / 2, at=(r * np.cos(a), r * np.sin(a), 0))
    ring = (radius + 1.2, radius + 3.0)
    return Scene("objects", 0, {}, params, b.parts, b.textures,
                 free_lo=np.array([-8.0, -8.0, 0.25]), free_hi=np.array([8.0, 8.0, 3.0]),
                 focus=np.array([0.0, 0.0, 0.4]), layout="around", ring=ring, speed=0.4,
                 sky=((0.75, 0.82, 0.90), (0.35, 0.55, 0.85)))


# ---------------------------------------------------------------------------------------------------- outdoor
def _outdoor(b: _Builder, ov: dict) -> Scene:
    rng, params = b.rng, {}
    plaza = float(_param(ov, params, "plaza_radius", lambda: rng.uniform(7.0, 11.0)))
    n_buildings = int(_param(ov, params, "n_buildings", lambda: rng.integers(6, 13)))
    n_trees = int(_param(ov, params, "n_trees", lambda: rng.integers(8, 21)))
    _check_unused(ov)
    half = 150.0
    b.add("ground", b.quad((-half, -half, 0), (half, -half, 0), (half, half, 0), (-half, half, 0)), "ground",
          obstacle=False)
    placed: list[Part] = []
    for i in range(n_buildings):
        for _ in range(60):
            a, r = rng.uniform(0, 2 * np.pi), plaza + rng.uniform(6.0, 30.0)
            size = rng.uniform([4.0, 4.0, 4.0], [12.0, 12.0, 20.0])
            n = len(b.parts)
            part = b.add(f"building{i}", b.box(*size), "building", yaw=rng.uniform(0, np.pi / 2),
                         at=(r * np.cos(a), r * np.sin(a), 0))
            near = np.linalg.norm(np.clip(0.0, part.aabb[0][:2], part.aabb[1][:2])) < plaza + 1.0
            if not near and not _footprint_overlaps([part], placed, 1.0):
                placed.append(part)
                break
            del b.parts[n:], b.textures[len(b.textures) - 1:]
    bark = b.texture("bark")
    for i in range(n_trees):
        for _ in range(60):
            a, r = rng.uniform(0, 2 * np.pi), plaza + rng.uniform(1.0, 20.0)
            xy = np.array([r * np.cos(a), r * np.sin(a)])
            tr, th = rng.uniform(0.12, 0.3), rng.uniform(1.5, 3.0)
            cr = rng.uniform(0.9, 2.0)
            n, nt = len(b.parts), len(b.textures)
            parts = [b.add(f"tree{i}_trunk", b.cylinder(tr, th, res=12), bark, at=(*xy, 0))]
            if rng.random() < 0.5:
                parts.append(b.add(f"tree{i}_crown", b.sphere(cr, res=12), "foliage", at=(*xy, th - 0.3 * cr)))
            else:
                parts.append(b.add(f"tree{i}_crown", b.cone(cr, 2.5 * cr, res=12), "foliage", at=(*xy, th * 0.6)))
            crown_lo = parts[1].aabb[0][:2]
            if np.linalg.norm(np.clip(0.0, crown_lo, parts[1].aabb[1][:2])) > plaza + 0.3 and \
                    not _footprint_overlaps(parts, placed, 0.3):
                placed += parts
                break
            del b.parts[n:], b.textures[nt:]
    # distant hills: large spheres sunk into the ground
    for i in range(3):
        a, r, R = rng.uniform(0, 2 * np.pi), rng.uniform(70.0, 120.0), rng.uniform(20.0, 40.0)
        b.add(f"hill{i}", b.sphere(R, res=24), "ground", obstacle=False, at=(r * np.cos(a), r * np.sin(a), -1.4 * R))
    # a few bollards at the plaza edge
    for i in range(int(rng.integers(3, 7))):
        a = rng.uniform(0, 2 * np.pi)
        b.add(f"bollard{i}", b.cylinder(0.12, 0.9, res=12), "object", at=(plaza * np.cos(a), plaza * np.sin(a), 0))
    inner = plaza * 0.6
    scene = Scene("outdoor", 0, {}, params, b.parts, b.textures,
                  free_lo=np.array([-plaza, -plaza, 0.25]), free_hi=np.array([plaza, plaza, 4.0]),
                  focus=np.array([0.0, 0.0, 1.5]), layout="inside", path_lo=np.array([-inner, -inner]),
                  path_hi=np.array([inner, inner]), speed=1.0, sky=((0.80, 0.85, 0.92), (0.30, 0.50, 0.85)))
    scene.lights = _unit([[0.5, 0.3, 0.8], [-0.5, -0.6, 0.4]])
    scene.light_intensities = np.array([0.75, 0.15], np.float32)
    scene.ambient = 0.3
    return scene


# ---------------------------------------------------------------------------------------------------- office
OFFICE_SIDES = ("south", "east", "north", "west")


def _office(b: _Builder, ov: dict) -> Scene:
    """A floor of 2 x 2 rooms in a grid of corridors (a ring corridor around the floor, a middle corridor each way,
    crossing at the centre). Each room has doors to two of its corridors, furniture and its own wall textures. The
    two western rooms (``room_sw`` and ``room_nw``) are twins: identical geometry and textures at places
    ``twin_offset`` apart, so views inside them (and of their corridor faces) look alike: false loops are
    possible. Ground-robot routes along the corridor centrelines: ``loop`` (around both twins), ``figure_eight``
    (two lobes crossing at the central junction) and ``out_and_back`` (south corridor, then the east one)."""
    rng, params = b.rng, {}
    c = float(_param(ov, params, "corridor_width", lambda: rng.uniform(1.8, 2.2)))
    rx = float(_param(ov, params, "room_x", lambda: rng.uniform(4.5, 5.5)))
    ry = float(_param(ov, params, "room_y", lambda: rng.uniform(3.5, 4.2)))
    h = float(_param(ov, params, "height", lambda: rng.uniform(2.6, 3.0)))
    n_obj = int(_param(ov, params, "n_objects", lambda: rng.integers(3, 6)))
    _check_unused(ov)
    X, Y = 3 * c + 2 * rx, 3 * c + 2 * ry
    t_half = 0.05  # each wall is two slabs of this thickness: the room's face inside, the corridor's face outside
    door_w, door_h = 1.0, 2.1
    floor_tex, ceil_tex, outer_tex = b.texture("floor"), b.texture("wall"), b.texture("wall")

    def rect(name, x0, x1, y0, y1, z, tex):
        b.add(name, b.quad((x0, y0, z), (x1, y0, z), (x1, y1, z), (x0, y1, z)), tex, obstacle=False)

    # corridor floor and ceiling: the floor minus the rooms (three bands each way, no overlaps)
    xb = [(0.0, c), (c + rx, 2 * c + rx), (2 * c + 2 * rx, X)]
    yb = [(0.0, c), (c + ry, 2 * c + ry), (2 * c + 2 * ry, Y)]
    pieces = [(0.0, X, y0, y1) for y0, y1 in yb]
    pieces += [(x0, x1, yb[j][1], yb[j + 1][0]) for x0, x1 in xb for j in range(2)]
    for k, (x0, x1, y0, y1) in enumerate(pieces):
        rect("floor" if k == 0 else f"corridor_floor{k}", x0, x1, y0, y1, 0.0, floor_tex)
        rect(f"corridor_ceiling{k}", x0, x1, y0, y1, h, ceil_tex)
    # outer walls (facing inwards)
    corners = [(0.0, 0.0), (X, 0.0), (X, Y), (0.0, Y)]
    for k, side in enumerate(OFFICE_SIDES):
        (ax, ay), (bx, by) = corners[k], corners[(k + 1) % 4]
        b.add(f"outer_wall_{side}", b.quad((ax, ay, 0), (bx, by, 0), (bx, by, h), (ax, ay, h)), outer_tex,
              obstacle=False)

    def wall(name, x0, y0, x1, y1, doors, tex):
        """An axis-aligned slab [x0, x1] x [y0, y1] from the floor to the ceiling, with door openings at the
        given centres along its long axis (a lintel above each)."""
        along_x = (x1 - x0) >= (y1 - y0)
        a0, a1 = (x0, x1) if along_x else (y0, y1)
        cuts = [a0] + [v for d in sorted(doors) for v in (d - door_w / 2, d + door_w / 2)] + [a1]

        def slab(tag, s0, s1, z0, z1):
            size = (s1 - s0, y1 - y0, z1 - z0) if along_x else (x1 - x0, s1 - s0, z1 - z0)
            at = ((s0 + s1) / 2, (y0 + y1) / 2, z0) if along_x else ((x0 + x1) / 2, (s0 + s1) / 2, z0)
            b.add(f"{name}_{tag}", b.box(*size), tex, at=at)

        for k in range(0, len(cuts), 2):
            slab(f"seg{k // 2}", cuts[k], cuts[k + 1], 0.0, h)
        for k, d in enumerate(sorted(doors)):
            slab(f"lintel{k}", d - door_w / 2, d + door_w / 2, door_h, h)

    def build_room(name, x0, x1, y0, y1, doors: dict):
        """Floor, ceiling, walls with doors, furniture of one room; returns its parts."""
        first = len(b.parts)
        rect(f"{name}_floor", x0, x1, y0, y1, 0.0, "floor")
        rect(f"{name}_ceiling", x0, x1, y0, y1, h, "wall")
        inner, outer = b.texture("wall"), b.texture("wall")
        th = t_half
        slabs = {"south": ((x0, y0, x1, y0 + th), (x0 - th, y0 - th, x1 + th, y0)),
                 "north": ((x0, y1 - th, x1, y1), (x0 - th, y1, x1 + th, y1 + th)),
                 "west": ((x0, y0 + th, x0 + th, y1 - th), (x0 - th, y0, x0, y1)),
                 "east": ((x1 - th, y0 + th, x1, y1 - th), (x1, y0, x1 + th, y1))}
        for side, (ins, outs) in slabs.items():
            ds = [doors[side]] if side in doors else []
            wall(f"{name}_wall_{side}_in", *ins, ds, inner)
            wall(f"{name}_wall_{side}_out", *outs, ds, outer)
        # furniture along the walls, keeping the door zones free
        lo, hi = np.array([x0 + th, y0 + th]), np.array([x1 - th, y1 - th])
        keep_out = []
        for side, d in doors.items():
            if side in ("south", "north"):
                yy = y0 if side == "south" else y1
                keep_out.append((np.array([d - 0.8, yy - 1.2]), np.array([d + 0.8, yy + 1.2])))
            else:
                xx = x0 if side == "west" else x1
                keep_out.append((np.array([xx - 1.2, d - 0.8]), np.array([xx + 1.2, d + 0.8])))
        placed: list[Part] = []

        def sample_xy():
            return rng.uniform(lo + 0.3, hi - 0.3)

        def accept(parts):
            plo = np.min([p.aabb[0] for p in parts], axis=0)[:2]
            phi = np.max([p.aabb[1] for p in parts], axis=0)[:2]
            if np.any(plo < lo + 0.02) or np.any(phi > hi - 0.02):
                return False
            if any(np.all(plo < khi) and np.all(klo < phi) for klo, khi in keep_out):
                return False
            return not _footprint_overlaps(parts, placed, 0.15)

        kinds = ("box", "cabinet", "cylinder", "table", "sphere", "cabinet", "table")
        for i in range(n_obj):
            placed += _place(b, f"{name}_object{i}", kinds, sample_xy, accept)
        return b.parts[first:]

    def draw_doors(x0, x1, y0, y1):
        sides = sorted(rng.choice(4, size=2, replace=False))
        doors = {}
        for k in sides:
            side = OFFICE_SIDES[k]
            a0, a1 = (x0, x1) if side in ("south", "north") else (y0, y1)
            doors[side] = float(rng.uniform(a0 + 0.4 + door_w / 2, a1 - 0.4 - door_w / 2))
        return doors

    rooms = {}
    twin_offset = np.array([0.0, c + ry, 0.0])
    for name, i, j in (("room_sw", 0, 0), ("room_se", 1, 0), ("room_ne", 1, 1)):
        x0, y0 = c + i * (rx + c), c + j * (ry + c)
        doors = draw_doors(x0, x0 + rx, y0, y0 + ry)
        parts = build_room(name, x0, x0 + rx, y0, y0 + ry, doors)
        rooms[name] = {"box": [x0, x0 + rx, y0, y0 + ry], "doors": doors}
        if name == "room_sw":  # its twin: the same parts, textures moved with them
            dy = float(twin_offset[1])
            twin_doors = {k: v + (dy if k in ("west", "east") else 0.0) for k, v in doors.items()}
            rooms["room_nw"] = {"box": [x0, x0 + rx, y0 + dy, y0 + ry + dy], "doors": twin_doors}
            _clone_parts(b, parts, twin_offset, "room_sw", "room_nw")
    params["rooms"] = rooms
    params["twins"] = {"parts": ["room_sw", "room_nw"], "offset": twin_offset.tolist()}
    # ceiling lamps along the corridor centrelines, low benches against the outer walls (away from junctions)
    cx = [c / 2, 1.5 * c + rx, 2.5 * c + 2 * rx]
    cy = [c / 2, 1.5 * c + ry, 2.5 * c + 2 * ry]
    lamp_tex = b.texture("object")
    k = 0
    for yc in cy:
        for xc in np.arange(1.5, X - 1.0, 2.5):
            b.add(f"lamp{k}", b.box(1.0, 0.25, 0.04), lamp_tex, obstacle=False, at=(xc, yc, h - 0.05))
            k += 1
    for xc in cx:
        for yy in (0.5 * (c + c + ry), 0.5 * (2 * c + ry + 2 * c + 2 * ry)):
            b.add(f"lamp{k}", b.box(0.25, 1.0, 0.04), lamp_tex, obstacle=False, at=(xc, yy, h - 0.05))
            k += 1
    bench_tex = b.texture("object")
    spots = [("south", x, 0.0) for x in (c + rx / 2, 2 * c + 1.5 * rx)]
    spots += [("north", x, Y) for x in (c + rx / 2, 2 * c + 1.5 * rx)]
    spots += [("east", X, y) for y in (c + ry / 2, 2 * c + 1.5 * ry)]
    for k, (side, px, py) in enumerate(spots):
        if rng.random() < 0.35:
            continue
        length, depth, height = rng.uniform(0.8, 1.6), rng.uniform(0.3, 0.4), rng.uniform(0.4, 0.5)
        if side in ("south", "north"):
            at = (px, depth / 2 + 0.01 if side == "south" else Y - depth / 2 - 0.01, 0.0)
            b.add(f"bench{k}", b.box(length, depth, height), bench_tex, at=at)
        else:
            b.add(f"bench{k}", b.box(depth, length, height), bench_tex, at=(X - depth / 2 - 0.01, py, 0.0))
    routes = {
        "loop": np.array([(cx[0], 0.5 * (cy[0] + cy[1])), (cx[0], cy[2]), (cx[1], cy[2]), (cx[1], cy[0]),
                          (cx[0], cy[0])]),
        "figure_eight": np.array([(cx[1], cy[1]), (cx[1], cy[2]), (cx[0], cy[2]), (cx[0], cy[1]), (cx[2], cy[1]),
                                  (cx[2], cy[0]), (cx[1], cy[0])]),
        "out_and_back": np.array([(cx[0], cy[0]), (cx[2], cy[0]), (cx[2], cy[2])]),
    }
    junction = np.array([cx[1], cy[1]])
    half = np.full(2, c / 2 - 0.35)
    return Scene("office", 0, {}, params, b.parts, b.textures,
                 free_lo=np.array([0.3, 0.3, 0.25]), free_hi=np.array([X - 0.3, Y - 0.3, h - 0.35]),
                 focus=np.r_[junction, 1.2], layout="inside", path_lo=junction - half, path_hi=junction + half,
                 speed=0.6, routes=routes)


def _clone_parts(b: _Builder, parts: list[Part], offset: np.ndarray, old: str, new: str) -> None:
    """Copies of parts moved by offset, with copies of their textures whose origins move with them (identical look)."""
    texmap: dict[int, int] = {}
    for p in parts:
        if p.texture not in texmap:
            t = b.textures[p.texture]
            b.textures.append(dataclasses.replace(t, origin=tuple(float(o) for o in np.add(t.origin, offset))))
            texmap[p.texture] = len(b.textures) - 1
        b.parts.append(Part(p.name.replace(old, new), p.vertices + offset, p.triangles.copy(), texmap[p.texture],
                            p.obstacle))


def _check_unused(ov: dict) -> None:
    if ov:
        raise TypeError(f"unknown scene parameter(s): {sorted(ov)}")


_BUILDERS = {"room": _room, "corridor": _corridor, "objects": _objects, "outdoor": _outdoor, "office": _office}
