"""Heads: official key names and shapes (full size, meta device), small-configuration runs on CPU, the camera head's
streaming-equals-causal property with per-iteration KV caches, and the DPT / tracker building blocks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from ros2_stream4d.model.heads import CameraHead, DPTHead, TrackHead
from ros2_stream4d.model.heads.head_act import activate_head, activate_pose, inverse_log_transform
from ros2_stream4d.model.heads.track_modules.blocks import CorrBlock
from ros2_stream4d.model.heads.utils import create_uv_grid, position_grid_to_embed

REPO = Path(__file__).resolve().parents[1]
TSV_NAME = "streamvggt_state_dict_keys.tsv"


def _find_key_list() -> Path | None:
    env = os.environ.get("STREAM4D_REFERENCE_DIR")
    candidates = [Path(env) / TSV_NAME] if env else []
    candidates += [
        REPO / "test" / "data" / TSV_NAME,
        REPO / "ros2_stream4d" / "model" / TSV_NAME,
        REPO / "shared" / "reference" / TSV_NAME,
        REPO.parent / "shared" / "reference" / TSV_NAME,
    ]
    return next((p for p in candidates if p.is_file()), None)


def _reference_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    path = _find_key_list()
    if path is None:
        pytest.skip(f"{TSV_NAME} not found (set STREAM4D_REFERENCE_DIR)")
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("key\t"):
            continue
        key, shape, _dtype = line.split("\t")
        if key.startswith(prefix):
            out[key[len(prefix) :]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert out, f"no keys with prefix {prefix} in {path}"
    return out


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _full_head(prefix: str) -> torch.nn.Module:
    with torch.device("meta"):
        if prefix == "camera_head.":
            return CameraHead()
        if prefix == "depth_head.":
            return DPTHead(2048, output_dim=2, activation="exp", conf_activation="expp1")
        if prefix == "point_head.":
            return DPTHead(2048, output_dim=4, activation="inv_log", conf_activation="expp1")
        if prefix == "track_head.":
            return TrackHead(2048)
    raise AssertionError(prefix)


# ----------------------------------------------------------------------------------------- official keys & shapes
@pytest.mark.parametrize(
    "prefix,count", [("camera_head.", 69), ("depth_head.", 62), ("point_head.", 62), ("track_head.", 394)]
)
def test_full_size_keys_and_shapes_match_reference(prefix, count):
    ref = _reference_shapes(prefix)
    ours = _shapes(_full_head(prefix))
    assert len(ref) == count
    missing = sorted(set(ref) - set(ours))
    unexpected = sorted(set(ours) - set(ref))
    assert not missing and not unexpected, f"missing {missing[:10]} unexpected {unexpected[:10]}"
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not wrong, f"mis-shaped: {list(wrong.items())[:10]}"


def test_full_size_parameter_counts():
    # independent of the key list: total parameters of each full-size head
    n = sum(t.numel() for t in _full_head("camera_head.").state_dict().values())
    assert (
        n
        == 4
        * (2 * 2048 * 2 + 3 * 2048 * 2048 + 3 * 2048 + 2048 * 2048 + 2048 + 2 * 2048 + 2 * 2048 * 8192 + 8192 + 2048)
        + 4 * 2048
        + 9
        + 9 * 2048
        + 2048
        + 2048 * 6144
        + 6144
        + 2048 * 1024
        + 1024
        + 1024 * 9
        + 9
    )


def test_full_size_heads_load_a_state_dict_strict():
    # a state dict with the full-size key set loads strict (meta -> meta assign)
    for prefix in ("camera_head.", "depth_head.", "point_head.", "track_head."):
        head = _full_head(prefix)
        sd = {k: torch.empty(v.shape, device="meta") for k, v in head.state_dict().items()}
        head.load_state_dict(sd, strict=True, assign=True)


# ------------------------------------------------------------------------------------------------ small configs
SMALL = dict(features=32, out_channels=(16, 32, 64, 64), intermediate_layer_idx=(0, 1, 2, 3))


def _tokens(B, S, H, W, dim, n_layers=4, n_special=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = n_special + (H // 14) * (W // 14)
    return [torch.randn(B, S, P, dim, generator=g) for _ in range(n_layers)]


def _randomize(module, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.mark.parametrize("hw", [(14, 14), (14, 28), (42, 70), (56, 42)])
def test_dpt_small_shapes_and_activations(hw):
    H, W = hw
    B, S = 2, 3
    torch.manual_seed(0)
    depth_head = DPTHead(128, output_dim=2, activation="exp", **SMALL).eval()
    point_head = DPTHead(128, output_dim=4, activation="inv_log", **SMALL).eval()
    toks = _tokens(B, S, H, W, 128)
    images = torch.rand(B, S, 3, H, W)
    with torch.no_grad():
        depth, dconf = depth_head(toks, images, 5)
        pts, pconf = point_head(toks, images, 5)
    assert depth.shape == (B, S, H, W, 1) and dconf.shape == (B, S, H, W)
    assert pts.shape == (B, S, H, W, 3) and pconf.shape == (B, S, H, W)
    for t in (depth, dconf, pts, pconf):
        assert torch.isfinite(t).all()
    assert (depth > 0).all()  # exp
    assert (dconf > 1).all() and (pconf > 1).all()  # expp1


def test_dpt_frame_chunking_does_not_change_results():
    H, W, S = 28, 42, 5
    head = _randomize(DPTHead(128, output_dim=4, **SMALL)).eval()
    toks = _tokens(1, S, H, W, 128)
    images = torch.rand(1, S, 3, H, W)
    with torch.no_grad():
        full = head(toks, images, 5, frames_chunk_size=None)
        chunked = head(toks, images, 5, frames_chunk_size=2)
        default = head(toks, images, 5)  # constructor default 8 >= S
    for a, b, c in zip(full, chunked, default):
        assert torch.equal(a, c)
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max().item())
    # one frame alone equals that frame within the sequence (the head is per frame)
    with torch.no_grad():
        single = head([t[:, 3:4] for t in toks], images[:, 3:4], 5)
    assert (single[0] - full[0][:, 3:4]).abs().max() <= 1e-5 * max(1.0, full[0].abs().max().item())


def test_dpt_feature_only_mode_and_rejects_bad_sizes():
    H, W = 42, 56
    head = DPTHead(128, feature_only=True, down_ratio=2, pos_embed=False, **SMALL).eval()
    assert not hasattr(head.scratch, "output_conv2")
    toks = _tokens(1, 2, H, W, 128)
    with torch.no_grad():
        feats = head(toks, torch.rand(1, 2, 3, H, W), 5)
    assert feats.shape == (1, 2, 32, H // 2, W // 2) and torch.isfinite(feats).all()
    with pytest.raises(ValueError):
        head(toks, torch.rand(1, 2, 3, H + 1, W), 5)


def test_dpt_runs_in_its_own_dtype_on_lower_precision_tokens():
    head = DPTHead(128, output_dim=2, activation="exp", **SMALL).eval()
    toks = [t.to(torch.bfloat16) for t in _tokens(1, 2, 28, 28, 128)]
    with torch.no_grad():
        depth, conf = head(toks, torch.rand(1, 2, 3, 28, 28), 5)
    assert depth.dtype == torch.float32 and conf.dtype == torch.float32


def test_uv_grid_and_sincos_embedding_values():
    grid = create_uv_grid(2, 2, aspect_ratio=1.0)
    s = 1 / math.sqrt(2) / 2  # half diagonal 1, cell centres at +-span/2
    expect = torch.tensor([[[-s, -s], [s, -s]], [[-s, s], [s, s]]])
    assert torch.allclose(grid, expect, atol=1e-6)
    # wide grid: x spans the aspect ratio, rows share v
    g = create_uv_grid(4, 2, aspect_ratio=2.0)
    assert g.shape == (2, 4, 2) and torch.allclose(g[0, :, 1], g[0, :1, 1].expand(4))
    assert g[0, -1, 0].item() == pytest.approx(2 / math.sqrt(5) * 3 / 4, abs=1e-6)
    emb = position_grid_to_embed(grid, 8)  # 4 channels per coordinate: sin(w0 x), sin(w1 x), cos(w0 x), cos(w1 x)
    x, y = grid[1, 0]
    w = torch.tensor([1.0, 100.0**-0.5])
    ref = torch.cat([torch.sin(w * x), torch.cos(w * x), torch.sin(w * y), torch.cos(w * y)])
    assert torch.allclose(emb[1, 0], ref, atol=1e-6)


def test_activations():
    x = torch.linspace(-5, 5, 101)
    y = torch.sign(x) * torch.log1p(x.abs())
    assert torch.allclose(inverse_log_transform(y), x, atol=1e-4)
    pe = torch.tensor([[-1.0, 2.0, -3.0, 0.1, -0.2, 0.3, -0.4, -0.5, 0.6]])
    out = activate_pose(pe, trans_act="linear", quat_act="linear", fl_act="relu")
    assert torch.equal(out[..., :7], pe[..., :7]) and torch.equal(out[..., 7:], torch.tensor([[0.0, 0.6]]))
    raw = torch.randn(2, 4, 5, 6)
    vals, conf = activate_head(raw, activation="inv_log", conf_activation="expp1")
    assert vals.shape == (2, 5, 6, 3) and conf.shape == (2, 5, 6)
    assert torch.allclose(conf, 1 + raw[:, 3].exp())
    assert torch.allclose(vals, inverse_log_transform(raw[:, :3].permute(0, 2, 3, 1)))
    with pytest.raises(ValueError):
        activate_head(raw, activation="nope")


# ------------------------------------------------------------------------------------------------- camera head
class ConcatCache:
    """Minimal KV cache: keeps everything, k/v [B, heads, N, head_dim] concatenated along N."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def _small_camera_head(seed=0):
    torch.manual_seed(seed)
    head = CameraHead(dim_in=64, trunk_depth=2, num_heads=4).eval()
    # stronger weights than the default init (LayerScale 0.01, zero empty pose) so that the trunk, the attention
    # across frames and the refinement iterations visibly matter
    _randomize(head, std=0.2, seed=seed)
    return head


