"""Output activations of the heads (pose encoding, dense maps, confidences).

The names are the ones the official configuration strings use ("linear", "relu", "exp", "inv_log", "expp1", ...), so a
head built with the official arguments activates its raw outputs exactly as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "activate_head",
    "activate_pose",
    "apply_conf_activation",
    "apply_dense_activation",
    "base_pose_act",
    "inverse_log_transform",
]


def inverse_log_transform(y: torch.Tensor) -> torch.Tensor:
    """sign(y) * (exp(|y|) - 1): the inverse of sign(x) * log(1 + |x|)."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def base_pose_act(x: torch.Tensor, act_type: str = "linear") -> torch.Tensor:
    """One activation for one slice of the pose encoding."""
    if act_type == "linear":
        return x
    if act_type == "relu":
        return F.relu(x)
    if act_type == "exp":
        return torch.exp(x)
    if act_type == "inv_log":
        return inverse_log_transform(x)
    raise ValueError(f"unknown pose activation {act_type!r} (linear, relu, exp, inv_log)")


def activate_pose(
    pred_pose_enc: torch.Tensor, trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "linear"
) -> torch.Tensor:
    """Activate a raw absT_quaR_FoV encoding [..., 9]: translation [:3], quaternion [3:7], field of view [7:]."""
    t = base_pose_act(pred_pose_enc[..., :3], trans_act)
    q = base_pose_act(pred_pose_enc[..., 3:7], quat_act)
    fov = base_pose_act(pred_pose_enc[..., 7:], fl_act)
    return torch.cat([t, q, fov], dim=-1)


def apply_dense_activation(xyz: torch.Tensor, activation: str) -> torch.Tensor:
    """Activation of the value channels of a dense head (channels last)."""
    if activation == "inv_log":
        return inverse_log_transform(xyz)
    if activation == "exp":
        return torch.exp(xyz)
    if activation == "linear":
        return xyz
    if activation == "relu":
        return F.relu(xyz)
    if activation == "sigmoid":
        return torch.sigmoid(xyz)
    if activation == "norm_exp":
        d = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return (xyz / d) * torch.expm1(d)
    if activation == "norm":
        return xyz / xyz.norm(dim=-1, keepdim=True)
    if activation == "xy_inv_log":
        xy, z = xyz.split([xyz.shape[-1] - 1, 1], dim=-1)
        z = inverse_log_transform(z)
        return torch.cat([xy * z, z], dim=-1)
    raise ValueError(f"unknown dense activation {activation!r}")


def apply_conf_activation(conf: torch.Tensor, conf_activation: str) -> torch.Tensor:
    """Activation of the confidence channel: expp1 = 1 + exp (always > 1), expp0 = exp, or sigmoid."""
    if conf_activation == "expp1":
        return 1 + conf.exp()
    if conf_activation == "expp0":
        return conf.exp()
    if conf_activation == "sigmoid":
        return torch.sigmoid(conf)
    raise ValueError(f"unknown confidence activation {conf_activation!r} (expp1, expp0, sigmoid)")


def activate_head(
    out: torch.Tensor, activation: str = "norm_exp", conf_activation: str = "expp1"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a dense head output [N, C, H, W] into values [N, H, W, C-1] and confidence [N, H, W], activated."""
    fmap = out.permute(0, 2, 3, 1)
    values = apply_dense_activation(fmap[..., :-1], activation)
    conf = apply_conf_activation(fmap[..., -1], conf_activation)
    return values, conf
