"""Checkpoint loading: the official key list, safe formats, strict reports, prefixes, hub gating."""

from __future__ import annotations

import os
import pathlib
import pickle

import pytest
import torch
from model_helpers import perturb
from torch import nn

from ros2_stream4d.model import ModelConfig, StreamVGGT
from ros2_stream4d.model.checkpoint import (
    CheckpointError,
    expected_keys,
    infer_config,
    load_checkpoint,
    load_state_dict_into,
    normalize_state_dict,
    read_state_dict,
    save_checkpoint,
)
from ros2_stream4d.model.hub import CheckpointNotAvailable, resolve_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEYS_TSV = ROOT.parent / "shared" / "reference" / "streamvggt_state_dict_keys.tsv"
H, W = 28, 42


def small_cfg(**kw) -> ModelConfig:
    base = dict(img_size=70, embed_dim=384, depth=2, num_heads=6, patch_embed="dinov2_vits14_reg", patch_embed_depth=1,
                camera_num_heads=6, camera_trunk_depth=1, dpt_features=16, dpt_out_channels=(8, 16, 32, 32),
                track_head=False, track_features=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return perturb(StreamVGGT(small_cfg())).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 3, 3, H, W, generator=torch.Generator().manual_seed(1))


def outputs(model, images):
    with torch.no_grad():
        return model(images)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- the official key list ---------------------------------------------------------------------------------------------
def test_full_model_keys_and_shapes_match_official_list():
    if not KEYS_TSV.is_file():
        pytest.skip(f"reference key list not found at {KEYS_TSV}")
    ref = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.strip():
            key, shape, dtype = line.split("\t")
            ref[key] = (shape, dtype)
    ours = expected_keys(ModelConfig())  # the 1.2B model on the meta device
    assert len(ref) == 1797
    assert sorted(set(ref) - set(ours)) == [], "missing in our model"
    assert sorted(set(ours) - set(ref)) == [], "extra in our model"
    bad = [(k, ref[k], ours[k]) for k in ref if (ref[k][0], ref[k][1]) != (str(ours[k][0]), str(ours[k][1]))]
    assert bad == []
    assert sum(torch.Size(s).numel() for s, _ in ours.values()) == 1_256_537_516


def test_stream3r_layout_is_official_minus_track_head():
    keys = expected_keys(ModelConfig(track_head=False))
    assert len(keys) == 1403 and not any(k.startswith("track_head.") for k in keys)


# -- round trips -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,prefix", [(".pth", ""), (".safetensors", ""), (".pth", "net."), (".safetensors", "net."),
                                           (".pt", "module."), (".safetensors", "module.net.")])
def test_roundtrip_strict_identical_outputs(tmp_path, small_model, images, suffix, prefix):
    path = save_checkpoint(small_model, tmp_path / f"ckpt{suffix}", prefix=prefix)
    ref = outputs(small_model, images)
    # into an existing model (different random init)
    torch.manual_seed(123)
    other = StreamVGGT(small_cfg()).eval()
    _, rep = load_checkpoint(path, model=other)
    assert rep.ok and rep.stripped_prefix == (prefix or None)
    assert_same(outputs(other, images), ref)
    # built from the file (meta device, config inferred; camera heads are not visible in shapes)
    sd, _ = normalize_state_dict(read_state_dict(path))
    built, rep = load_checkpoint(path, cfg=infer_config(sd, camera_num_heads=6))
    assert rep.ok
    assert_same(outputs(built, images), ref)


def test_infer_config(small_model, tmp_path):
    path = save_checkpoint(small_model, tmp_path / "m.safetensors", prefix="net.")
    sd, prefix = normalize_state_dict(read_state_dict(path))
    assert prefix == "net."
    cfg = infer_config(sd, camera_num_heads=6)
    expected = small_cfg()
    for f in ("embed_dim", "depth", "num_heads", "patch_embed", "patch_embed_depth", "img_size", "camera_trunk_depth",
              "dpt_features", "dpt_out_channels", "track_head", "dpt_layers", "qk_norm"):
        assert getattr(cfg, f) == getattr(expected, f), f


