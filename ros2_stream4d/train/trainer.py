"""The training loop: curriculum sampling from a pool, causal forward, losses, AdamW with warm-up, resumable
checkpoints, metrics log and loss curves; and the distillation path (a teacher's outputs as targets).

A run directory holds: ``config.json`` (the run's settings, written once), ``last.pt`` / ``best.pt`` (checkpoints:
a dict of tensors and plain values, loadable with ``torch.load(weights_only=True)``), ``metrics.jsonl`` (one line per
logged step), ``curves.png``, ``overfit.log`` (the one-batch overfit check) and ``model.safetensors`` exports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ros2_stream4d.model import ModelConfig, StreamVGGT
from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri

from .data import DEFAULT_CURRICULUM, Pool, Stage, stage_at
from .losses import LossWeights, PoseScales, total_loss

TINY_MODEL = dict(
    img_size=70, patch_size=14, embed_dim=128, depth=3, num_heads=4, num_register_tokens=4, patch_embed="conv",
    init_values=0.1, camera_num_heads=4, camera_trunk_depth=1, camera_num_iterations=2, dpt_layers=(0, 1, 2, 2),
    dpt_features=32, dpt_out_channels=(32, 48, 64, 64), track_head=False, point_head=False,
)


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    pool: str = "runs/pool"
    model: dict[str, Any] = field(default_factory=lambda: dict(TINY_MODEL))
    hw: tuple[int, int] = (56, 70)
    batch: int = 4
    steps: int = 6000
    lr: float = 5e-4
    min_lr_frac: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    plot_every: int = 500
    overfit_steps: int = 60
    max_minutes: float | None = None
    # a wall-clock budget (minutes, summed over sittings): progress (curriculum stage, LR decay) is then
    # max(step / steps, elapsed / budget), so a run on a busy shared CPU still walks the whole curriculum
    time_budget_min: float | None = None
    curriculum: list[dict[str, Any]] = field(default_factory=lambda: [asdict(s) for s in DEFAULT_CURRICULUM])
    weights: dict[str, float] = field(default_factory=lambda: asdict(LossWeights()))
    scales: dict[str, float] = field(default_factory=lambda: asdict(PoseScales()))
    teacher: str | None = None  # checkpoint path: distillation (teacher outputs are the targets)
    teacher_config: dict[str, Any] | None = None
    threads: int | None = None
    adjustments: list[dict[str, Any]] = field(default_factory=list)  # changes made to a running run, with reasons

    def stages(self) -> list[Stage]:
        return [Stage(**{**s, "kinds": tuple(s["kinds"]), "frames": tuple(s["frames"]), "strides": tuple(s["strides"])})
                for s in self.curriculum]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if "hw" in d:
            d["hw"] = tuple(d["hw"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------------ model I/O
def build_model(model_cfg: dict[str, Any]) -> StreamVGGT:
    return StreamVGGT(ModelConfig.from_dict(dict(model_cfg)))


def init_for_training(model: StreamVGGT) -> StreamVGGT:
    """Start the pose branch near a sensible pose: the FoV outputs pass a ReLU, so a negative start would leave them
    dead (zero gradient) for good; each refinement iteration adds the branch's bias, so after the n iterations the
    FoV starts near 1 rad and the quaternion near the identity (0, 0, 0, 1)."""
    head = model.camera_head
    if head is None:
        return model
    n = max(1, model.cfg.camera_num_iterations)
    with torch.no_grad():
        fc2 = head.pose_branch.fc2
        fc2.weight.mul_(0.1)
        fc2.bias.zero_()
        fc2.bias[6] = 1.0 / n
        fc2.bias[7:9] = 1.0 / n
    return model


def model_state_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def export_safetensors(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model_state_for_export(model), str(path), metadata=metadata or {})
    return path


def load_model_file(path: str | Path, model_cfg: dict[str, Any]) -> StreamVGGT:
    """A StreamVGGT from a .safetensors export or a training checkpoint (.pt)."""
    model = build_model(model_cfg)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k[len("model."):]: v for k, v in ck.items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------------------------------------------- checkpoints
def _rng_state_tensor(rng: np.random.Generator) -> torch.Tensor:
    blob = json.dumps(rng.bit_generator.state).encode()
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def _rng_from_tensor(t: torch.Tensor) -> np.random.Generator:
    state = json.loads(bytes(t.numpy().tobytes()).decode())
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def save_checkpoint(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    rng: np.random.Generator, extra: dict[str, float] | None = None) -> None:
    """model + optimiser + step + numpy/torch RNG states, as a flat dict of tensors (weights_only loadable)."""
    ck: dict[str, Any] = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, val in st.items():
            ck[f"opt.state.{pid}.{name}"] = val if isinstance(val, torch.Tensor) else torch.tensor(val)
    ck["opt.param_groups"] = torch.frombuffer(bytearray(json.dumps(osd["param_groups"]).encode()),
                                              dtype=torch.uint8).clone()
    ck["step"] = torch.tensor(step, dtype=torch.int64)
    ck["rng.numpy"] = _rng_state_tensor(rng)
    ck["rng.torch"] = torch.get_rng_state()
    for k, v in (extra or {}).items():
        ck[f"extra.{k}"] = torch.tensor(float(v))
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(ck, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None
                    ) -> tuple[int, np.random.Generator, dict[str, float]]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k[6:]: v for k, v in ck.items() if k.startswith("model.")}, strict=True)
    if opt is not None:
        groups = json.loads(bytes(ck["opt.param_groups"].numpy().tobytes()).decode())
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in ck.items():
            if k.startswith("opt.state."):
                _, _, pid, name = k.split(".", 3)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(ck["rng.torch"])
    extra = {k[6:]: float(v) for k, v in ck.items() if k.startswith("extra.")}
    return int(ck["step"]), _rng_from_tensor(ck["rng.numpy"]), extra


# ------------------------------------------------------------------------------------------------------ schedules
def progress_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    p = step / max(1, cfg.steps)
    if cfg.time_budget_min:
        p = max(p, elapsed_s / (60.0 * cfg.time_budget_min))
    return min(1.0, p)


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if progress is None:
        p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    else:
        p = progress
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "token" in n else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------- distillation
@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, images: torch.Tensor, conf_quantile: float = 0.2
                    ) -> dict[str, torch.Tensor]:
    """A teacher's causal outputs turned into targets shaped like data.make_clip's: normalised by the teacher's
    frame-0 mean depth; pixels below the conf_quantile of the teacher's depth confidence are not supervised."""
    was = teacher.training
    teacher.eval()
    out = teacher(images)
    teacher.train(was)
    B, S, _, H, W = images.shape
    depth = out["depth"][..., 0].float()
    conf = out["depth_conf"].float()
    thr = torch.quantile(conf.reshape(B, -1), conf_quantile, dim=1).view(B, 1, 1, 1)
    valid = (conf >= thr) & (depth > 1e-6)
    scale = (depth[:, 0] * valid[:, 0]).sum((-1, -2)) / valid[:, 0].sum((-1, -2)).clamp_min(1)
    scale = scale.clamp_min(1e-6)
    extr, intr = pose_encoding_to_extri_intri(out["pose_enc"].float(), (H, W))
    extr = extr.clone()
    extr[..., :3, 3] = extr[..., :3, 3] / scale.view(B, 1, 1)
    # re-encode so that the quaternion is unit with w >= 0 like ground-truth targets
    pe = extri_intri_to_pose_encoding(extr, intr, (H, W))
    extr, intr = pose_encoding_to_extri_intri(pe, (H, W))
    if "world_points" in out:
        pts = out["world_points"].float() / scale.view(B, 1, 1, 1, 1)
    else:
        from ros2_stream4d.model.geometry import unproject_depth_map_to_point_map

        pts = unproject_depth_map_to_point_map(depth / scale.view(B, 1, 1, 1), extr, intr)
    return dict(images=images, depth=depth / scale.view(B, 1, 1, 1), valid=valid, extrinsics=extr, K=intr,
                world_points=pts, scale=scale)


