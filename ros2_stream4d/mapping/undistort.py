"""Lens distortion: images from a distorted lens -> the pinhole images the model, the maps and the outputs assume.

Camera drivers publish ``image_raw`` with a CameraInfo whose ``distortion_model`` and ``d`` describe the lens in
ROS's sensor_msgs naming (sensor_msgs/distortion_models.hpp):

    plumb_bob            k1, k2, p1, p2[, k3]              (OpenCV's standard model, 4 or 5 coefficients)
    rational_polynomial  k1, k2, p1, p2, k3, k4, k5, k6    (OpenCV's rational model, 8 coefficients)
    equidistant          k1, k2, k3, k4                    (OpenCV's fisheye model, cv2.fisheye)

``Undistorter`` remaps such an image to a pinhole image with intrinsics ``K_new`` and no distortion, with remap
maps built once per lens (a small LRU cache keyed by the lens's values). An empty model name or all-zero
coefficients mean a pinhole camera already: nothing is done.

Pixels: mapping/preprocess.py's convention, see its module docstring. OpenCV's K, initUndistortRectifyMap, remap,
undistortPoints and projectPoints all use that same convention, so no half-pixel shift appears in this module.

K_new, the intrinsics of the undistorted image (``new_K``):
    "P" (default)  P[:3, :3] of the CameraInfo, K when P is absent or zero. This is what ROS's image_proc (rectify,
                   image_geometry) uses for ``image_rect``, so the depth lines up pixel for pixel with any
                   rectified image downstream; camera_calibration writes P from getOptimalNewCameraMatrix with
                   alpha 0, i.e. no black borders for a calibrated camera. Sim bags write P = [K | 0], so the
                   undistorted image is exactly the ground truth's pinhole geometry (K) and evaluation stays exact.
    "K"            keep K: the centre keeps its scale; barrel lenses lose the outer field of view, pincushion
                   lenses get black corners.
    "optimal"      cv2.getOptimalNewCameraMatrix(alpha=0) (fisheye: estimateNewCameraMatrixForUndistortRectify,
                   balance 0): every output pixel sees the camera image (no black borders).
The rectification rotation R is not applied (R = I): the depth must stay in the image's optical frame, whose TF the
node publishes. The published depth CameraInfo carries K_new, distortion_model "plumb_bob" and D all zeros.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# name -> accepted coefficient counts (the first is the canonical count the coefficients are padded to)
DISTORTION_MODELS = {"plumb_bob": (5, 4), "rational_polynomial": (8,), "equidistant": (4,)}
NEW_K_CHOICES = ("P", "K", "optimal")
DEFAULT_CACHE_SIZE = 4
# Undistorting points is iterative; these settle to well below 1e-6 px for any lens that does not fold the image.
_POINT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 200, 1e-14)
MAX_INVERSION_ERROR_PX = 1e-3


def is_distorted(model: str, D: Sequence[float]) -> bool:
    """True when a CameraInfo's (distortion_model, d) needs undistorting. An empty model or all-zero (or no)
    coefficients is a pinhole camera. Raises ValueError for an unknown model with non-zero coefficients (it cannot
    be undistorted, and passing the image on as pinhole would silently bend the geometry) or for a known model
    with the wrong number of coefficients."""
    coeffs = [float(c) for c in D]
    if not model or not any(c != 0.0 for c in coeffs):
        return False
    if model not in DISTORTION_MODELS:
        raise ValueError(f"unknown distortion model {model!r} (with non-zero coefficients); supported: "
                         f"{', '.join(DISTORTION_MODELS)}")
    counts = DISTORTION_MODELS[model]
    if len(coeffs) not in counts:
        raise ValueError(f"distortion model {model!r} takes {' or '.join(map(str, counts))} coefficients, "
                         f"got {len(coeffs)}")
    if not all(np.isfinite(coeffs)):
        raise ValueError(f"distortion coefficients of {model!r} must be finite, got {coeffs}")
    return True


@dataclass(frozen=True)
class LensModel:
    """One camera's intrinsics and lens, as plain tuples: hashable and equal by value (the cache key).
    Build with ``create`` or ``from_camera_info`` (they validate); ``D`` is padded to the model's canonical
    length, and is () for a pinhole camera."""

    width: int
    height: int
    K: tuple[float, ...]  # 9, row-major
    distortion_model: str = ""
    D: tuple[float, ...] = ()
    P: tuple[float, ...] | None = None  # 12, row-major, or None

    @classmethod
    def create(cls, K, distortion_model: str, D, width: int, height: int, P=None) -> LensModel:
        width, height = int(width), int(height)
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        K = np.asarray(K, np.float64).reshape(-1)
        if K.shape != (9,) or not np.isfinite(K).all():
            raise ValueError(f"K must be 9 finite values, got {K.tolist()}")
        model = str(distortion_model or "")
        D = [float(c) for c in np.asarray(D if D is not None else (), np.float64).reshape(-1)]
        if is_distorted(model, D):
            if K[0] <= 0 or K[4] <= 0 or K[8] != 1.0:
                raise ValueError(f"cannot undistort with an uncalibrated or invalid K {K.tolist()}")
            D = D + [0.0] * (DISTORTION_MODELS[model][0] - len(D))
        else:
            model, D = (model if model in DISTORTION_MODELS else ""), []
        P_t = None
        if P is not None:
            P = np.asarray(P, np.float64).reshape(-1)
            if P.shape != (12,) or not np.isfinite(P).all():
                raise ValueError(f"P must be 12 finite values, got {P.tolist()}")
            if P[0] > 0 and P[5] > 0 and P[10] == 1.0:  # drivers that leave P zero: unusable, ignore it
                P_t = tuple(float(x) for x in P)
        return cls(width, height, tuple(float(x) for x in K), model, tuple(D), P_t)

    @classmethod
    def from_camera_info(cls, info) -> LensModel:
        """From a sensor_msgs/CameraInfo of rclpy or rosbags alike (fields width, height, k, d, p,
        distortion_model)."""
        return cls.create(info.k, info.distortion_model, info.d, info.width, info.height, info.p)

    @property
    def distorted(self) -> bool:
        return bool(self.D)

    @property
    def K_matrix(self) -> np.ndarray:
        return np.array(self.K, np.float64).reshape(3, 3)

    @property
    def D_array(self) -> np.ndarray:
        return np.array(self.D, np.float64)

    @property
    def fisheye(self) -> bool:
        return self.distortion_model == "equidistant"

    def unproject(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (u, v) of this camera's (distorted) image -> (x, y): the ray (x, y, 1) in the optical frame.
        Exact up to MAX_INVERSION_ERROR_PX (checked by projecting back); ValueError where the coefficients fold
        the image so that no unique ray exists."""
        u, v = np.broadcast_arrays(np.asarray(u, np.float64), np.asarray(v, np.float64))
        shape = u.shape
        pts = np.stack([u.reshape(-1), v.reshape(-1)], -1)[:, None, :]
        K = self.K_matrix
        if not self.distorted:
            return (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
        if self.fisheye:
            xy = cv2.fisheye.undistortPoints(pts, K, self.D_array, criteria=_POINT_CRITERIA)
        else:
            xy = cv2.undistortPoints(pts, K, self.D_array, criteria=_POINT_CRITERIA)
        x, y = xy[:, 0, 0], xy[:, 0, 1]
        pu, pv = self.project(x, y)
        err = np.hypot(pu - pts[:, 0, 0], pv - pts[:, 0, 1])
        bad = ~(err <= MAX_INVERSION_ERROR_PX)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{self.distortion_model} {list(self.D)} cannot be inverted at pixel "
                             f"({pts[i, 0, 0]:.1f}, {pts[i, 0, 1]:.1f}) (error {err[i]:.3g} px): the lens model folds "
                             "the image there")
        return x.reshape(shape), y.reshape(shape)

    def project(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """The forward lens model: rays (x, y, 1) -> pixels (u, v) of this camera's (distorted) image."""
        x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
        shape = x.shape
        K = self.K_matrix
        if not self.distorted:
            return x * K[0, 0] + K[0, 2], y * K[1, 1] + K[1, 2]
        obj = np.stack([x.reshape(-1), y.reshape(-1), np.ones(x.size)], -1)
        zero = np.zeros(3)
        if self.fisheye:
            uv, _ = cv2.fisheye.projectPoints(obj[None], zero, zero, K, self.D_array)
            uv = uv[0]
        else:
            uv, _ = cv2.projectPoints(obj, zero, zero, K, self.D_array)
            uv = uv[:, 0]
        return uv[:, 0].reshape(shape), uv[:, 1].reshape(shape)


@dataclass(frozen=True)
class RectifyMaps:
    """Remap maps from the distorted image to the pinhole image with intrinsics K_new (same size).
    ``valid``: output pixels whose every bilinear tap lies inside the camera image (False on black borders)."""

    lens: LensModel
    K_new: np.ndarray
    map1: np.ndarray  # fixed-point maps (CV_16SC2 + CV_16UC1): 1/32 px resolution, the fast remap path
    map2: np.ndarray
    valid: np.ndarray


class Undistorter:
    """Undistorts images given their LensModel; maps are built once per lens and kept in a bounded LRU cache.

    ``undistort(image, lens) -> (image_undistorted, K_new)``; for a pinhole lens it returns the input itself and
    K. See the module docstring for ``new_K``.
    """

    def __init__(self, new_K: str = "P", cache_size: int = DEFAULT_CACHE_SIZE,
                 interpolation: int = cv2.INTER_LINEAR):
        if new_K not in NEW_K_CHOICES:
            raise ValueError(f"new_K must be one of {NEW_K_CHOICES}, got {new_K!r}")
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.new_K, self.cache_size, self.interpolation = new_K, int(cache_size), interpolation
        self._cache: OrderedDict[LensModel, RectifyMaps] = OrderedDict()
        self.builds = 0  # how many times maps were built (cache misses)

    def maps(self, lens: LensModel) -> RectifyMaps | None:
        """The (cached) maps of a distorted lens; None for a pinhole one."""
        if not lens.distorted:
            return None
        hit = self._cache.get(lens)
        if hit is not None:
            self._cache.move_to_end(lens)
            return hit
        maps = self._build(lens)
        self._cache[lens] = maps
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return maps

    def output_K(self, lens: LensModel) -> np.ndarray:
        """K of the image ``undistort`` returns for this lens (K itself for a pinhole lens)."""
        maps = self.maps(lens)
        return lens.K_matrix if maps is None else maps.K_new.copy()

    def undistort(self, image: np.ndarray, lens: LensModel, interpolation: int | None = None,
                  border_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) or (H, W, C) image of this lens -> (pinhole image of the same size and dtype, K_new).
        Output pixels outside the camera's view get ``border_value``."""
        image = np.asarray(image)
        if image.shape[:2] != (lens.height, lens.width):
            raise ValueError(f"image {image.shape[1]}x{image.shape[0]} does not match the camera model "
                             f"{lens.width}x{lens.height}")
        maps = self.maps(lens)
        if maps is None:
            return image, lens.K_matrix
        interp = self.interpolation if interpolation is None else interpolation
        out = cv2.remap(np.ascontiguousarray(image), maps.map1, maps.map2, interp, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=border_value)
        return out, maps.K_new.copy()

    def undistort_depth(self, depth: np.ndarray, lens: LensModel) -> tuple[np.ndarray, np.ndarray]:
        """A float depth image registered to this camera (e.g. aligned depth) -> (depth in the undistorted
        geometry, K_new): nearest neighbour (never blends depths across an edge), NaN outside the view."""
        depth = np.asarray(depth, np.float32)
        return self.undistort(depth, lens, cv2.INTER_NEAREST, float("nan"))

    def __len__(self) -> int:
        return len(self._cache)

    def _build(self, lens: LensModel) -> RectifyMaps:
        K, D, size = lens.K_matrix, lens.D_array, (lens.width, lens.height)
        if self.new_K == "P" and lens.P is not None:
            K_new = np.array(lens.P, np.float64).reshape(3, 4)[:, :3].copy()
        elif self.new_K == "optimal":
            if lens.fisheye:
                K_new = cv2.fisheye.estimateNewCameraMatrixForUndistortRectify(K, D, size, np.eye(3), balance=0.0)
            else:
                K_new, _ = cv2.getOptimalNewCameraMatrix(K, D, size, 0.0, size)
            K_new = np.asarray(K_new, np.float64)
        else:
            K_new = K.copy()
        init = cv2.fisheye.initUndistortRectifyMap if lens.fisheye else cv2.initUndistortRectifyMap
        mx, my = init(K, D, np.eye(3), K_new, size, cv2.CV_32FC1)
        valid = (mx >= 0) & (mx <= lens.width - 1) & (my >= 0) & (my <= lens.height - 1)
        map1, map2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
        self.builds += 1
        for a in (K_new, map1, map2, valid):
            a.setflags(write=False)
        return RectifyMaps(lens, K_new, map1, map2, valid)
