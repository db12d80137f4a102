"""Shared by the model tests."""

import torch
from torch import nn


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make random weights matter: LayerScale gammas near 1 and visible special tokens (default init is ~0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif name.endswith(("camera_token", "register_token", "empty_pose_tokens", "cls_token", "register_tokens")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model
