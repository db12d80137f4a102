"""Camera image -> model input, keeping the exact pixel mapping between the two geometries.

Pixel convention (used by every function here): pixel (u, v) = (column, row) has its CENTRE at the integer
coordinate, so the image spans [-0.5, W - 0.5] x [-0.5, H - 0.5]. This is OpenCV's convention for cv2.resize and
for intrinsics K (a ray through K^-1 [u, v, 1] passes through the centre of pixel (u, v)).

The resize maps edges onto edges: a source edge coordinate e = u + 0.5 goes to e * scale + offset in the model
image, i.e. ``u_model = (u_src + 0.5) * scale_x + offset_x - 0.5``. ``offset`` is the shift of the resized image in
model pixels: positive = padding on the left/top (pad mode), negative = columns/rows cropped away (crop mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

MODES = ("crop", "pad")
# A guard against images that would need absurd memory (the check runs before any pixel is touched).
MAX_SOURCE_PIXELS = 100_000_000
MAX_RESIZED_PIXELS = 40_000_000


@dataclass(frozen=True)
class PixelMapping:
    """Affine, axis-aligned map between source-camera pixels and model-input pixels (see the module docstring)."""

    source_hw: tuple[int, int]
    model_hw: tuple[int, int]
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    @property
    def scale(self) -> float:
        """The (mean) scale model/source. The official crop recipe rounds the height to a multiple of 14, so
        scale_y differs from scale_x by up to ~1 %; use scale_x/scale_y for exact work."""
        return 0.5 * (self.scale_x + self.scale_y)

    # ------------------------------------------------------------------ pixels
    def source_to_model_pixels(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        u = np.asarray(u, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        return (u + 0.5) * self.scale_x + self.offset_x - 0.5, (v + 0.5) * self.scale_y + self.offset_y - 0.5

    def model_to_source_pixels(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        u = np.asarray(u, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        return (u + 0.5 - self.offset_x) / self.scale_x - 0.5, (v + 0.5 - self.offset_y) / self.scale_y - 0.5

    # ------------------------------------------------------------- intrinsics
    def source_to_model_matrix(self) -> np.ndarray:
        """3x3 homogeneous pixel transform A with [u_m, v_m, 1] = A [u_s, v_s, 1]."""
        return np.array(
            [
                [self.scale_x, 0.0, 0.5 * self.scale_x - 0.5 + self.offset_x],
                [0.0, self.scale_y, 0.5 * self.scale_y - 0.5 + self.offset_y],
                [0.0, 0.0, 1.0],
            ]
        )

    def source_to_model_K(self, K_src) -> np.ndarray:
        return self.source_to_model_matrix() @ _check_K(K_src)

    def model_to_source_K(self, K_model) -> np.ndarray:
        return np.linalg.inv(self.source_to_model_matrix()) @ _check_K(K_model)

    # ---------------------------------------------------------------- regions
    def valid_source_region(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive: the source pixels whose centres the model image covers."""
        ix = self._source_to_model_index(1)
        iy = self._source_to_model_index(0)
        xs, ys = np.flatnonzero(ix >= 0), np.flatnonzero(iy >= 0)
        return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1

    def valid_source_mask(self) -> np.ndarray:
        """Boolean (h, w) mask of source pixels the model sees (False where cropped away)."""
        return (self._source_to_model_index(0) >= 0)[:, None] & (self._source_to_model_index(1) >= 0)[None, :]

    def valid_model_mask(self) -> np.ndarray:
        """Boolean (h, w) mask of model pixels that show the camera image (False on padding)."""
        return (self._model_to_source_index(0) >= 0)[:, None] & (self._model_to_source_index(1) >= 0)[None, :]

    # ------------------------------------------------------------- resampling
    def resample_to_model(self, array_src, fill=np.nan) -> np.ndarray:
        """Nearest-neighbour resample of a source-geometry map ((h, w) or (h, w, C)) to the model geometry.
        Nearest never blends depths across an edge; model pixels outside the source get ``fill``."""
        return _gather(np.asarray(array_src), self.source_hw, self._model_to_source_index(0),
                       self._model_to_source_index(1), fill)

    def resample_to_source(self, array_model, fill=np.nan) -> np.ndarray:
        """Nearest-neighbour resample of a model-geometry map back to the camera geometry; source pixels the model
        did not see (cropped away) get ``fill``."""
        return _gather(np.asarray(array_model), self.model_hw, self._source_to_model_index(0),
                       self._source_to_model_index(1), fill)

    # The mapping is separable, so nearest-neighbour lookups reduce to one index vector per axis (-1 = outside).
    def _model_to_source_index(self, axis: int) -> np.ndarray:
        n_model, n_src = self.model_hw[axis], self.source_hw[axis]
        c = np.arange(n_model, dtype=np.float64)
        src = (c + 0.5 - self._offset(axis)) / self._scale(axis) - 0.5
        return _nearest_index(src, n_src)

    def _source_to_model_index(self, axis: int) -> np.ndarray:
        n_model, n_src = self.model_hw[axis], self.source_hw[axis]
        c = np.arange(n_src, dtype=np.float64)
        dst = (c + 0.5) * self._scale(axis) + self._offset(axis) - 0.5
        idx = _nearest_index(dst, n_model)
        # Pad mode: a source pixel must also land on the content (not on padding) to be "seen".
        content = self._model_to_source_index(axis) >= 0
        idx[idx >= 0] = np.where(content[idx[idx >= 0]], idx[idx >= 0], -1)
        return idx

    def _scale(self, axis: int) -> float:
        return self.scale_y if axis == 0 else self.scale_x

    def _offset(self, axis: int) -> float:
        return self.offset_y if axis == 0 else self.offset_x


