"""Model core: layers contract, RoPE, attention backends, config, aggregator and the causal forward (CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import perturb
from torch import nn

from ros2_stream4d.model import ModelConfig, StreamVGGT
from ros2_stream4d.model.aggregator import Aggregator, frame_causal_mask
from ros2_stream4d.model.layers import (
    Attention,
    Block,
    LayerScale,
    Mlp,
    PositionGetter,
    RotaryPositionEmbedding2D,
    build_patch_embed,
    set_attention_backend,
)

H, W = 28, 42  # 2 x 3 patches of 14


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig.small(**kw)


# -- layers ------------------------------------------------------------------------------------------------------------
def test_layer_attributes_and_defaults():
    mlp = Mlp(8, 32)
    assert isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
    assert mlp.fc1.out_features == 32 and mlp.fc2.out_features == 8
    ls = LayerScale(8, init_values=0.5)
    assert torch.allclose(ls.gamma, torch.full((8,), 0.5))
    b = Block(32, 4)
    assert isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity)
    assert b.norm1.eps == 1e-5 and isinstance(b.attn.q_norm, nn.Identity)
    b = Block(32, 4, init_values=0.01, qk_norm=True)
    assert isinstance(b.ls1, LayerScale) and isinstance(b.attn.q_norm, nn.LayerNorm)
    assert b.attn.q_norm.normalized_shape == (8,) and b.attn.k_norm.eps == 1e-5
    keys = set(b.state_dict())
    assert {"attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.bias", "attn.proj.weight", "ls1.gamma",
            "mlp.fc1.weight", "mlp.fc2.bias", "ls2.gamma", "norm1.weight", "norm2.bias"} <= keys


def test_position_getter_row_major():
    pos = PositionGetter()(2, 2, 3, "cpu")
    assert pos.shape == (2, 6, 2)
    assert pos[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_rope_matches_formula_and_is_relative():
    rope = RotaryPositionEmbedding2D(frequency=100.0)
    d = 16
    x = torch.randn(1, 1, 1, d, dtype=torch.float64)
    pos = torch.tensor([[[3, 5]]])
    y = rope(x, pos)
    # y half rotated by position 3, x half by position 5, rotate-half with duplicated frequencies
    half = d // 2
    inv = 1.0 / 100.0 ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    for part, p in ((0, 3), (1, 5)):
        v = x[..., part * half : (part + 1) * half]
        ang = torch.cat([p * inv, p * inv])
        rot = torch.cat([-v[..., half // 2 :], v[..., : half // 2]], dim=-1)
        ref = v * ang.cos() + rot * ang.sin()
        assert torch.allclose(y[..., part * half : (part + 1) * half], ref, atol=1e-6)
    # relative: <R(p) q, R(p') k> depends only on p - p'
    q, k = torch.randn(1, 1, 1, d, dtype=torch.float64), torch.randn(1, 1, 1, d, dtype=torch.float64)
    a = (rope(q, torch.tensor([[[2, 7]]])) * rope(k, torch.tensor([[[1, 3]]]))).sum()
    b = (rope(q, torch.tensor([[[5, 9]]])) * rope(k, torch.tensor([[[4, 5]]]))).sum()
    assert torch.allclose(a, b)
    assert torch.equal(rope(x, torch.zeros(1, 1, 2, dtype=torch.long)), x)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("use_rope", [False, True])
def test_attention_eager_vs_sdpa(qk_norm, use_rope):
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qk_norm=qk_norm, rope=RotaryPositionEmbedding2D() if use_rope else None)
    x = torch.randn(2, 17, 64)
    pos = torch.randint(0, 6, (2, 17, 2))
    mask = torch.rand(17, 17) > 0.5
    mask |= torch.eye(17, dtype=torch.bool)
    for m in (None, mask):
        attn.backend = "sdpa"
        a = attn(x, pos=pos, attn_mask=m)
        attn.backend = "eager"
        b = attn(x, pos=pos, attn_mask=m)
        assert (a - b).abs().max().item() <= 1e-5


class _ListCache:
    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def test_attention_kv_cache_equals_block_causal():
    torch.manual_seed(1)
    blk = Block(32, 4, init_values=0.5, qk_norm=True, rope=RotaryPositionEmbedding2D())
    S, P = 4, 5
    x = torch.randn(1, S * P, 32)
    pos = torch.randint(0, 4, (1, S * P, 2))
    full = blk(x, pos=pos, attn_mask=frame_causal_mask(S, P))
    cache = _ListCache()
    parts = [blk(x[:, s * P : (s + 1) * P], pos=pos[:, s * P : (s + 1) * P], kv_cache=cache) for s in range(S)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    assert cache.k.shape == (1, 4, S * P, 8)


def test_flash_backend_clear_error_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    attn = Attention(32, 4, backend="flash")
    with pytest.raises(RuntimeError, match="flash"):
        attn(torch.randn(1, 3, 32))
    with pytest.raises(ValueError):
        Attention(32, 4, backend="nope")


def test_frame_causal_mask():
    m = frame_causal_mask(3, 2)
    assert m.shape == (6, 6)
    assert m[0].tolist() == [True, True, False, False, False, False]
    assert m[5].all()


# -- config ------------------------------------------------------------------------------------------------------------
def test_config_defaults_are_official():
    c = ModelConfig()
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.num_register_tokens) == (518, 14, 1024, 24, 16, 4)
    assert c.patch_embed == "dinov2_vitl14_reg" and c.camera_num_heads == 16 and c.camera_trunk_depth == 4
    assert c.dpt_layers == (4, 11, 17, 23) and c.dpt_features == 256 and c.dpt_out_channels == (256, 512, 1024, 1024)
    assert c.track_head is True and c.patch_start_idx == 5


def test_config_small_and_validation():
    c = ModelConfig(embed_dim=384, depth=4, num_heads=6, patch_embed="dinov2_vits14_reg", dpt_layers=(0, 1, 2, 3))
    assert c.dpt_layers == (0, 1, 2, 3)
    assert ModelConfig(embed_dim=384, depth=4, num_heads=6, patch_embed="dinov2_vits14_reg").dpt_layers == (0, 1, 2, 3)
    assert ModelConfig.small(depth=3).dpt_layers == (0, 1, 2, 2)
    with pytest.raises(ValueError, match="dpt_layers"):
        ModelConfig(depth=4, dpt_layers=(4, 11, 17, 23))
    with pytest.raises(ValueError):
        ModelConfig(patch_embed="vit_huge")
    with pytest.raises(ValueError):
        ModelConfig(embed_dim=100, num_heads=16)
    assert ModelConfig.from_dict(c.to_dict()) == c


# -- patch embed / aggregator -------------------------------------------------------------------------------------------
def test_dinov2_patch_embed_shapes_and_keys():
    pe = build_patch_embed("dinov2_vits14_reg", 70, 14, 384, depth=1)
    keys = set(pe.state_dict())
    assert {"cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight", "norm.weight",
            "blocks.0.ls1.gamma"} <= keys
    assert pe.pos_embed.shape == (1, 26, 384) and pe.blocks[0].norm1.eps == 1e-6
    assert pe(torch.randn(2, 3, H, W)).shape == (2, 6, 384)
    # at the native square size the pos_embed is used as is
    assert pe(torch.randn(1, 3, 70, 70)).shape == (1, 25, 384)
    with pytest.raises(ValueError):
        build_patch_embed("dinov2_vits14_reg", 70, 14, 256)


def test_pos_embed_interpolation_bicubic_antialias():
    pe = build_patch_embed("dinov2_vits14_reg", 70, 14, 384, depth=0)
    x = torch.zeros(1, 1 + 6, 384)
    out = pe.interpolate_pos_encoding(x, H, W)
    grid = pe.pos_embed[:, 1:].reshape(1, 5, 5, 384).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(2, 3), mode="bicubic", antialias=True)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 6, 384))
    assert torch.equal(out[:, 0], pe.pos_embed[:, 0])


def test_aggregator_output_layout_and_special_tokens():
    torch.manual_seed(0)
    cfg = tiny_cfg(depth=2)
    agg = perturb(Aggregator(cfg)).eval()
    imgs = torch.rand(2, 3, 3, H, W)
    with torch.no_grad():
        outs, psi = agg(imgs)
    assert psi == 5 and len(outs) == 2
    P = 5 + 6
    assert all(o.shape == (2, 3, P, 2 * cfg.embed_dim) for o in outs)
    # first frame is independent of later frames (frame-causal); later frames see earlier ones
    with torch.no_grad():
        outs1, _ = agg(imgs[:, :1])
        assert torch.allclose(outs1[-1][:, 0], outs[-1][:, 0], atol=1e-5)
        imgs2 = imgs.clone()
        imgs2[:, 0] = torch.rand_like(imgs2[:, 0])
        outs2, _ = agg(imgs2)
        assert not torch.allclose(outs2[-1][:, 2], outs[-1][:, 2], atol=1e-4)
        full, _ = agg(imgs, causal=False)
        assert not torch.allclose(full[-1][:, 0], outs[-1][:, 0], atol=1e-4)
        # keep_layers leaves the other outputs out
        kept, _ = agg(imgs, keep_layers=[-1])
        assert kept[0] is None and torch.equal(kept[1], outs[1])


def test_first_frame_uses_special_token_zero():
    cfg = tiny_cfg(depth=2)
    agg = perturb(Aggregator(cfg))
    imgs = torch.rand(1, 3, 3, H, W)
    tokens, _ = agg._embed(imgs, [0, 1, 1])
    assert torch.equal(tokens[0, 0], agg.camera_token[0, 0, 0])
    assert torch.equal(tokens[1, 0], agg.camera_token[0, 1, 0])
    assert torch.equal(tokens[2, 1:5], agg.register_token[0, 1])


# -- full model ------------------------------------------------------------------------------------------------------
def _check_outputs(out, B, S):
    assert out["pose_enc"].shape == (B, S, 9)
    assert out["depth"].shape == (B, S, H, W, 1)
    assert out["depth_conf"].shape == (B, S, H, W)
    assert out["world_points"].shape == (B, S, H, W, 3)
    assert out["world_points_conf"].shape == (B, S, H, W)
    for v in out.values():
        assert torch.isfinite(v).all()


def test_model_forward_shapes_conv():
    torch.manual_seed(0)
    model = perturb(StreamVGGT(tiny_cfg(depth=2, track_head=True))).eval()
    assert {"aggregator", "camera_head", "depth_head", "point_head", "track_head"} <= {n for n, _ in model.named_children()}
    with torch.no_grad():
        out = model(torch.rand(2, 3, 3, H, W))
    _check_outputs(out, 2, 3)
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all()


def test_model_forward_dinov2_vits14():
    torch.manual_seed(0)
    cfg = ModelConfig(
        img_size=70, embed_dim=384, depth=2, num_heads=6, patch_embed="dinov2_vits14_reg", patch_embed_depth=1,
        camera_num_heads=6, camera_trunk_depth=1, dpt_features=16, dpt_out_channels=(8, 16, 32, 32), track_head=False,
    )
    assert cfg.dpt_layers == (0, 1, 1, 1)
    model = perturb(StreamVGGT(cfg)).eval()
    assert model.aggregator.patch_embed.pos_embed.shape == (1, 26, 384)
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, H, W))
    _check_outputs(out, 1, 2)


def test_model_eager_vs_sdpa():
    torch.manual_seed(0)
    model = perturb(StreamVGGT(tiny_cfg(depth=2))).eval()
    imgs = torch.rand(1, 4, 3, H, W)
    with torch.no_grad():
        a = model.set_attention_backend("sdpa")(imgs)
        b = model.set_attention_backend("eager")(imgs)
    assert all(m.backend == "eager" for m in model.modules() if isinstance(m, Attention))
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
    set_attention_backend(model, "sdpa")


def test_bf16_weights_run_with_fp32_heads():
    from ros2_stream4d.model.checkpoint import _set_dtypes

    model = perturb(StreamVGGT(tiny_cfg(depth=2))).eval()
    _set_dtypes(model, torch.bfloat16, torch.float32)
    assert model.aggregator.camera_token.dtype == torch.bfloat16
    assert model.depth_head.norm.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, H, W))
    assert out["depth"].dtype == torch.float32 and torch.isfinite(out["depth"]).all()
    assert math.isfinite(out["pose_enc"].abs().max().item())


def test_causal_forward_frame_loop_equals_mask():
    torch.manual_seed(0)
    model = perturb(StreamVGGT(tiny_cfg(depth=2))).eval()
    imgs = torch.rand(1, 4, 3, H, W)
    with torch.no_grad():
        a = model(imgs)
        model.aggregator.causal_mask_max_elements = 0  # force the per-frame prefix loop
        b = model(imgs)
        model.aggregator.causal_mask_max_elements = Aggregator.causal_mask_max_elements
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
