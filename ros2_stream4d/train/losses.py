"""Training losses for the streaming model, in the spirit of the VGGT / StreamVGGT recipe.

Targets are in the clip's first camera frame and normalised by that frame's mean depth (a causal model cannot know
later frames, so the scale is fixed by frame 0 alone). Terms:

- camera: every refinement iteration's pose encoding (later iterations weigh more, gamma^(n-1-i)) against the
  target: translation (smooth L1) and quaternion (L1) relative to frame 0, field of view (L1), plus the relative pose
  between consecutive frames (rotation-matrix and translation residuals). Residuals are divided by the typical size of
  each quantity (``PoseScales``), so every term starts O(1): standardised targets.
- depth: confidence-weighted ``c * r - alpha * log c`` with r = |log-depth error| + half its per-frame de-meaned
  version (scale-invariant part) + the image gradient of the log-depth error.
- points: confidence-weighted L1 on world points (first-camera frame) plus a gradient term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding, quat_to_mat


@dataclass
class PoseScales:
    """Typical magnitudes (normalised units / radians) used to standardise the pose residuals."""

    trans: float = 0.05  # translation relative to frame 0
    quat: float = 0.02  # quaternion components relative to frame 0
    rel_trans: float = 0.015  # translation between consecutive frames
    rel_rot: float = 0.04  # rotation matrix residual between consecutive frames (~ sqrt(2) * angle)
    fov: float = 0.05


@dataclass
class LossWeights:
    camera: float = 1.0
    rel_pose: float = 1.0
    depth: float = 1.0
    points: float = 0.5
    grad: float = 0.5
    conf_alpha: float = 0.2
    gamma: float = 0.6


def relative_consecutive(R: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-from-world (R [..., S, 3, 3], t [..., S, 3]) -> motion from frame i-1 to i: R_i R_{i-1}^T and
    t_i - R_rel t_{i-1}, shapes [..., S-1, 3, 3] and [..., S-1, 3]."""
    R_rel = R[..., 1:, :, :] @ R[..., :-1, :, :].transpose(-1, -2)
    t_rel = t[..., 1:, :] - (R_rel @ t[..., :-1, :, None])[..., 0]
    return R_rel, t_rel


