"""Rolling key/value caches for streaming.

A :class:`RollingKVCache` serves one attention layer. It holds the keys/values (after qk-norm and RoPE) of
``anchors`` anchor frames (the first frames of the stream, never evicted) plus the ``window`` most recent frames,
the current frame included. Its storage is allocated once, on the first update, for ``anchors + window`` frames and
never changes afterwards: when it is full, the new frame overwrites the slot of the oldest non-anchor frame.
Slot order does not matter because the model has no temporal position encoding (attention is invariant to the
order of keys). ``window=None`` keeps every frame (the official behaviour): storage then grows by 1.5x when full.

:class:`StreamCache` bundles the caches of a model: one per aggregator global block and one per camera-head
refinement iteration x trunk block (1 token per frame), and reports statistics for diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RollingKVCache:
    """K/V store for one layer: update(k, v) with k, v [B, heads, tokens_per_frame, head_dim] (one frame)
    -> (k_all, v_all) [B, heads, frames_held * tokens_per_frame, head_dim] (views into the storage)."""

    def __init__(
        self,
        window: int | None = None,
        anchors: int = 1,
        dtype: torch.dtype | None = None,
        initial_frames: int = 8,
    ) -> None:
        if window is not None and window < 1:
            raise ValueError("window must be >= 1 (the current frame is part of the window) or None")
        if anchors < 0:
            raise ValueError("anchors must be >= 0")
        self.window = window
        self.anchors = anchors
        self.dtype = dtype
        self.initial_frames = max(1, initial_frames)
        self.reset()

    # -- state -------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every frame and release the storage."""
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.tokens_per_frame: int | None = None
        self.frames_seen = 0  # frames ever written
        self.frames_held = 0  # frames currently stored (valid prefix of the storage)
        self.slot_frame: list[int] = []  # stream index of the frame held in each slot

    @property
    def capacity_frames(self) -> int | None:
        """Frames the cache can hold (None = unlimited)."""
        return None if self.window is None else self.anchors + self.window

    @property
    def allocated_frames(self) -> int:
        return 0 if self.k is None else self.k.shape[2] // self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        """Bytes of allocated storage (keys + values)."""
        if self.k is None:
            return 0
        return self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()

    @property
    def used_bytes(self) -> int:
        """Bytes of the frames actually held."""
        if self.k is None:
            return 0
        per_frame = 2 * self.k[:, :, : self.tokens_per_frame].numel() * self.k.element_size()
        return per_frame * self.frames_held

    # -- writing -----------------------------------------------------------------------------------------------
    def _allocate(self, k: torch.Tensor, frames: int) -> None:
        B, H, n, D = k.shape
        dtype = self.dtype or k.dtype
        new_k = torch.empty(B, H, frames * n, D, dtype=dtype, device=k.device)
        new_v = torch.empty_like(new_k)
        if self.k is not None and self.frames_held:
            used = self.frames_held * n
            new_k[:, :, :used].copy_(self.k[:, :, :used])
            new_v[:, :, :used].copy_(self.v[:, :, :used])
        self.k, self.v = new_k, new_v

    def _next_slot(self) -> int:
        cap = self.capacity_frames
        if cap is None or self.frames_held < cap:
            return self.frames_held  # append
        # full: overwrite the oldest non-anchor frame (ring over the window slots)
        return self.anchors + (self.frames_seen - self.anchors) % self.window

    def write(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store one frame's keys/values; returns the slot used."""
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(f"k and v must both be [B, heads, tokens, head_dim], got {tuple(k.shape)} {tuple(v.shape)}")
        n = k.shape[2]
        if self.tokens_per_frame is None:
            self.tokens_per_frame = n
        elif n != self.tokens_per_frame:
            raise ValueError(f"a frame must have {self.tokens_per_frame} tokens, got {n} (image size changed? reset)")
        if self.k is not None and (k.shape[0], k.shape[1], k.shape[3]) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise ValueError("batch size / heads / head dim changed in a running stream; reset the session")
        cap = self.capacity_frames
        if self.k is None:
            self._allocate(k, cap if cap is not None else self.initial_frames)
        elif cap is None and self.frames_held == self.allocated_frames:
            self._allocate(k, self.allocated_frames + max(1, self.allocated_frames // 2))  # grow by 1.5x
        slot = self._next_slot()
        s = slice(slot * n, (slot + 1) * n)
        self.k[:, :, s].copy_(k)
        self.v[:, :, s].copy_(v)
        if slot == self.frames_held:
            self.frames_held += 1
            self.slot_frame.append(self.frames_seen)
        else:
            self.slot_frame[slot] = self.frames_seen
        self.frames_seen += 1
        return slot

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of every held frame: [B, heads, frames_held * tokens_per_frame, head_dim]."""
        assert self.k is not None, "empty cache"
        used = self.frames_held * self.tokens_per_frame
        return self.k[:, :, :used], self.v[:, :, :used]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention-layer contract: store the new frame, return all held keys/values (new frame included)."""
        self.write(k, v)
        return self.held()

    def flash_buffers(self, k: torch.Tensor, v: torch.Tensor):
        """For flash_attn_with_kvcache: store the frame, return (k_storage, v_storage, valid_tokens)."""
        self.write(k, v)
        return self.k, self.v, self.frames_held * self.tokens_per_frame

    def __repr__(self) -> str:
        return (
            f"RollingKVCache(window={self.window}, anchors={self.anchors}, held={self.frames_held}, "
            f"seen={self.frames_seen}, bytes={self.nbytes})"
        )


@dataclass
class CacheStats:
    frames_seen: int
    frames_held: int
    capacity_frames: int | None
    aggregator_bytes: int
    camera_bytes: int

    @property
    def nbytes(self) -> int:
        return self.aggregator_bytes + self.camera_bytes

    def as_dict(self) -> dict:
        return {
            "frames_seen": self.frames_seen,
            "frames_held": self.frames_held,
            "capacity_frames": self.capacity_frames,
            "aggregator_bytes": self.aggregator_bytes,
            "camera_bytes": self.camera_bytes,
            "nbytes": self.nbytes,
        }


class StreamCache:
    """All caches of one stream: ``aggregator[i]`` for global block i, ``camera[it][j]`` for camera-head
    refinement iteration ``it`` and trunk block ``j``."""

    def __init__(
        self,
        num_global_blocks: int,
        camera_iterations: int = 0,
        camera_trunk_depth: int = 0,
        window: int | None = None,
        anchors: int = 1,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.window = window
        self.anchors = anchors
        self.aggregator = [RollingKVCache(window, anchors, dtype) for _ in range(num_global_blocks)]
        self.camera = [
            [RollingKVCache(window, anchors, dtype) for _ in range(camera_trunk_depth)] for _ in range(camera_iterations)
        ]

    def all_caches(self) -> list[RollingKVCache]:
        return self.aggregator + [c for row in self.camera for c in row]

    def reset(self) -> None:
        for c in self.all_caches():
            c.reset()

    @property
    def frames_seen(self) -> int:
        return self.aggregator[0].frames_seen if self.aggregator else 0

    def stats(self) -> CacheStats:
        first = self.aggregator[0] if self.aggregator else None
        return CacheStats(
            frames_seen=first.frames_seen if first else 0,
            frames_held=first.frames_held if first else 0,
            capacity_frames=first.capacity_frames if first else None,
            aggregator_bytes=sum(c.nbytes for c in self.aggregator),
            camera_bytes=sum(c.nbytes for row in self.camera for c in row),
        )

    def storage_nbytes(self) -> int:
        """Bytes of all allocated K/V storage (distinct storages counted once)."""
        seen: set[int] = set()
        total = 0
        for c in self.all_caches():
            for t in (c.k, c.v):
                if t is None:
                    continue
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        return total
