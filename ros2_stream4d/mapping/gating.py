"""Keyframe gate: skip near-duplicate frames (a robot standing still) so they neither cost model time nor push
useful frames out of the KV cache window."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class GateDecision:
    keep: bool
    reason: str  # "first" | "changed" | "max_skip" | "size_changed" | "duplicate" | "disabled"
    difference: float  # mean |grey - reference grey| in [0, 1] on the downsampled image (nan for "first")
    skipped: int  # frames skipped in a row before this one


class KeyframeGate:
    """A frame is a duplicate when the mean absolute difference of its downsampled grey image to the last KEPT
    frame is below ``threshold`` (0..1 of full scale); after ``max_skip`` duplicates in a row one is kept anyway,
    so the pose keeps updating slowly. Comparing to the last kept frame (not the previous one) means a slow drift
    still triggers a keyframe once it adds up.
    """

    def __init__(self, threshold: float = 0.01, max_skip: int = 30, size: tuple[int, int] = (64, 48),
                 enabled: bool = True):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if max_skip < 0:
            raise ValueError(f"max_skip must be >= 0, got {max_skip}")
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"size must be positive (width, height), got {size}")
        self.threshold, self.max_skip, self.size, self.enabled = float(threshold), int(max_skip), tuple(size), enabled
        self.reset()

    def reset(self) -> None:
        self._ref: np.ndarray | None = None
        self._ref_shape: tuple[int, ...] | None = None
        self._skipped = 0

    def _thumb(self, rgb: np.ndarray) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim not in (2, 3) or (rgb.ndim == 3 and rgb.shape[2] not in (1, 3)):
            raise ValueError(f"gate expects a uint8 (h, w) or (h, w, 3) image, got {rgb.dtype} {rgb.shape}")
        grey = rgb.reshape(rgb.shape[0], rgb.shape[1], -1).mean(axis=2, dtype=np.float32) / 255.0
        return cv2.resize(grey, self.size, interpolation=cv2.INTER_AREA)

    def check(self, rgb) -> GateDecision:
        """Decide for this frame; a kept frame becomes the new reference."""
        if not self.enabled:
            return GateDecision(True, "disabled", float("nan"), 0)
        thumb = self._thumb(rgb)
        shape = np.shape(rgb)
        if self._ref is None:
            return self._keep(thumb, shape, "first", float("nan"))
        if shape != self._ref_shape:
            return self._keep(thumb, shape, "size_changed", float("nan"))
        diff = float(np.abs(thumb - self._ref).mean())
        if diff >= self.threshold:
            return self._keep(thumb, shape, "changed", diff)
        if self._skipped >= self.max_skip:
            return self._keep(thumb, shape, "max_skip", diff)
        self._skipped += 1
        return GateDecision(False, "duplicate", diff, self._skipped)

    def _keep(self, thumb, shape, reason: str, diff: float) -> GateDecision:
        skipped, self._skipped = self._skipped, 0
        self._ref, self._ref_shape = thumb, shape
        return GateDecision(True, reason, diff, skipped)
