"""Training stream4d-small on cached encoder features (the encoder is frozen, so it never runs in the loop).

Losses (per clip of S frames, frames in stream order, the aggregator frame-causal like streaming):
- depth: Eigen's scale-invariant log loss on metric depth, mean(d^2) - lambda * mean(d)^2 with d = log pred - log gt
  over valid pixels of each frame (lambda 0.85: mostly scale-free, a little absolute scale);
- relative pose frame s-1 -> s: smooth L1 on the rotation vector in units of ROT_SCALE and on the translation divided
  by the mean depth of frame s-1 in units of TRANS_SCALE (the standardised targets), weights w_rot and w_trans;
- horizontal FoV: L1 in radians.
Runs are resumable: ``<run>/last.pt`` (weights_only-loadable: tensors, numbers, strings) every ``ckpt_every_s``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ros2_stream4d.model.small import ROT_SCALE, TRANS_SCALE, SmallConfig, Stream4DSmall

from .small_data import FeaturePool


@dataclass
class SmallTrainConfig:
    cache: list[str] = field(default_factory=lambda: ["/work/data/stream4d14/cache_own"])
    run_dir: str = "runs/small"
    model: dict[str, Any] = field(default_factory=dict)  # SmallConfig fields
    batch: int = 4
    frames: tuple[int, int] = (2, 4)  # clip length range (inclusive)
    strides: tuple[int, ...] = (1, 1, 2, 3)
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 100
    minutes: float = 60.0  # cosine decay to 10 % over this much wall time (over all sittings)
    w_depth: float = 1.0
    w_rot: float = 1.0
    w_trans: float = 0.3
    w_fov: float = 1.0
    si_lambda: float = 0.85
    threads: int = 2
    seed: int = 0
    ckpt_every_s: float = 120.0
    log_every: int = 20

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SmallTrainConfig:
        d = dict(d)
        for k in ("frames", "strides"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def si_log_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, lam: float = 0.85) -> torch.Tensor:
    """pred, gt [N, H, W] > 0; valid bool: mean over frames of mean(d^2) - lam * mean(d)^2, d = log pred - log gt."""
    d = (torch.log(pred.clamp_min(1e-6)) - torch.log(gt.clamp_min(1e-6))) * valid
    n = valid.flatten(1).sum(1).clamp_min(1)
    m1 = d.flatten(1).sum(1) / n
    m2 = (d * d).flatten(1).sum(1) / n
    return (m2 - lam * m1 * m1).mean()


def losses(model: Stream4DSmall, batch: dict[str, torch.Tensor], cfg: SmallTrainConfig) -> dict[str, torch.Tensor]:
    out = model.forward_feats(batch["feats"])
    B, S = batch["depth"].shape[:2]
    ld = si_log_loss(out["depth"].flatten(0, 1), batch["depth"].flatten(0, 1), batch["valid"].flatten(0, 1),
                     cfg.si_lambda)
    res = {"depth": ld}
    total = cfg.w_depth * ld
    if S > 1:
        rel = out["rel"]
        lr = F.smooth_l1_loss(rel[..., :3], batch["rot"] / ROT_SCALE)
        lt = F.smooth_l1_loss(rel[..., 3:], batch["trans"] / TRANS_SCALE)
        lf = (out["fov"] - batch["fov"][:, None]).abs().mean()
        res.update(rot=lr, trans=lt, fov=lf)
        total = total + cfg.w_rot * lr + cfg.w_trans * lt + cfg.w_fov * lf
        with torch.no_grad():
            err = (rel[..., :3] * ROT_SCALE - batch["rot"]).norm(dim=-1)
            res["rot_err_deg"] = torch.rad2deg(err).mean()
            res["rot_ident_deg"] = torch.rad2deg(batch["rot"].norm(dim=-1)).mean()
    res["total"] = total
    return res


def lr_at(elapsed_min: float, step: int, cfg: SmallTrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    p = min(1.0, elapsed_min / max(1e-6, cfg.minutes))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def save_ckpt(path: Path, model: Stream4DSmall, opt: torch.optim.Optimizer, step: int, elapsed_s: float,
              rng: np.random.Generator) -> None:
    state = rng.bit_generator.state
    ck = {"model": model.trainable_state_dict(), "opt": opt.state_dict(), "step": step, "elapsed_s": elapsed_s,
          "rng": json.dumps(state)}
    tmp = path.with_suffix(".tmp")
    torch.save(ck, tmp)
    tmp.replace(path)


def load_trained(path: str | Path, model_cfg: dict[str, Any] | None = None, pretrained: bool = True
                 ) -> Stream4DSmall:
    """A Stream4DSmall from a run checkpoint (.pt, weights_only) or exported weights (.safetensors)."""
    path = Path(path)
    model = Stream4DSmall(SmallConfig.from_dict(model_cfg or {}), pretrained=pretrained)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model.load_trainable(sd)
    return model.eval()


def train(cfg: SmallTrainConfig, max_minutes: float | None = None, log=print, max_steps: int | None = None) -> Path:
    """Train (or resume) until the schedule's wall time, ``max_minutes`` of this sitting or ``max_steps`` (total)."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if (run / "config.json").exists():
        cfg = SmallTrainConfig.from_dict({**json.loads((run / "config.json").read_text()), "run_dir": str(run)})
    else:
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = Stream4DSmall(SmallConfig.from_dict(cfg.model), pretrained=False, encoder=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    step, elapsed0 = 0, 0.0
    last = run / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        model.load_trainable(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed0 = int(ck["step"]), float(ck["elapsed_s"])
        rng.bit_generator.state = json.loads(ck["rng"])
        log(f"resumed {last} at step {step} ({elapsed0 / 60:.1f} min)")
    pools = [FeaturePool(c) for c in cfg.cache]
    log(f"pool: {sum(len(p) for p in pools)} sequences from {cfg.cache}")
    model.train()
    t_start = time.time()
    t_ck = time.time()
    metrics = open(run / "metrics.jsonl", "a")
    acc: dict[str, list[float]] = {}
    while True:
        elapsed = elapsed0 + time.time() - t_start
        if max_minutes is not None and time.time() - t_start > 60 * max_minutes:
            break
        if elapsed > 60 * cfg.minutes or (max_steps is not None and step >= max_steps):
            break
        if step % 200 == 0:
            for p in pools:
                p.refresh()
        lr = lr_at(elapsed / 60, step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        S = int(rng.integers(cfg.frames[0], cfg.frames[1] + 1))
        sizes = np.array([len(p) for p in pools], float)
        pool = pools[int(rng.choice(len(pools), p=sizes / sizes.sum()))]
        batch = pool.sample(rng, cfg.batch, S, cfg.strides)
        res = losses(model, batch, cfg)
        opt.zero_grad(set_to_none=True)
        res["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in res.items():
            acc.setdefault(k, []).append(float(v.detach()))
        if step % cfg.log_every == 0:
            rec = {"step": step, "min": round(elapsed / 60, 2), "lr": lr,
                   **{k: round(float(np.mean(v)), 5) for k, v in acc.items()}}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            log(json.dumps(rec))
            acc = {}
        if time.time() - t_ck > cfg.ckpt_every_s:
            save_ckpt(last, model, opt, step, elapsed0 + time.time() - t_start, rng)
            t_ck = time.time()
    save_ckpt(last, model, opt, step, elapsed0 + time.time() - t_start, rng)
    log(f"stopped at step {step}; checkpoint {last}")
    return last