def test_camera_head_small_shapes():
    head = _small_camera_head()
    B, S = 2, 5
    toks = [torch.randn(B, S, 7, 64)]
    with torch.no_grad():
        outs = head(toks, num_iterations=4)
    assert len(outs) == 4
    for o in outs:
        assert o.shape == (B, S, 9) and torch.isfinite(o).all()
        assert (o[..., 7:] >= 0).all()  # FoV relu
    with torch.no_grad():
        assert len(head(toks, num_iterations=2)) == 2


def test_camera_head_is_frame_causal():
    head = _small_camera_head()
    toks = torch.randn(1, 6, 3, 64)
    with torch.no_grad():
        full = head([toks])[-1]
        changed = toks.clone()
        changed[:, 4:] += torch.randn_like(changed[:, 4:])
        alt = head([changed])[-1]
    assert torch.allclose(full[:, :4], alt[:, :4], atol=1e-6)  # past frames do not see the future
    assert not torch.allclose(full[:, 4:], alt[:, 4:], atol=1e-3)


def _stream(head, toks, caches):
    with torch.no_grad():
        per_frame = [head([toks[:, s : s + 1]], num_iterations=4, kv_caches=caches) for s in range(toks.shape[1])]
    return [torch.cat([f[it] for f in per_frame], dim=1) for it in range(4)]