def _nearest_index(coord: np.ndarray, n: int) -> np.ndarray:
    """Index of the pixel whose cell [i - 0.5, i + 0.5) contains coord; -1 outside [0, n)."""
    idx = np.floor(coord + 0.5).astype(np.int64)
    idx[(idx < 0) | (idx >= n)] = -1
    return idx


def _gather(arr: np.ndarray, in_hw, iy: np.ndarray, ix: np.ndarray, fill) -> np.ndarray:
    if arr.ndim not in (2, 3) or tuple(arr.shape[:2]) != tuple(in_hw):
        raise ValueError(f"expected an array of shape {tuple(in_hw)} or {tuple(in_hw)} + (C,), got {arr.shape}")
    if isinstance(fill, float) and np.isnan(fill) and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"cannot fill a {arr.dtype} array with NaN; pass an explicit fill value")
    out = arr[np.clip(iy, 0, None)][:, np.clip(ix, 0, None)]
    outside = (iy < 0)[:, None] | (ix < 0)[None, :]
    if outside.any():
        out = out.copy()
        out[outside] = fill
    return out


def _check_K(K) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        raise ValueError(f"intrinsics must be a finite 3x3 matrix, got shape {K.shape}")
    return K


class Preprocessor:
    """Resize an RGB image to the model's input geometry (multiples of ``patch_size``).

    crop (the official StreamVGGT/VGGT "crop" recipe when ``height`` is None): width -> ``width``,
        height -> round(h * width / w / patch) * patch (a stretch of at most half a patch), then a centre crop to
        ``width`` rows if taller (the official code crops to the target size, 518). With ``height`` set: a uniform
        scale that covers width x height, then a centre crop of both axes.
    pad: keep the whole image. With ``height`` None, width -> ``width`` with the aspect kept
        (height round(h * width / w)), then pad the height up to a multiple of the patch size; with ``height``
        set, fit inside width x height and pad both axes. Padding is 1.0 (white), as in the official "pad" mode,
        and is centred.
    Interpolation: cv2.INTER_AREA when both axes shrink (anti-aliased, closest to PIL's bicubic downscale used by
    the reference), cv2.INTER_CUBIC otherwise (bicubic, as the reference).
    """

    def __init__(self, width: int = 518, mode: str = "crop", patch_size: int = 14, height: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        for name, value in (("width", width), ("height", height)):
            if value is not None and (int(value) != value or value <= 0 or value % patch_size):
                raise ValueError(f"{name} must be a positive multiple of patch_size={patch_size}, got {value}")
        self.width, self.height, self.mode, self.patch_size = int(width), height, mode, int(patch_size)

    def plan(self, source_hw: tuple[int, int]) -> tuple[tuple[int, int], PixelMapping]:
        """Resized size (h, w) before crop/pad and the mapping, from the source size alone."""
        h, w = (int(x) for x in source_hw)
        if h < 1 or w < 1:
            raise ValueError(f"image must be at least 1x1, got {h}x{w}")
        if h * w > MAX_SOURCE_PIXELS:
            raise ValueError(f"image of {h}x{w} exceeds the {MAX_SOURCE_PIXELS} pixel limit")
        p, W = self.patch_size, self.width
        if self.mode == "crop":
            if self.height is None:
                rh, rw = round(h * W / w / p) * p, W
                out_h, out_w = min(rh, W), W
            else:
                s = max(W / w, self.height / h)
                rh, rw = max(self.height, round(h * s)), max(W, round(w * s))
                out_h, out_w = self.height, W
            off_x, off_y = -((rw - out_w) // 2), -((rh - out_h) // 2)
        else:
            if self.height is None:
                rh, rw = round(h * W / w), W
                out_h, out_w = -(-rh // p) * p, W
            else:
                s = min(W / w, self.height / h)
                rh, rw = min(self.height, round(h * s)), min(W, round(w * s))
                out_h, out_w = self.height, W
            off_x, off_y = (out_w - rw) // 2, (out_h - rh) // 2
        if rh < 1 or rw < 1 or out_h < p:
            raise ValueError(
                f"image of {h}x{w} is too wide for mode {self.mode!r}: it would be resized to {rh}x{rw}, "
                f"below one {p}-pixel patch row"
            )
        if rh * rw > MAX_RESIZED_PIXELS:
            raise ValueError(f"image of {h}x{w} is too tall for mode {self.mode!r}: resized to {rh}x{rw} pixels")
        mapping = PixelMapping((h, w), (out_h, out_w), rw / w, rh / h, float(off_x), float(off_y))
        return (rh, rw), mapping

    def prepare_array(self, rgb) -> tuple[np.ndarray, PixelMapping]:
        """(float32 [3, h, w] in [0, 1], mapping) as numpy."""
        rgb = _check_image(rgb)
        (rh, rw), m = self.plan(rgb.shape[:2])  # size checks first: a huge image is rejected before any copy
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)
        h, w = rgb.shape[:2]
        shrink = rh < h and rw < w
        interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        resized = cv2.resize(np.ascontiguousarray(rgb), (rw, rh), interpolation=interp)  # uint8: saturates
        out_h, out_w = m.model_hw
        if self.mode == "crop":
            y0, x0 = int(-m.offset_y), int(-m.offset_x)
            img = resized[y0 : y0 + out_h, x0 : x0 + out_w].astype(np.float32) / 255.0
        else:
            img = np.ones((out_h, out_w, 3), dtype=np.float32)
            y0, x0 = int(m.offset_y), int(m.offset_x)
            img[y0 : y0 + rh, x0 : x0 + rw] = resized.astype(np.float32) / 255.0
        return np.ascontiguousarray(img.transpose(2, 0, 1)), m

    def prepare(self, rgb) -> tuple[torch.Tensor, PixelMapping]:
        """RGB uint8 (h, w, 3) (grey (h, w) is replicated) -> (tensor float32 [3, h', w'] in [0, 1], mapping)."""
        arr, m = self.prepare_array(rgb)
        return torch.from_numpy(arr), m


def _check_image(rgb) -> np.ndarray:
    if isinstance(rgb, torch.Tensor):
        raise TypeError("Preprocessor.prepare takes a numpy uint8 (h, w, 3) RGB image, not a tensor")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {rgb.dtype}")
    if rgb.ndim == 3 and rgb.shape[2] == 1:
        rgb = rgb[:, :, 0]
    if not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"image must be (h, w, 3) RGB or (h, w) grey, got shape {rgb.shape}")
    return rgb
