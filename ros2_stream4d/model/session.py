"""The streaming-session protocol: what the mapping layer needs from a model stream.

Implemented by StreamVGGT's StreamSession, Stream4DSmall's SmallSession and the sim oracle (sim/oracle.py); the
reconstructor and pipeline call exactly these members, nothing is probed.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from .kv_cache import CacheStats


def pooled_descriptor(patch_tokens: torch.Tensor) -> torch.Tensor:
    """A frame's global place descriptor from a model's patch tokens [..., P, D]: the mean token, L2-normalised
    [..., D] (float32). Pooled features of a pretrained encoder / aggregator, as in the issue's place recognition."""
    mean = patch_tokens.float().mean(dim=-2)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@runtime_checkable
class StreamingSession(Protocol):
    window: int | None  # rolling window in frames besides the anchors (None = unlimited or no cache)
    anchors: int

    @property
    def frames_seen(self) -> int: ...

    def step(self, image: torch.Tensor, stamp_ns: int | None = None, mapping: Any = None) -> dict[str, torch.Tensor]:
        """One frame [B, 3, H, W] in [0, 1] -> outputs (pose_enc, depth, depth_conf, ...). stamp_ns and mapping
        (the frame's preprocess.PixelMapping) serve sessions that replay recorded data (the oracle). A learned model
        also returns ``descriptor`` [B, D]: its place descriptor (``pooled_descriptor`` of its patch tokens), which
        the back-end's loop closure uses instead of the classical one; sessions without tokens (the oracle) do not."""
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