def camera_loss(pose_enc_list: list[torch.Tensor] | torch.Tensor, gt_pose_enc: torch.Tensor,
                scales: PoseScales | None = None, weights: LossWeights | None = None) -> dict[str, torch.Tensor]:
    """pose_enc_list: one [B, S, 9] per refinement iteration (or a single tensor); gt_pose_enc [B, S, 9]."""
    sc = scales or PoseScales()
    w = weights or LossWeights()
    if isinstance(pose_enc_list, torch.Tensor):
        pose_enc_list = [pose_enc_list]
    n = len(pose_enc_list)
    gt_R = quat_to_mat(gt_pose_enc[..., 3:7])
    gt_Rr, gt_tr = relative_consecutive(gt_R, gt_pose_enc[..., :3])
    tot = {"loss_T": 0.0, "loss_R": 0.0, "loss_fov": 0.0, "loss_relT": 0.0, "loss_relR": 0.0}
    for i, pe in enumerate(pose_enc_list):
        g = w.gamma ** (n - 1 - i)
        lt = F.smooth_l1_loss(pe[..., :3] / sc.trans, gt_pose_enc[..., :3] / sc.trans)
        lq = (pe[..., 3:7] - gt_pose_enc[..., 3:7]).abs().mean() / sc.quat
        lf = (pe[..., 7:9] - gt_pose_enc[..., 7:9]).abs().mean() / sc.fov
        tot["loss_T"] = tot["loss_T"] + g * lt
        tot["loss_R"] = tot["loss_R"] + g * lq
        tot["loss_fov"] = tot["loss_fov"] + g * lf
        if pe.shape[-2] > 1:
            R = quat_to_mat(pe[..., 3:7])
            Rr, tr = relative_consecutive(R, pe[..., :3])
            tot["loss_relR"] = tot["loss_relR"] + g * (Rr - gt_Rr).abs().mean() / sc.rel_rot
            tot["loss_relT"] = tot["loss_relT"] + g * F.smooth_l1_loss(tr / sc.rel_trans, gt_tr / sc.rel_trans)
    out = {k: torch.as_tensor(v, dtype=gt_pose_enc.dtype, device=gt_pose_enc.device) for k, v in tot.items()}
    out["loss_camera"] = w.camera * (out["loss_T"] + out["loss_R"] + 0.5 * out["loss_fov"]) + w.rel_pose * (
        out["loss_relT"] + out["loss_relR"])
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def _grad_residual(err: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """Finite differences of a residual map err [..., H, W(, C)] along x and y with their validity masks."""
    if err.dim() == valid.dim():
        err = err[..., None]
    gx = (err[..., :, 1:, :] - err[..., :, :-1, :]).abs().sum(-1)
    gy = (err[..., 1:, :, :] - err[..., :-1, :, :]).abs().sum(-1)
    mx = valid[..., :, 1:] & valid[..., :, :-1]
    my = valid[..., 1:, :] & valid[..., :-1, :]
    return gx, mx, gy, my


def conf_weighted(res: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean over valid pixels of conf * res - alpha * log(conf)."""
    return _masked_mean(conf * res - alpha * torch.log(conf), valid)


def depth_loss(depth: torch.Tensor, conf: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
               weights: LossWeights | None = None) -> dict[str, torch.Tensor]:
    """depth [B, S, H, W(, 1)] > 0, conf [B, S, H, W] (>= 1 with expp1), gt [B, S, H, W], valid bool [B, S, H, W]."""
    w = weights or LossWeights()
    if depth.dim() == gt.dim() + 1:
        depth = depth[..., 0]
    e = torch.log(depth.clamp_min(1e-6)) - torch.log(gt.clamp_min(1e-6))
    e = torch.where(valid, e, torch.zeros_like(e))
    m = valid.to(e.dtype)
    mean_e = (e * m).sum((-1, -2), keepdim=True) / m.sum((-1, -2), keepdim=True).clamp_min(1.0)
    res = e.abs() + 0.5 * (e - mean_e).abs()
    l_main = conf_weighted(res, conf, valid, w.conf_alpha)
    gx, mx, gy, my = _grad_residual(e, valid)
    l_grad = _masked_mean(conf[..., :, 1:] * gx, mx) + _masked_mean(conf[..., 1:, :] * gy, my)
    with torch.no_grad():
        abs_rel = _masked_mean((torch.exp(e) - 1).abs(), valid)
    return {"loss_depth": l_main + w.grad * l_grad, "loss_depth_grad": l_grad.detach(), "depth_abs_rel": abs_rel}


def point_loss(points: torch.Tensor, conf: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
               weights: LossWeights | None = None) -> dict[str, torch.Tensor]:
    """points / gt [B, S, H, W, 3] in the first camera frame (normalised), conf [B, S, H, W]."""
    w = weights or LossWeights()
    err = torch.where(valid[..., None], points - gt, torch.zeros_like(gt))
    l_main = conf_weighted(err.abs().sum(-1), conf, valid, w.conf_alpha)
    gx, mx, gy, my = _grad_residual(err, valid)
    l_grad = _masked_mean(conf[..., :, 1:] * gx, mx) + _masked_mean(conf[..., 1:, :] * gy, my)
    return {"loss_points": l_main + w.grad * l_grad}


def gt_pose_encoding(batch: dict[str, torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
    return extri_intri_to_pose_encoding(batch["extrinsics"], batch["K"], hw)


def total_loss(pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], scales: PoseScales | None = None,
               weights: LossWeights | None = None) -> dict[str, torch.Tensor]:
    """All terms for a model output and a batch of targets (see data.make_clip); ``loss`` is the total."""
    w = weights or LossWeights()
    H, W = batch["depth"].shape[-2:]
    out: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), dtype=batch["depth"].dtype, device=batch["depth"].device)
    if "pose_enc" in pred:
        gt_pe = gt_pose_encoding(batch, (H, W))
        cam = camera_loss(pred.get("pose_enc_list", pred["pose_enc"]), gt_pe, scales, w)
        out.update(cam)
        loss = loss + cam["loss_camera"]
    if "depth" in pred:
        d = depth_loss(pred["depth"], pred["depth_conf"], batch["depth"], batch["valid"], w)
        out.update(d)
        loss = loss + w.depth * d["loss_depth"]
    if "world_points" in pred and w.points > 0:
        p = point_loss(pred["world_points"], pred["world_points_conf"], batch["world_points"], batch["valid"], w)
        out.update(p)
        loss = loss + w.points * p["loss_points"]
    out["loss"] = loss
    return out
