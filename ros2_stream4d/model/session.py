"""The streaming-session protocol: what the mapping layer needs from a model stream.

Implemented by StreamVGGT's StreamSession, Stream4DSmall's SmallSession and the sim oracle (sim/oracle.py); the
reconstructor and pipeline call exactly these members, nothing is probed.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from .kv_cache import CacheStats


@runtime_checkable
class StreamingSession(Protocol):
    window: int | None  # rolling window in frames besides the anchors (None = unlimited or no cache)
    anchors: int

    @property
    def frames_seen(self) -> int: ...

    def step(self, image: torch.Tensor, stamp_ns: int | None = None, mapping: Any = None) -> dict[str, torch.Tensor]:
        """One frame [B, 3, H, W] in [0, 1] -> outputs (pose_enc, depth, depth_conf, ...). stamp_ns and mapping
        (the frame's preprocess.PixelMapping) serve sessions that replay recorded data (the oracle)."""
        ...

    def reset(self) -> None:
        """Forget the stream: the next frame is a new first frame."""
        ...

    def stats(self) -> CacheStats | None:
        """The KV cache's fill and bytes; None for a session without a cache."""
        ...

    def shrunk(self, window: int) -> StreamingSession | None:
        """After a device out-of-memory error: a new empty session with this smaller window (this one's cache freed
        first), or None when the session cannot shrink (no model cache)."""
        ...