def test_camera_head_streaming_equals_causal_with_per_iteration_caches():
    head = _small_camera_head()
    B, S = 2, 6
    toks = torch.randn(B, S, 4, 64)
    with torch.no_grad():
        causal = head([toks], num_iterations=4)

    caches = CameraHead.new_kv_caches(ConcatCache, head.trunk_depth, num_iterations=4)
    streamed = _stream(head, toks, caches)
    for it in range(4):
        assert (streamed[it] - causal[it]).abs().max().item() <= 1e-5
    assert caches[3][1].k.shape == (B, 4, S, 16)  # one key per frame per (iteration, block)

    # the official layout: one cache per trunk block shared by all four iterations -> not the causal forward
    shared_row = [ConcatCache() for _ in range(head.trunk_depth)]
    shared = _stream(head, toks, [shared_row] * 4)
    # (the first iteration of the first frame sees only itself either way; later ones see stale iterations)
    assert (shared[0][:, 0] - causal[0][:, 0]).abs().max().item() <= 1e-5
    assert (shared[-1] - causal[-1]).abs().max().item() > 1e-3


def test_camera_head_streaming_checks_arguments():
    head = _small_camera_head()
    caches = CameraHead.new_kv_caches(ConcatCache, head.trunk_depth, num_iterations=4)
    with pytest.raises(ValueError):
        head([torch.randn(1, 2, 3, 64)], kv_caches=caches)  # streaming is one frame at a time
    with pytest.raises(ValueError):
        head([torch.randn(1, 1, 3, 64)], num_iterations=4, kv_caches=caches[:2])


