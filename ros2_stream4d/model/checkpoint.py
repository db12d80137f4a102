"""Loading official checkpoints (StreamVGGT, VGGT-1B, STream3R) into our StreamVGGT.

- ``.safetensors`` (preferred) through safetensors; ``.pth`` / ``.pt`` / ``.bin`` ONLY through
  ``torch.load(weights_only=True)``: a pickle that carries code is refused without running it.
- Key layout: the official one. Wrappers are unwrapped ({"model": sd}, {"state_dict": sd}) and a prefix shared by every
  key (``net.`` of STream3R, ``module.`` of DDP, ``model.``) is stripped.
- Strict by default. Problems are reported readably (missing / unexpected / mis-shaped keys) in a
  :class:`CheckpointError`; ``allow_missing`` names key prefixes that may be absent (e.g. ``track_head.``).
- The model can be built from the checkpoint itself (:func:`infer_config`) on the meta device, so a 1.2B model is
  never initialised randomly first; weights land on the requested device and dtype (heads stay fp32 by default).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
STRIPPABLE_PREFIXES = ("net.", "module.", "model.", "_orig_mod.")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "net", "module")
HEAD_PREFIXES = ("camera_head.", "depth_head.", "point_head.", "track_head.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not match the model; ``report`` holds the details when known."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    allowed_missing: list[str] = field(default_factory=list)  # missing but allowed (allow_missing)
    stripped_prefix: str | None = None
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @staticmethod
    def _fmt(keys: list[str], limit: int) -> str:
        shown = "\n".join(f"    {k}" for k in keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return shown + more

    def format(self, limit: int = 20) -> str:
        lines = [f"checkpoint load report: {self.loaded} tensors matched"]
        if self.stripped_prefix:
            lines.append(f"  stripped key prefix {self.stripped_prefix!r}")
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}; {_group(self.missing)}):")
            lines.append(self._fmt(self.missing, limit))
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}; {_group(self.unexpected)}):")
            lines.append(self._fmt(self.unexpected, limit))
        if self.mismatched:
            lines.append(f"  shape mismatches ({len(self.mismatched)}; checkpoint vs model):")
            rows = [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched]
            lines.append(self._fmt(rows, limit))
        if self.allowed_missing:
            lines.append(f"  allowed missing ({len(self.allowed_missing)}; {_group(self.allowed_missing)})")
        if self.ok:
            lines.append("  OK: every key and shape matches")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _group(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        top = k.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


# -- reading ---------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {key: tensor} dict (no key changes yet; see normalize_state_dict).

    .safetensors via safetensors; anything else via torch.load(weights_only=True) (never full unpickling).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - report any parse failure the same way
            raise CheckpointError(f"could not read safetensors file {path}: {e}") from e
    try:
        try:
            obj = torch.load(str(path), map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location=map_location, weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint (torch.load(weights_only=True) rejected it; "
            f"the file may carry code). Convert it to .safetensors from a trusted environment. Details: {e}"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors)")


def normalize_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Strip a prefix that every key shares (net. / module. / model. / _orig_mod.), repeatedly."""
    out = dict(sd)
    stripped = ""
    changed = True
    while changed and out:
        changed = False
        for p in STRIPPABLE_PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p) :]: v for k, v in out.items()}
                stripped += p
                changed = True
    return out, (stripped or None)


# -- matching --------------------------------------------------------------------------------------------------------
def compare_state_dict(
    model_shapes: Mapping[str, tuple[int, ...]],
    ckpt_shapes: Mapping[str, tuple[int, ...]],
    allow_missing: Iterable[str] = (),
) -> LoadReport:
    """Compare {key: shape} of the model and of a checkpoint."""
    allow = tuple(allow_missing)
    rep = LoadReport()
    for k, shape in model_shapes.items():
        if k not in ckpt_shapes:
            (rep.allowed_missing if allow and k.startswith(allow) else rep.missing).append(k)
        elif tuple(ckpt_shapes[k]) != tuple(shape):
            rep.mismatched.append((k, tuple(ckpt_shapes[k]), tuple(shape)))
        else:
            rep.loaded += 1
    rep.unexpected = [k for k in ckpt_shapes if k not in model_shapes]
    return rep


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    assign: bool = False,
) -> LoadReport:
    """Load a (normalised) state dict. strict: raise CheckpointError with the report unless every key and shape
    matches (keys under ``allow_missing`` prefixes may be absent). Non-strict: load what matches, report the rest."""
    model_sd = model.state_dict()
    rep = compare_state_dict(
        {k: tuple(v.shape) for k, v in model_sd.items()}, {k: tuple(v.shape) for k, v in state_dict.items()},
        allow_missing,
    )
    if strict and not rep.ok:
        raise CheckpointError(rep.format(), rep)
    bad = {k for k, _, _ in rep.mismatched}
    usable = {k: v for k, v in state_dict.items() if k in model_sd and k not in bad}
    model.load_state_dict(usable, strict=False, assign=assign)
    return rep