def test_track_head_keys_roundtrip(tmp_path):
    model = StreamVGGT(small_cfg(track_head=True))
    path = save_checkpoint(model, tmp_path / "with_track.safetensors")
    other, rep = load_checkpoint(path, model=StreamVGGT(small_cfg(track_head=True)))
    assert rep.ok and any(k.startswith("track_head.") for k in other.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_stream3r_style_checkpoint_without_track_head(tmp_path, small_model, images):
    # STream3R: the official layout minus track_head.*, every key under "net."
    sd = {"net." + k: v.contiguous() for k, v in small_model.state_dict().items()}
    assert not any(k.startswith("net.track_head.") for k in sd)
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    model, rep = load_checkpoint(path, cfg=small_cfg(track_head=False))
    assert rep.ok and model.track_head is None and rep.stripped_prefix == "net."
    assert_same(outputs(model, images), outputs(small_model, images))
    assert infer_config({k[4:]: v for k, v in sd.items()}).track_head is False
    # into a model with a track head: strict fails, allowed explicitly it loads
    with pytest.raises(CheckpointError, match="track_head"):
        load_checkpoint(path, model=StreamVGGT(small_cfg(track_head=True)))
    model, rep = load_checkpoint(path, model=StreamVGGT(small_cfg(track_head=True)), allow_missing=("track_head.",))
    assert rep.ok and rep.allowed_missing and all(k.startswith("track_head.") for k in rep.allowed_missing)


def test_wrapped_state_dict(tmp_path, small_model, images):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": small_model.state_dict(), "epoch": 3}, path)
    model, rep = load_checkpoint(path, model=StreamVGGT(small_cfg()))
    assert rep.ok
    assert_same(outputs(model, images), outputs(small_model, images))


# -- safety and reports ---------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"aggregator.camera_token": _Evil(str(marker))}, f, protocol=2)
    torch.save({"x": torch.zeros(1), "payload": _Evil(str(marker))}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="refused"):
            read_state_dict(p)
        with pytest.raises(CheckpointError):
            load_checkpoint(p, model=StreamVGGT(small_cfg()))
    assert not marker.exists()


def test_readable_report_for_bad_keys(small_model):
    sd = dict(small_model.state_dict())
    sd.pop("aggregator.camera_token")
    sd.pop("depth_head.norm.weight")
    sd["aggregator.frame_blocks.0.attn.qkv.weight"] = torch.zeros(7, 7)
    sd["aggregator.some_new_thing"] = torch.zeros(3)
    model = StreamVGGT(small_cfg())
    with pytest.raises(CheckpointError) as ei:
        load_state_dict_into(model, sd)
    rep = ei.value.report
    assert rep.missing == ["aggregator.camera_token", "depth_head.norm.weight"]
    assert rep.unexpected == ["aggregator.some_new_thing"]
    assert rep.mismatched == [("aggregator.frame_blocks.0.attn.qkv.weight", (7, 7), (1152, 384))]
    text = str(ei.value)
    assert "missing from the checkpoint (2" in text and "aggregator.camera_token" in text
    assert "unexpected in the checkpoint (1" in text
    assert "(7, 7) vs (1152, 384)" in text
    # non-strict: loads the rest, reports the same
    rep2 = load_state_dict_into(model, sd, strict=False)
    assert rep2.missing == rep.missing and not rep2.ok
    assert torch.equal(model.depth_head.norm.bias, small_model.depth_head.norm.bias)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "list.pth")


def test_load_bf16_aggregator_fp32_heads(tmp_path, small_model, images):
    path = save_checkpoint(small_model, tmp_path / "m.safetensors")
    model, _ = load_checkpoint(path, cfg=small_cfg(), dtype=torch.bfloat16)
    assert model.aggregator.camera_token.dtype == torch.bfloat16
    assert model.camera_head.embed_pose.weight.dtype == torch.float32
    out = outputs(model, images)
    ref = outputs(small_model, images)
    assert torch.isfinite(out["depth"]).all()
    assert (out["depth"] - ref["depth"]).abs().max() < 0.5 * ref["depth"].abs().max()