# --------------------------------------------------------------------------------------------------------- training
def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               lr: float, teacher: torch.nn.Module | None = None) -> dict[str, float]:
    if teacher is not None:
        batch = teacher_targets(teacher, batch["images"])
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    pred = model(batch["images"])
    terms = total_loss(pred, batch, PoseScales(**cfg.scales), LossWeights(**cfg.weights))
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    opt.step()
    out = {k: float(v.detach()) for k, v in terms.items()}
    out["grad_norm"] = float(gn)
    out["lr"] = lr
    with torch.no_grad():  # plateau diagnostics: do predictions vary the way the targets do?
        if "depth" in pred:
            d = pred["depth"][..., 0]
            out["depth_spread"] = float(torch.log(d).std(dim=(-1, -2)).mean())
            out["depth_spread_gt"] = float(torch.log(batch["depth"].clamp_min(1e-6)).std(dim=(-1, -2)).mean())
        if "pose_enc" in pred and pred["pose_enc"].shape[1] > 1:
            out["quat_spread"] = float(pred["pose_enc"][:, 1:, 3:6].std())
            gt_pe = extri_intri_to_pose_encoding(batch["extrinsics"], batch["K"], tuple(batch["depth"].shape[-2:]))
            out["quat_spread_gt"] = float(gt_pe[:, 1:, 3:6].std())
    return out