# -- config inference ------------------------------------------------------------------------------------------------
def _count(prefix: str, keys: Iterable[str]) -> int:
    idx = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                idx.add(int(head))
    return max(idx) + 1 if idx else 0


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """Derive a ModelConfig from tensor shapes. Not derivable from shapes (take the official value unless given):
    camera_num_heads, dpt_layers, mlp_ratio, rope_freq."""
    from .layers.patch_embed import DINOV2_VARIANTS

    sd = state_dict
    keys = list(sd)
    shape = {k: tuple(v.shape) for k, v in sd.items()}
    if "aggregator.camera_token" not in shape:
        raise CheckpointError("not a StreamVGGT/VGGT checkpoint: aggregator.camera_token is missing")
    C = shape["aggregator.camera_token"][-1]
    cfg: dict[str, Any] = {"embed_dim": C, "num_register_tokens": shape["aggregator.register_token"][2]}
    cfg["depth"] = _count("aggregator.frame_blocks.", keys)
    qn = shape.get("aggregator.frame_blocks.0.attn.q_norm.weight")
    cfg["qk_norm"] = qn is not None
    if qn is not None:
        cfg["num_heads"] = C // qn[0]
    fc1 = shape.get("aggregator.frame_blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        cfg["mlp_ratio"] = fc1[0] / C
    if "aggregator.patch_embed.cls_token" in shape:
        pdepth = _count("aggregator.patch_embed.blocks.", keys)
        variant = next((n for n, (d, _, _) in DINOV2_VARIANTS.items() if d == C), None)
        if variant is None:
            raise CheckpointError(f"no DINOv2 variant is {C} wide")
        cfg["patch_embed"] = variant
        if pdepth != DINOV2_VARIANTS[variant][1]:
            cfg["patch_embed_depth"] = pdepth
        n_pos = shape["aggregator.patch_embed.pos_embed"][1] - 1
        ps = shape["aggregator.patch_embed.patch_embed.proj.weight"][-1]
        cfg["patch_size"] = ps
        cfg["img_size"] = int(round(n_pos**0.5)) * ps
    else:
        cfg["patch_embed"] = "conv"
        cfg["patch_size"] = shape["aggregator.patch_embed.proj.weight"][-1]
    cfg["camera_head"] = any(k.startswith("camera_head.") for k in keys)
    if cfg["camera_head"]:
        cfg["camera_trunk_depth"] = _count("camera_head.trunk.", keys)
    cfg["depth_head"] = any(k.startswith("depth_head.") for k in keys)
    cfg["point_head"] = any(k.startswith("point_head.") for k in keys)
    dpt = "depth_head" if cfg["depth_head"] else ("point_head" if cfg["point_head"] else None)
    if dpt:
        cfg["dpt_features"] = shape[f"{dpt}.scratch.layer1_rn.weight"][0]
        cfg["dpt_out_channels"] = tuple(shape[f"{dpt}.projects.{i}.weight"][0] for i in range(4))
    cfg["track_head"] = any(k.startswith("track_head.") for k in keys)
    if cfg["track_head"]:
        cfg["track_features"] = shape["track_head.feature_extractor.scratch.layer1_rn.weight"][0]
    cfg.update(overrides)
    if "dpt_layers" not in cfg:
        cfg["dpt_layers"] = None
    return ModelConfig(**cfg)


# -- top level -------------------------------------------------------------------------------------------------------
def _reinit_nonpersistent(model: nn.Module) -> None:
    """After building on the meta device: recreate buffers that are not in any checkpoint."""
    from .aggregator import _RESNET_MEAN, _RESNET_STD, Aggregator

    for m in model.modules():
        if isinstance(m, Aggregator):
            dev = m.camera_token.device
            m._resnet_mean = torch.tensor(_RESNET_MEAN, device=dev).view(1, 1, 3, 1, 1)
            m._resnet_std = torch.tensor(_RESNET_STD, device=dev).view(1, 1, 3, 1, 1)
    for name, b in model.named_buffers():
        if b.is_meta:
            raise CheckpointError(f"buffer {name} was not restored after loading on the meta device")


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    cfg: ModelConfig | None = None,
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    heads_dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, LoadReport]:
    """Load a checkpoint file into ``model`` or into a new StreamVGGT (config from ``cfg`` or inferred from the file).

    STream3R files (no track head) load into a model built without the track head; to load one into a model that
    has it, pass ``allow_missing=("track_head.",)``. Returns (model, report); strict failures raise CheckpointError.
    dtype applies to the aggregator, heads_dtype to the heads (fp32 as the official code runs them).
    """
    from .streamvggt import StreamVGGT

    device = torch.device(device)
    sd, prefix = normalize_state_dict(read_state_dict(path, map_location="cpu"))
    if model is None:
        if cfg is None:
            cfg = infer_config(sd)
        with torch.device("meta"):
            model = StreamVGGT(cfg)
        model.to_empty(device=device)
        rep = load_state_dict_into(model, sd, strict=strict, allow_missing=allow_missing)
        _reinit_nonpersistent(model)
        if not strict or rep.allowed_missing:
            _zero_unloaded(model, rep)
    else:
        rep = load_state_dict_into(model, sd, strict=strict, allow_missing=allow_missing)
        model.to(device)
    rep.stripped_prefix = prefix
    _set_dtypes(model, dtype, heads_dtype)
    model.eval()
    return model, rep


def _zero_unloaded(model: nn.Module, rep: LoadReport) -> None:
    # tensors missing from a checkpoint would hold uninitialised memory after to_empty: zero them
    sd = model.state_dict()
    with torch.no_grad():
        for k in rep.missing + rep.allowed_missing + [k for k, _, _ in rep.mismatched]:
            if k in sd:
                sd[k].zero_()


def _set_dtypes(model: nn.Module, dtype: torch.dtype, heads_dtype: torch.dtype) -> None:
    for name, child in model.named_children():
        child.to(heads_dtype if f"{name}." in HEAD_PREFIXES else dtype)


def save_checkpoint(model: nn.Module, path: str | Path, prefix: str = "") -> Path:
    """Save the model's state dict: .safetensors via safetensors, anything else via torch.save (tensors only)."""
    path = Path(path)
    sd = {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix in SAFE_SUFFIXES:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def expected_keys(cfg: ModelConfig | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of a model built from cfg, without allocating memory (meta device)."""
    from .streamvggt import StreamVGGT

    with torch.device("meta"):
        model = StreamVGGT(cfg or ModelConfig())
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
