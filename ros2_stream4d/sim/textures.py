"""Procedural solid textures evaluated at 3D hit points, and Lambert shading.

A texture is a pure function of the world point (metres), so a surface looks the same from every view (multi-view
consistent, as a real textured world) and needs no UV maps. Patterns:

    sinusoid  three plane waves in random 3D directions (smooth, wavy)
    checker   3D checkerboard (2D checks on any axis-aligned plane)
    noise     hashed cell noise, two octaves (blocky speckle)
    marble    a plane wave whose phase is bent by two more waves (veins)
    stripes   one plane wave squashed into bands

Every pattern gives a value v in [0, 1] that blends ``color_a`` and ``color_b``; a fine hashed cell noise
("detail", cells of ``detail_scale`` metres) then modulates brightness so that every surface has texture at pixel
scale for feature matching. All maths is float32 numpy, vectorised, deterministic (bit-for-bit for the same inputs).
Cell lattices are shifted by a random fraction of a cell so that axis-aligned planes at "round" coordinates (the
floor at z = 0) never sit on a cell boundary, where rounding noise would flip cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PATTERNS = ("sinusoid", "checker", "noise", "marble", "stripes")


def hash01(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Hash integer lattice cells (1-D int32 arrays) -> float32 in [0, 1). Integer arithmetic, uint32 wrap-around."""
    h = ix.view(np.uint32) * np.uint32(0x8DA6B343)
    h ^= iy.view(np.uint32) * np.uint32(0xD8163841)
    h ^= iz.view(np.uint32) * np.uint32(0xCB1AB31F)
    h ^= np.uint32(seed & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    h >>= np.uint32(8)
    return h.astype(np.float32) * np.float32(1.0 / (1 << 24))


def _cells(xyz, inv_size: float, offset: np.ndarray) -> list[np.ndarray]:
    """Integer lattice coordinates (int32) of each axis for cells of 1 / inv_size metres, shifted by offset."""
    inv = np.float32(inv_size)
    return [np.floor(c * inv + offset[i]).astype(np.int32) for i, c in enumerate(xyz)]


@dataclass
class Texture:
    """A solid texture; everything derives from these fields (see the module docstring)."""

    pattern: str
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    scale: float  # metres: wavelength (sinusoid, marble, stripes) or cell size (checker, noise)
    detail: float = 0.25  # brightness modulation amplitude of the fine noise, 0..1
    detail_scale: float = 0.04  # metres per fine-noise cell
    seed: int = 0
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the pattern is evaluated at (point - origin): a copy of
    # a texture with its origin moved by an offset looks identical on a copy of a surface moved by the same offset
    _waves: np.ndarray = field(init=False, repr=False, compare=False)
    _phases: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown texture pattern {self.pattern!r}; expected one of {PATTERNS}")
        rng = np.random.default_rng(self.seed)
        dirs = rng.normal(size=(3, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        k = 2 * np.pi / self.scale * rng.uniform(0.7, 1.3, size=3)
        self._waves = (dirs * k[:, None]).astype(np.float32)  # (3 waves, 3 xyz)
        self._phases = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
        self._offset = rng.uniform(0.25, 0.75, size=3).astype(np.float32)
        self._ca = np.asarray(self.color_a, np.float32)
        self._cb = np.asarray(self.color_b, np.float32)

    def _wave(self, xyz, i: int) -> np.ndarray:
        k = self._waves[i]
        return np.sin(xyz[0] * k[0] + xyz[1] * k[1] + xyz[2] * k[2] + self._phases[i])

    def _local(self, xyz) -> list[np.ndarray]:
        if not any(self.origin):
            return xyz
        return [c - np.float32(o) for c, o in zip(xyz, self.origin)]

    def value_xyz(self, xyz) -> np.ndarray:
        """Pattern value in [0, 1] at points given as three 1-D float32 arrays (x, y, z)."""
        return self._value(self._local(xyz))

    def _value(self, xyz) -> np.ndarray:
        if self.pattern == "checker":
            ix, iy, iz = _cells(xyz, 1.0 / self.scale, self._offset)
            ix += iy
            ix += iz
            return (ix & 1).astype(np.float32)
        if self.pattern == "noise":
            a = hash01(*_cells(xyz, 1.0 / self.scale, self._offset), self.seed)
            b = hash01(*_cells(xyz, 2.3 / self.scale, self._offset), self.seed + 1)
            return np.float32(0.65) * a + np.float32(0.35) * b
        if self.pattern == "sinusoid":
            return np.float32(0.5) + (self._wave(xyz, 0) + self._wave(xyz, 1) + self._wave(xyz, 2)) * np.float32(
                1.0 / 6.0)
        if self.pattern == "marble":
            k = self._waves[0]
            bend = np.float32(2.5) * self._wave(xyz, 1) * self._wave(xyz, 2)
            return np.float32(0.5) + np.float32(0.5) * np.sin(xyz[0] * k[0] + xyz[1] * k[1] + xyz[2] * k[2] + bend)
        return np.clip(np.float32(0.5) + np.float32(1.5) * self._wave(xyz, 0), 0, 1)  # stripes

    def evaluate_xyz(self, xyz) -> list[np.ndarray]:
        """Albedo channels [r, g, b] (1-D float32, in [0, 1 + detail / 2]) at points (x, y, z) 1-D float32."""
        xyz = self._local(xyz)
        v = self._value(xyz)
        if self.detail > 0:
            fine = hash01(*_cells(xyz, 1.0 / self.detail_scale, self._offset), self.seed + 7)
            f = np.float32(1.0 - self.detail / 2) + np.float32(self.detail) * fine
            return [(self._ca[c] + (self._cb[c] - self._ca[c]) * v) * f for c in range(3)]
        return [self._ca[c] + (self._cb[c] - self._ca[c]) * v for c in range(3)]

    def value(self, p: np.ndarray) -> np.ndarray:
        """Pattern value at points p (N, 3)."""
        return self.value_xyz(_columns(p))

    def evaluate(self, p: np.ndarray) -> np.ndarray:
        """Albedo (N, 3) float32 at points p (N, 3)."""
        return np.stack(self.evaluate_xyz(_columns(p)), axis=1)

    def mean_color(self) -> np.ndarray:
        return 0.5 * (self._ca + self._cb)

    def to_dict(self) -> dict:
        d = {"pattern": self.pattern, "color_a": list(self.color_a), "color_b": list(self.color_b),
             "scale": self.scale, "detail": self.detail, "detail_scale": self.detail_scale, "seed": self.seed}
        if any(self.origin):
            d["origin"] = [float(o) for o in self.origin]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Texture:
        return cls(**{k: (tuple(v) if k.startswith("color") or k == "origin" else v) for k, v in d.items()})


def _columns(p: np.ndarray) -> list[np.ndarray]:
    p = np.asarray(p, np.float32)
    return [np.ascontiguousarray(p[:, i]) for i in range(3)]


# Palettes (linear RGB albedo) for the kinds of surfaces the scenes have.
PALETTES = {
    "floor": [((0.55, 0.42, 0.30), (0.30, 0.20, 0.12)), ((0.65, 0.65, 0.62), (0.25, 0.25, 0.28)),
              ((0.70, 0.60, 0.45), (0.45, 0.35, 0.25)), ((0.35, 0.38, 0.45), (0.60, 0.62, 0.70))],
    "wall": [((0.85, 0.82, 0.75), (0.60, 0.55, 0.50)), ((0.75, 0.80, 0.85), (0.45, 0.55, 0.65)),
             ((0.85, 0.75, 0.60), (0.65, 0.45, 0.35)), ((0.70, 0.85, 0.70), (0.40, 0.55, 0.45)),
             ((0.90, 0.88, 0.85), (0.35, 0.35, 0.40))],
    "object": [((0.80, 0.20, 0.15), (0.95, 0.75, 0.20)), ((0.15, 0.35, 0.80), (0.85, 0.90, 0.95)),
               ((0.20, 0.60, 0.25), (0.90, 0.85, 0.30)), ((0.50, 0.20, 0.55), (0.95, 0.60, 0.70)),
               ((0.10, 0.10, 0.12), (0.90, 0.90, 0.85)), ((0.85, 0.45, 0.10), (0.25, 0.15, 0.10)),
               ((0.10, 0.55, 0.60), (0.95, 0.95, 0.70))],
    "ground": [((0.20, 0.40, 0.12), (0.45, 0.55, 0.20)), ((0.40, 0.38, 0.35), (0.62, 0.60, 0.55)),
               ((0.55, 0.48, 0.35), (0.35, 0.30, 0.20))],
    "building": [((0.70, 0.65, 0.60), (0.35, 0.30, 0.28)), ((0.60, 0.62, 0.68), (0.20, 0.22, 0.30)),
                 ((0.75, 0.55, 0.40), (0.45, 0.30, 0.22)), ((0.85, 0.85, 0.80), (0.50, 0.50, 0.45))],
    "foliage": [((0.10, 0.35, 0.08), (0.35, 0.60, 0.15)), ((0.20, 0.45, 0.15), (0.50, 0.55, 0.10))],
    "bark": [((0.35, 0.22, 0.12), (0.20, 0.12, 0.07))],
}

# pattern choices and scale ranges (metres) per surface family
_PATTERN_CHOICES = {
    "floor": (("checker", 0.3, 0.8), ("noise", 0.1, 0.3), ("sinusoid", 0.3, 1.0), ("stripes", 0.15, 0.4)),
    "wall": (("sinusoid", 0.4, 1.5), ("marble", 0.5, 1.5), ("noise", 0.15, 0.4), ("stripes", 0.2, 0.6),
             ("checker", 0.3, 0.7)),
    "object": (("checker", 0.08, 0.25), ("sinusoid", 0.1, 0.4), ("noise", 0.05, 0.15), ("marble", 0.15, 0.4),
               ("stripes", 0.05, 0.2)),
    "ground": (("noise", 0.2, 0.8), ("sinusoid", 1.0, 4.0), ("marble", 1.5, 5.0)),
    "building": (("checker", 0.8, 2.5), ("stripes", 0.6, 2.0), ("noise", 0.4, 1.2), ("sinusoid", 1.0, 3.0)),
    "foliage": (("noise", 0.1, 0.3), ("marble", 0.3, 0.8)),
    "bark": (("stripes", 0.05, 0.15), ("noise", 0.03, 0.08)),
}


def random_texture(rng: np.random.Generator, family: str) -> Texture:
    """A texture for a surface family (floor, wall, object, ground, building, foliage, bark), drawn from rng."""
    pattern, lo, hi = _PATTERN_CHOICES[family][rng.integers(len(_PATTERN_CHOICES[family]))]
    pal = PALETTES[family]
    ca, cb = pal[rng.integers(len(pal))]
    jitter = rng.uniform(-0.06, 0.06, size=6)
    ca = tuple(float(np.clip(c + j, 0.02, 1.0)) for c, j in zip(ca, jitter[:3]))
    cb = tuple(float(np.clip(c + j, 0.02, 1.0)) for c, j in zip(cb, jitter[3:]))
    if rng.random() < 0.5:
        ca, cb = cb, ca
    fine = {"ground": (0.05, 0.12), "building": (0.05, 0.12)}.get(family, (0.015, 0.05))
    return Texture(pattern=str(pattern), color_a=ca, color_b=cb, scale=float(rng.uniform(lo, hi)),
                   detail=float(rng.uniform(0.2, 0.45)), detail_scale=float(rng.uniform(*fine)),
                   seed=int(rng.integers(0, 2**31 - 1)))


def lambert(normals: np.ndarray, ray_dirs, lights: np.ndarray, intensities: np.ndarray, ambient: float) -> np.ndarray:
    """Lambert shading factor (N,) for unit normals (N, 3), flipped to face the viewer, seen along ray directions
    given as three 1-D arrays (dx, dy, dz), under directional lights (L, 3) (unit vectors towards each light) with
    (L,) intensities, plus an ambient term."""
    nx, ny, nz = normals[:, 0], normals[:, 1], normals[:, 2]
    towards_viewer = (nx * ray_dirs[0] + ny * ray_dirs[1] + nz * ray_dirs[2]) < 0
    sign = np.where(towards_viewer, np.float32(1), np.float32(-1))
    shade = np.full(len(nx), np.float32(ambient), np.float32)
    for (lx, ly, lz), inten in zip(lights.astype(np.float32), intensities.astype(np.float32)):
        c = (nx * lx + ny * ly + nz * lz) * sign
        np.maximum(c, np.float32(0), out=c)
        c *= inten
        shade += c
    return shade