def test_camera_head_full_size_on_meta_runs_shapes():
    head = _full_head("camera_head.")
    with torch.no_grad():
        outs = head([torch.empty(1, 3, 10, 2048, device="meta")])
    assert [tuple(o.shape) for o in outs] == [(1, 3, 9)] * 4


# -------------------------------------------------------------------------------------------------- track head
def test_track_head_small_construct_and_track():
    torch.manual_seed(0)
    head = TrackHead(
        128,
        features=32,
        hidden_size=64,
        corr_levels=3,
        corr_radius=2,
        iters=3,
        **{k: SMALL[k] for k in SMALL if k != "features"},
    ).eval()
    sd = head.state_dict()
    assert sd["tracker.query_ref_token"].shape == (1, 2, 3 * 32 + 4)
    assert sd["tracker.corr_mlp.fc1.weight"].shape == (64, 3 * 25)
    assert sd["tracker.updateformer.virual_tracks"].shape == (1, 64, 1, 64)

    B, S, H, W, N = 1, 3, 56, 70, 6
    images = torch.rand(B, S, 3, H, W)
    toks = _tokens(B, S, H, W, 128)
    q = torch.rand(B, N, 2) * torch.tensor([W - 1.0, H - 1.0])
    with torch.no_grad():
        coords, vis, conf = head(toks, images, 5, query_points=q)
    assert len(coords) == 3
    for c in coords:
        assert c.shape == (B, S, N, 2) and torch.isfinite(c).all()
        assert torch.allclose(c[:, 0], q, atol=1e-5)  # the query frame keeps the query points
    assert vis.shape == (B, S, N) and conf.shape == (B, S, N)
    assert ((vis > 0) & (vis < 1)).all() and ((conf > 0) & (conf < 1)).all()
    with pytest.raises(ValueError):
        head(toks, images, 5)


def test_corr_block_window_samples_correlation_at_offsets():
    # a single-channel feature map and a target feature of 1: the correlation is the map itself, so the window
    # samples it at integer offsets (x offset along the first window axis, as the trained weights expect)
    H, W = 9, 11
    fmap = torch.arange(H * W, dtype=torch.float32).reshape(1, 1, 1, H, W)
    corr = CorrBlock(fmap, num_levels=1, radius=1)
    out = corr.corr_sample(torch.ones(1, 1, 1, 1), torch.tensor([[[[5.0, 4.0]]]]))  # x=5, y=4
    win = out.view(3, 3)
    for i, dx in enumerate((-1, 0, 1)):
        for j, dy in enumerate((-1, 0, 1)):
            assert win[i, j].item() == pytest.approx(float((4 + dy) * W + (5 + dx)))
