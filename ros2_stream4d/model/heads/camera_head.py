"""Camera head: iterative pose refinement from the camera tokens of the last aggregator layer.

Each of `num_iterations` steps embeds the current pose estimate (a learned empty pose at first), turns it into an
adaLN modulation (shift, scale, gate) of the normalised camera tokens, runs the trunk (transformer blocks over the
frames, frame-causal) and adds the predicted delta to the pose. The output of every step is activated and returned.

Streaming: the trunk attends over frames, so a streamed frame needs the keys/values of the earlier frames for the
same trunk block AND the same refinement iteration. `kv_caches[i][j]` is the cache of iteration i, trunk block j; with
it, streaming one frame at a time reproduces the causal forward exactly. (The official StreamVGGT shares one cache
per trunk block across the four iterations, so its streamed poses differ from its own causal forward.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ros2_stream4d.model.layers import Block, Mlp

from .head_act import activate_pose

__all__ = ["CameraHead", "modulate"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class CameraHead(nn.Module):
    """Predict absT_quaR_FoV pose encodings [B, S, 9] from aggregated tokens.

    Args:
        dim_in: token width (2 * embed_dim).
        trunk_depth: number of trunk blocks.
        pose_encoding_type: only "absT_quaR_FoV" (9 numbers).
        num_heads, mlp_ratio, init_values: of the trunk blocks (no RoPE, no qk-norm, LayerNorm eps 1e-5).
        trans_act, quat_act, fl_act: activations of translation, quaternion and field of view.
        backend: attention backend of the trunk ("sdpa", "eager", "flash").
    """

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        pose_encoding_type: str = "absT_quaR_FoV",
        num_heads: int = 16,
        mlp_ratio: float = 4,
        init_values: float = 0.01,
        trans_act: str = "linear",
        quat_act: str = "linear",
        fl_act: str = "relu",
        backend: str = "sdpa",
    ):
        super().__init__()
        if pose_encoding_type != "absT_quaR_FoV":
            raise ValueError(f"unsupported pose encoding {pose_encoding_type!r} (only absT_quaR_FoV)")
        self.target_dim = 9
        self.trans_act = trans_act
        self.quat_act = quat_act
        self.fl_act = fl_act
        self.trunk_depth = trunk_depth

        self.trunk = nn.Sequential(
            *[
                Block(dim=dim_in, num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=init_values, backend=backend)
                for _ in range(trunk_depth)
            ]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in, bias=True))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(in_features=dim_in, hidden_features=dim_in // 2, out_features=self.target_dim)

    @staticmethod
    def new_kv_caches(cache_factory: Callable[[], Any], trunk_depth: int, num_iterations: int = 4) -> list[list[Any]]:
        """kv_caches[i][j] = cache_factory() for every refinement iteration i and trunk block j."""
        return [[cache_factory() for _ in range(trunk_depth)] for _ in range(num_iterations)]

    def forward(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        num_iterations: int = 4,
        kv_caches: Sequence[Sequence[Any]] | None = None,
    ) -> list[torch.Tensor]:
        """Pose encodings, one [B, S, 9] tensor per refinement iteration (the last is the final estimate).

        aggregated_tokens_list[-1] is [B, S, P, dim_in]; its token 0 of every frame is the camera token.
        kv_caches None: causal forward over the S frames (frame s attends to frames <= s).
        kv_caches given: streaming; S must be 1 and kv_caches[i][j] is the cache of iteration i, trunk block j (an
        object with update(k, v) -> (k_all, v_all), see layers.Attention), which this call extends by one frame.
        """
        tokens = aggregated_tokens_list[-1]
        pose_tokens = tokens[:, :, 0].to(self.token_norm.weight.dtype)
        pose_tokens = self.token_norm(pose_tokens)
        return self.trunk_fn(pose_tokens, num_iterations, kv_caches)

    def trunk_fn(
        self, pose_tokens: torch.Tensor, num_iterations: int, kv_caches: Sequence[Sequence[Any]] | None = None
    ) -> list[torch.Tensor]:
        """Iterative refinement on normalised camera tokens [B, S, C]."""
        B, S, _ = pose_tokens.shape
        if kv_caches is not None:
            if S != 1:
                raise ValueError(f"streaming camera head takes one frame at a time, got S={S}")
            if len(kv_caches) < num_iterations or any(len(c) < self.trunk_depth for c in kv_caches[:num_iterations]):
                raise ValueError(
                    f"kv_caches must be indexable [iteration < {num_iterations}][trunk block < {self.trunk_depth}]"
                )
            attn_mask = None
        else:
            # frame-causal: frame s sees frames <= s (True = may attend)
            attn_mask = torch.ones(S, S, dtype=torch.bool, device=pose_tokens.device).tril_()

        pred_pose_enc: torch.Tensor | None = None
        outputs = []
        for it in range(num_iterations):
            if pred_pose_enc is None:
                module_input = self.embed_pose(self.empty_pose_tokens.expand(B, S, -1))
            else:
                pred_pose_enc = pred_pose_enc.detach()  # no backprop through the refinement chain
                module_input = self.embed_pose(pred_pose_enc)

            shift, scale, gate = self.poseLN_modulation(module_input).chunk(3, dim=-1)
            x = gate * modulate(self.adaln_norm(pose_tokens), shift, scale) + pose_tokens

            for j, block in enumerate(self.trunk):
                cache = kv_caches[it][j] if kv_caches is not None else None
                x = block(x, attn_mask=attn_mask, kv_cache=cache)

            delta = self.pose_branch(self.trunk_norm(x))
            pred_pose_enc = delta if pred_pose_enc is None else pred_pose_enc + delta
            outputs.append(
                activate_pose(pred_pose_enc, trans_act=self.trans_act, quat_act=self.quat_act, fl_act=self.fl_act)
            )
        return outputs