def overfit_check(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, steps: int,
                  log: Callable[[str], None] = print) -> tuple[float, float]:
    """Train a copy of the model on one fixed batch; returns (first loss, last loss)."""
    import copy

    m = copy.deepcopy(model)
    opt = make_optimizer(m, cfg)
    first = last = float("nan")
    for i in range(steps):
        r = train_step(m, opt, batch, cfg, lr=cfg.lr * min(1.0, (i + 1) / 10))
        if i == 0:
            first = r["loss"]
        last = r["loss"]
        if i % 10 == 0 or i == steps - 1:
            log(f"overfit step {i:4d} loss {r['loss']:.4f} cam {r.get('loss_camera', 0):.3f} "
                f"depth {r.get('loss_depth', 0):.3f} absrel {r.get('depth_abs_rel', 0):.3f}")
    return first, last


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    step = np.array([r["step"] for r in rows])

    def series(key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in rows], dtype=float)

    def smooth(y: np.ndarray, k: int = 20) -> np.ndarray:
        if len(y) < k:
            return y
        ker = np.ones(k) / k
        ypad = np.concatenate([np.full(k - 1, y[0]), y])
        return np.convolve(np.nan_to_num(ypad, nan=np.nanmean(y)), ker, mode="valid")

    panels = [("total loss", ["loss"], True),
              ("camera terms (standardised)", ["loss_T", "loss_R", "loss_fov", "loss_relT", "loss_relR"], True),
              ("depth (train batches)", ["loss_depth", "depth_abs_rel"], False),
              ("spread within clip: prediction vs target", ["depth_spread", "depth_spread_gt", "quat_spread",
                                                           "quat_spread_gt"], False),
              ("held-out clips: depth AbsRel (median-scaled)", ["eval_depth_abs_rel"], False),
              ("held-out clips: rotation error (deg)", ["eval_rot_err_deg", "eval_rel_rot_err_deg",
                                                      "eval_rot_err_deg_constant",
                                                      "eval_rel_rot_err_deg_constant"], False),
              ("learning rate", ["lr"], False), ("points", ["loss_points"], True)]
    panels = [p for p in panels if any(not np.all(np.isnan(series(k))) for k in p[1])]
    cols = 3
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (title, keys, logy) in zip(axes.ravel(), panels):
        for k in keys:
            y = series(k)
            if np.all(np.isnan(y)):
                continue
            if k.startswith("eval_"):
                ok = ~np.isnan(y)
                ax.plot(step[ok], y[ok], "o-", ms=3, label=k)
            else:
                line, = ax.plot(step, smooth(y), label=k)
                ax.plot(step, y, alpha=0.2, color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        if logy:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


@torch.no_grad()
def quick_eval(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Causal-forward metrics on fixed held-out clips: depth AbsRel (median-scaled per frame), rotation error to
    frame 0 and between consecutive frames (degrees)."""
    from ros2_stream4d.model.geometry import quat_to_mat

    model.eval()
    absrel, rot, rel, rot0, rel0 = [], [], [], [], []
    for b in batches:
        pred = model(b["images"])
        gt, v = b["depth"], b["valid"]
        if "depth" in pred:
            d = pred["depth"][..., 0]
            for bi in range(d.shape[0]):
                for s in range(d.shape[1]):
                    m = v[bi, s]
                    p, g = d[bi, s][m], gt[bi, s][m]
                    p = p * (g.median() / p.median())
                    absrel.append(float(((p - g).abs() / g).mean()))
        R = quat_to_mat(pred["pose_enc"][..., 3:7])
        Rg = b["extrinsics"][..., :3, :3]

        def ang(A: torch.Tensor, Bm: torch.Tensor) -> torch.Tensor:
            tr = (A @ Bm.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sum(-1)
            return torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1, 1)))

        rot.append(ang(R[:, 1:], Rg[:, 1:]).mean())
        Rr = R[:, 1:] @ R[:, :-1].transpose(-1, -2)
        Rgr = Rg[:, 1:] @ Rg[:, :-1].transpose(-1, -2)
        rel.append(ang(Rr, Rgr).mean())
        eye = torch.eye(3).expand_as(Rg[:, 1:])
        rot0.append(ang(eye, Rg[:, 1:]).mean())
        rel0.append(ang(eye[:, :Rgr.shape[1]], Rgr).mean())
    model.train()
    return {"eval_depth_abs_rel": float(np.mean(absrel)) if absrel else float("nan"), "eval_rot_err_deg": float(torch.stack(rot).mean()),
            "eval_rel_rot_err_deg": float(torch.stack(rel).mean()),
            "eval_rot_err_deg_constant": float(torch.stack(rot0).mean()),
            "eval_rel_rot_err_deg_constant": float(torch.stack(rel0).mean())}


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Run (or resume) training into cfg.run_dir; returns the run directory."""
    from tqdm import tqdm

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model = init_for_training(build_model(cfg.model))
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    best = float("inf")
    if (run / "last.pt").exists():
        step, rng, extra = load_checkpoint(run / "last.pt", model, opt)
        best = extra.get("best", best)
        log(f"resumed from {run / 'last.pt'} at step {step}")
    teacher = None
    if cfg.teacher:
        teacher = load_model_file(cfg.teacher, cfg.teacher_config or cfg.model)
        teacher.requires_grad_(False)
        log(f"distillation: teacher {cfg.teacher}")

    pool = Pool(cfg.pool)
    while len(pool) < 8:
        log(f"waiting for the pool at {cfg.pool} ({len(pool)} sequences)")
        time.sleep(20)
        pool.refresh()
    stages = cfg.stages()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; pool: {len(pool)} sequences")

    # fixed held-out clips for the periodic quick eval (own seeds, never in the pool)
    from .data import make_clip, render_sequence

    eval_batches = []
    erng = np.random.default_rng(12345)
    for j, kind in enumerate(("ground", "handheld")):
        seq = render_sequence(900_000 + j, kind, 24, cfg.hw)
        clips = [make_clip(seq, np.arange(s, s + 8)) for s in (0, 8, 16)]
        eval_batches.append(to_torch({k: np.stack([c[k] for c in clips]) for k in clips[0]}))
    del erng

    if step == 0 and cfg.overfit_steps > 0 and not (run / "overfit.log").exists():
        b = to_torch(pool.sample_batch(np.random.default_rng(cfg.seed + 1), cfg.batch, stages[0]))
        lines: list[str] = []

        def olog(s: str) -> None:
            lines.append(s)
            log(s)

        first, last = overfit_check(model, b, cfg, cfg.overfit_steps, olog)
        olog(f"overfit check: loss {first:.4f} -> {last:.4f} in {cfg.overfit_steps} steps "
             f"({'OK' if last < 0.5 * first else 'NOT halved'})")
        (run / "overfit.log").write_text("\n".join(lines) + "\n")

    t_start = time.time()
    wall_before = 0.0
    wall_file = run / "wall_seconds.txt"
    if wall_file.exists():
        wall_before = float(wall_file.read_text())
    metrics_f = open(run / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, dynamic_ncols=True, mininterval=5)
    last_refresh = time.time()
    try:
        while step < cfg.steps:
            if cfg.max_minutes is not None and time.time() - t_start > 60 * cfg.max_minutes:
                log(f"time budget of {cfg.max_minutes} min reached at step {step}")
                break
            elapsed = wall_before + time.time() - t_start
            prog = progress_at(step, cfg, elapsed)
            if cfg.time_budget_min and prog >= 1.0:
                log(f"wall-clock budget of {cfg.time_budget_min} min spent at step {step}")
                break
            if time.time() - last_refresh > 60:
                if pool.refresh():
                    log(f"pool: {len(pool)} sequences")
                last_refresh = time.time()
            stage = stage_at(stages, prog)
            batch = to_torch(pool.sample_batch(rng, cfg.batch, stage))
            r = train_step(model, opt, batch, cfg, lr_at(step, cfg, prog), teacher)
            step += 1
            if not math.isfinite(r["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}: {r}")
            bar.update(1)
            bar.set_postfix(loss=f"{r['loss']:.3f}", stage=stage.name, S=batch["images"].shape[1])
            if step % cfg.log_every == 0 or step == 1:
                r.update(step=step, stage=stage.name, frames=int(batch["images"].shape[1]),
                         wall_s=wall_before + time.time() - t_start, progress=prog)
                if step % cfg.ckpt_every == 0:
                    r.update(quick_eval(model, eval_batches))
                metrics_f.write(json.dumps(r) + "\n")
                metrics_f.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                score = np.nan_to_num(r.get("eval_depth_abs_rel", np.inf), nan=0.0) / 0.2 + r.get(
                    "eval_rel_rot_err_deg", 0) / 2.0
                if "eval_rel_rot_err_deg" in r and score < best:
                    best = score
                    save_checkpoint(run / "best.pt", model, opt, step, rng, {"best": best})
                save_checkpoint(run / "last.pt", model, opt, step, rng, {"best": best})
                wall_file.write_text(f"{wall_before + time.time() - t_start:.1f}")
            if step % cfg.plot_every == 0:
                plot_curves(run / "metrics.jsonl", run / "curves.png")
    finally:
        bar.close()
        metrics_f.close()
        save_checkpoint(run / "last.pt", model, opt, step, rng, {"best": best})
        wall_file.write_text(f"{wall_before + time.time() - t_start:.1f}")
        if (run / "metrics.jsonl").exists():
            plot_curves(run / "metrics.jsonl", run / "curves.png")
    export_safetensors(model, run / "model.safetensors", {"step": str(step)})
    log(f"stopped at step {step}; checkpoint {run / 'last.pt'}")
    return run
