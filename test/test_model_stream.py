"""Streaming: parity with the causal forward, rolling-window semantics, constant cache memory (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import perturb

from ros2_stream4d.model import OUTPUT_KEYS, ModelConfig, RollingKVCache, StreamVGGT

H, W = 28, 42
S = 7


CONFIGS = {
    "conv": dict(depth=3, camera_trunk_depth=2),
    "vits14": dict(img_size=70, embed_dim=384, depth=2, num_heads=6, patch_embed="dinov2_vits14_reg",
                   patch_embed_depth=1, camera_num_heads=6, camera_trunk_depth=1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    torch.manual_seed(0)
    model = perturb(StreamVGGT(ModelConfig.small(**CONFIGS[request.param]))).eval()
    images = torch.rand(2, S, 3, H, W)
    with torch.no_grad():
        causal = model(images)
    return model, images, causal


def run_stream(model, images, **kw):
    session = model.stream(**kw)
    outs = [session.step(images[:, i]) for i in range(images.shape[1])]
    return session, {k: torch.stack([o[k] for o in outs], dim=1) for k in outs[0]}


def test_unlimited_stream_equals_causal_forward(setup):
    model, images, causal = setup
    session, streamed = run_stream(model, images, window=None)
    assert set(streamed) == set(OUTPUT_KEYS) | {"descriptor"}
    for k in OUTPUT_KEYS:
        assert streamed[k].shape == causal[k].shape
        diff = (streamed[k] - causal[k]).abs().max().item()
        assert diff <= 1e-4, f"{k}: {diff}"
    st = session.stats()
    assert st.frames_seen == S and st.frames_held == S and st.capacity_frames is None


def test_step_output_shapes(setup):
    model, images, _ = setup
    out = model.stream().step(images[:, 0])
    assert out["pose_enc"].shape == (2, 9)
    assert out["depth"].shape == (2, H, W, 1) and out["depth_conf"].shape == (2, H, W)
    assert out["world_points"].shape == (2, H, W, 3) and out["world_points_conf"].shape == (2, H, W)


def test_the_stream_returns_the_pooled_last_layer_tokens_as_its_place_descriptor(setup):
    """descriptor = the mean of the last aggregator layer's patch tokens, L2-normalised (model/session.py), frame by
    frame equal to the causal forward's tokens; different images give different descriptors."""
    from ros2_stream4d.model.session import pooled_descriptor

    model, images, _ = setup
    _, streamed = run_stream(model, images, window=None)
    with torch.no_grad():
        tokens, psi = model.aggregator(images, causal=True, keep_layers=model._keep_layers())
    ref = tokens[-1][:, :, psi:].float().mean(dim=-2)
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert streamed["descriptor"].shape == (2, S, 2 * model.cfg.embed_dim)
    torch.testing.assert_close(streamed["descriptor"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(streamed["descriptor"].norm(dim=-1), torch.ones(2, S))
    assert (streamed["descriptor"][:, 0] - streamed["descriptor"][:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(pooled_descriptor(torch.tensor([[2.0, 4.0], [4.0, 4.0]])),
                               torch.tensor([0.6, 0.8]))


def test_large_window_equals_unlimited_exactly(setup):
    model, images, _ = setup
    _, unlimited = run_stream(model, images, window=None)
    _, windowed = run_stream(model, images, window=S + 3)
    _, exact_fit = run_stream(model, images, window=S - 1)  # anchor + S-1 = every frame, nothing evicted
    for k in OUTPUT_KEYS:
        assert torch.equal(unlimited[k], windowed[k]), k
        assert torch.equal(unlimited[k], exact_fit[k]), k


def test_reset_starts_a_new_stream(setup):
    model, images, _ = setup
    session, first = run_stream(model, images[:, :3], window=2)
    session.reset()
    assert session.frames_seen == 0 and session.stats().nbytes == 0
    again = [session.step(images[:, i]) for i in range(3)]
    for k in OUTPUT_KEYS:
        assert torch.equal(torch.stack([o[k] for o in again], 1), first[k])


def test_eviction_constant_memory_and_finite():
    torch.manual_seed(0)
    model = perturb(StreamVGGT(ModelConfig.small(depth=2, camera_trunk_depth=2))).eval()
    window, anchors, n = 3, 1, 12
    session = model.stream(window=window, anchors=anchors)
    sizes, causal_diff = [], []
    images = torch.rand(1, n, 3, H, W)
    with torch.no_grad():
        causal = model(images)
    for i in range(n):
        out = session.step(images[:, i])
        for v in out.values():
            assert torch.isfinite(v).all()
        sizes.append(session.cache.storage_nbytes())
        causal_diff.append((out["pose_enc"] - causal["pose_enc"][:, i]).abs().max().item())
        st = session.stats()
        assert st.frames_held == min(i + 1, anchors + window)
    full = anchors + window
    assert len(set(sizes)) == 1, sizes  # preallocated once at the first frame, never grows
    # storage = depth global blocks x (K + V) x (anchors + window) frames x P tokens x C x 4 bytes (+ camera caches)
    cfg = model.cfg
    P = 5 + (H // 14) * (W // 14)
    agg = cfg.depth * 2 * full * P * cfg.embed_dim * 4
    cam = cfg.camera_num_iterations * cfg.camera_trunk_depth * 2 * full * 1 * 2 * cfg.embed_dim * 4
    assert sizes[0] == agg + cam == session.stats().nbytes
    # until the window fills the result is the causal one; afterwards it may differ (frames were dropped)
    assert max(causal_diff[:full]) <= 1e-4
    for c in session.cache.all_caches():
        held = sorted(c.slot_frame)
        assert held[:anchors] == list(range(anchors))
        assert held[anchors:] == list(range(n - window, n))


def test_unlimited_cache_grows():
    model = perturb(StreamVGGT(ModelConfig.small(depth=2, camera_head=False))).eval()
    session = model.stream(window=None)
    sizes = []
    for _ in range(10):
        session.step(torch.rand(1, 3, H, W))
        sizes.append(session.stats().aggregator_bytes)
    assert sizes[-1] > sizes[0]
    assert session.stats().frames_held == 10


def test_rolling_cache_unit():
    c = RollingKVCache(window=2, anchors=1)
    frames = [torch.full((1, 1, 2, 4), float(i)) for i in range(6)]
    for i, f in enumerate(frames):
        k, v = c.update(f, -f)
        assert k.shape[2] == 2 * min(i + 1, 3)
        assert torch.equal(k, -v)
    assert sorted(c.slot_frame) == [0, 4, 5]
    held_values = sorted({int(x) for x in c.held()[0].flatten().tolist()})
    assert held_values == [0, 4, 5]
    k_ptr = c.k.data_ptr()
    c.update(frames[0], frames[0])
    assert c.k.data_ptr() == k_ptr
    with pytest.raises(ValueError):
        c.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError):
        RollingKVCache(window=0)
    # anchors=0: a pure sliding window
    c = RollingKVCache(window=2, anchors=0)
    for f in frames:
        c.update(f, f)
    assert sorted(c.slot_frame) == [4, 5]


def test_stream_eager_vs_sdpa():
    torch.manual_seed(0)
    model = perturb(StreamVGGT(ModelConfig.small(depth=2, camera_trunk_depth=1))).eval()
    images = torch.rand(1, 4, 3, H, W)
    _, a = run_stream(model.set_attention_backend("sdpa"), images, window=2)
    _, b = run_stream(model.set_attention_backend("eager"), images, window=2)
    model.set_attention_backend("sdpa")
    for k in OUTPUT_KEYS:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