# -- hub ---------------------------------------------------------------------------------------------------------------
def test_hub_needs_permission(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointNotAvailable, match="allow_download"):
        resolve_checkpoint("streamvggt", cache_dir=tmp_path / "hf")
    with pytest.raises(CheckpointNotAvailable, match="lch01/StreamVGGT"):
        resolve_checkpoint(repo_id="lch01/StreamVGGT", filename="checkpoints.pth", cache_dir=tmp_path / "hf")
    f = tmp_path / "local.safetensors"
    f.write_bytes(b"")
    assert resolve_checkpoint(str(f)) == f
    with pytest.raises(CheckpointNotAvailable):
        resolve_checkpoint("no-such-name")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# -- against the official code (opt-in: STREAMVGGT_SRC=/path/to/StreamVGGT/src) ---------------------------------------
def _official_modules():
    src = os.environ.get("STREAMVGGT_SRC")
    if not src or not (pathlib.Path(src) / "streamvggt").is_dir():
        pytest.skip("set STREAMVGGT_SRC to the official StreamVGGT src/ directory to compare against it")
    import sys
    import types

    sys.path.insert(0, src)
    try:
        import einops  # noqa: F401
    except ImportError:  # only the track head uses it
        sys.modules["einops"] = types.SimpleNamespace(rearrange=None)
    from streamvggt.heads.camera_head import CameraHead
    from streamvggt.heads.dpt_head import DPTHead
    from streamvggt.models.aggregator import Aggregator

    return Aggregator, CameraHead, DPTHead


@pytest.mark.parametrize("variant", ["conv", "dinov2_vits14_reg"])
def test_official_state_dict_loads_strict_and_matches(variant):
    Aggregator, CameraHead, DPTHead = _official_modules()
    if variant == "conv":
        cfg = ModelConfig.small(depth=3, camera_trunk_depth=2)
    else:
        cfg = small_cfg(patch_embed_depth=None)  # the official ViT-S has all 12 blocks
    C = cfg.embed_dim
    off = nn.Module()
    off.aggregator = Aggregator(img_size=cfg.img_size, patch_size=14, embed_dim=C, depth=cfg.depth,
                                num_heads=cfg.num_heads, patch_embed=cfg.patch_embed)
    off.camera_head = CameraHead(dim_in=2 * C, trunk_depth=cfg.camera_trunk_depth, num_heads=cfg.camera_num_heads)
    kw = dict(features=cfg.dpt_features, out_channels=list(cfg.dpt_out_channels),
              intermediate_layer_idx=list(cfg.dpt_layers))
    off.point_head = DPTHead(dim_in=2 * C, output_dim=4, activation="inv_log", conf_activation="expp1", **kw)
    off.depth_head = DPTHead(dim_in=2 * C, output_dim=2, activation="exp", conf_activation="expp1", **kw)
    perturb(off).eval()
    ours = StreamVGGT(cfg).eval()
    rep = load_state_dict_into(ours, off.state_dict())
    assert rep.ok
    imgs = torch.rand(1, 4, 3, H, W, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        toks, psi = off.aggregator(imgs)
        ref = {"pose_enc": off.camera_head(toks)[-1]}
        ref["depth"], ref["depth_conf"] = off.depth_head(toks, images=imgs, patch_start_idx=psi)
        ref["world_points"], ref["world_points_conf"] = off.point_head(toks, images=imgs, patch_start_idx=psi)
        out = ours(imgs)
    session = ours.stream()
    streamed = [session.step(imgs[:, i]) for i in range(imgs.shape[1])]
    for k in ref:
        assert (out[k] - ref[k]).abs().max().item() <= 1e-5, k
        assert (torch.stack([s[k] for s in streamed], 1) - ref[k]).abs().max().item() <= 1e-4, k
