"""Multi-head self-attention with qk-norm, 2D RoPE, an optional KV cache and switchable kernels.

Backends (one switch, `backend=`):
- "sdpa":  torch.nn.functional.scaled_dot_product_attention (default).
- "eager": plain softmax(q k^T / sqrt(d)) v, for checking the others.
- "flash": flash-attn (imported only when used; needs the package and CUDA). Uses `flash_attn_with_kvcache`
  when the KV cache exposes its preallocated buffers (our RollingKVCache does), `flash_attn_func` otherwise.
  Calls with an explicit attention mask (the frame-causal training forward) go through SDPA instead, because
  flash-attn has no arbitrary masks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "eager", "flash")

_flash_mod: Any = None


def _flash_attn():
    """Import flash_attn lazily; raise a clear error when it cannot be used."""
    global _flash_mod
    if _flash_mod is None:
        if not torch.cuda.is_available():
            raise RuntimeError("attention backend 'flash' needs CUDA; use backend='sdpa' on this machine")
        try:
            import flash_attn  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "attention backend 'flash' needs the flash-attn package (pip install flash-attn); "
                "use backend='sdpa' otherwise"
            ) from e
        _flash_mod = flash_attn
    return _flash_mod


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def attention_eager(q, k, v, attn_mask=None):
    """q [B, h, N, d], k/v [B, h, M, d], attn_mask bool [N, M] (True = may attend) -> [B, h, N, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf"))
    attn = attn.softmax(dim=-1)
    return attn @ v


def attention_sdpa(q, k, v, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _flash_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.dtype
    if torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype() if hasattr(torch, "get_autocast_gpu_dtype") else torch.bfloat16
    return torch.bfloat16


def attention_flash(q, k, v):
    """flash_attn_func on [B, h, N, d] tensors (transposed views, no copies when already half precision)."""
    fa = _flash_attn()
    dt = _flash_dtype(q)
    out = fa.flash_attn_func(q.transpose(1, 2).to(dt), k.transpose(1, 2).to(dt), v.transpose(1, 2).to(dt))
    return out.transpose(1, 2).to(q.dtype)


class Attention(nn.Module):
    """x [B, N, C] -> [B, N, C].

    pos: [B, N, 2] integer (y, x) positions for RoPE (needed when rope is set).
    attn_mask: bool [N, N_kv], True = may attend; None = full attention.
    kv_cache: any object with update(k, v) -> (k_all, v_all), k/v [B, heads, N, head_dim] after qk-norm and RoPE;
        the new tokens then attend to all returned keys (attn_mask, if also given, must be [N, N_all]).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: nn.Module | None = None,
        backend: str = "sdpa",
        norm_layer=nn.LayerNorm,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope
        # dropout is kept for API familiarity; inference never uses it
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: Any = None,
        frame_causal: int | None = None,
    ) -> torch.Tensor:
        """frame_causal=P: x holds consecutive frames of P tokens and each frame attends to itself and the frames
        before it (the same result as a block-causal attn_mask, without materialising an [N, N] mask)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if pos is None:
                raise ValueError("Attention with RoPE needs pos [B, N, 2]")
            q = self.rope(q, pos)
            k = self.rope(k, pos)

        if frame_causal is not None:
            if kv_cache is not None or attn_mask is not None:
                raise ValueError("frame_causal cannot be combined with kv_cache or attn_mask")
            P = frame_causal
            if N % P:
                raise ValueError(f"{N} tokens are not whole frames of {P}")
            out = torch.cat(
                [self._attend(q[:, :, s : s + P], k[:, :, : s + P], v[:, :, : s + P], None) for s in range(0, N, P)],
                dim=2,
            )
        elif self.backend == "flash" and attn_mask is None and x.is_cuda and kv_cache is not None and hasattr(
            kv_cache, "flash_buffers"
        ):
            out = self._flash_with_cache(q, k, v, kv_cache)
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(k, v)
            out = self._attend(q, k, v, attn_mask)

        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def _attend(self, q, k, v, attn_mask):
        """Dispatch to the configured kernel: q [B, h, N, d], k/v [B, h, M, d], attn_mask bool [N, M] or None."""
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a bool tensor (True = may attend)")
        if self.backend == "eager":
            return attention_eager(q, k, v, attn_mask)
        if self.backend == "flash":
            if not q.is_cuda:
                _flash_attn()  # raises the clear error
            elif attn_mask is None:
                return attention_flash(q, k, v)
            # flash-attn has no arbitrary masks: masked calls use SDPA
        return attention_sdpa(q, k, v, attn_mask)

    def _flash_with_cache(self, q, k, v, kv_cache):
        """flash_attn_with_kvcache over the cache's preallocated [B, h, cap, d] buffers (valid prefix)."""
        fa = _flash_attn()
        k_buf, v_buf, n_valid = kv_cache.flash_buffers(k, v)  # writes k, v into the cache
        dt = k_buf.dtype
        if dt not in (torch.float16, torch.bfloat16):
            k_all, v_all = k_buf[:, :, :n_valid], v_buf[:, :, :n_valid]
            return attention_flash(q, k_all, v_all)
        seqlens = torch.full((q.shape[0],), n_valid, dtype=torch.int32, device=q.device)
        out = fa.flash_attn_with_kvcache(
            q.transpose(1, 2).to(dt), k_buf.transpose(1, 2), v_buf.transpose(1, 2), cache_seqlens=seqlens
        )
        return out.transpose(1, 2).to(q.dtype)


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every Attention inside `module` to `backend` ("sdpa" | "eager" | "flash")."""
    check_backend(backend)
    for m in module.modules():
        if isinstance(m, Attention):
            m.backend = backend
    return module
