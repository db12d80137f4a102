"""`stream4d train`: render a training pool, train (or resume) a small streaming model, evaluate, export.

    stream4d train --pool-only --pool runs/pool56 --pool-size 640       # render the pool (resumable)
    stream4d train --run runs/tiny --pool runs/pool56 --steps 5000        # train / resume in runs/tiny
    stream4d train --run runs/tiny --eval                                 # held-out streaming evaluation
    stream4d train --run runs/tiny --export model/stream4d-tiny           # weights + model card
    stream4d train --run runs/distil --teacher teacher.safetensors --teacher-config teacher.json   # distillation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train / evaluate / export the small streaming model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/tiny", help="run directory (checkpoints, metrics, curves)")
    p.add_argument("--pool", default="runs/pool56", help="directory of pre-rendered shards")
    p.add_argument("--pool-size", type=int, default=640, help="sequences to render into the pool")
    p.add_argument("--pool-frames", type=int, default=48, help="frames per pool sequence")
    p.add_argument("--pool-only", action="store_true", help="render the pool and exit")
    p.add_argument("--hw", type=int, nargs=2, default=(56, 70), metavar=("H", "W"), help="training image size")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                   help="wall-clock budget over all sittings: curriculum and LR decay follow max(step/steps, time/budget)")
    p.add_argument("--overfit-steps", type=int, default=None, help="one-batch overfit check before training (0=off)")
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields (model overrides under 'model')")
    p.add_argument("--teacher", default=None, help="teacher checkpoint: distil its outputs instead of ground truth")
    p.add_argument("--teacher-config", default=None, help="JSON ModelConfig of the teacher (default: the student's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--eval", action="store_true", help="held-out streaming evaluation of the run's checkpoint")
    p.add_argument("--eval-frames", type=int, default=240)
    p.add_argument("--eval-sequences", type=int, default=3, help="held-out sequences per trajectory kind")
    p.add_argument("--window", type=int, default=16, help="rolling-cache window for the evaluation")
    p.add_argument("--checkpoint", default=None, help="evaluate / export this checkpoint (default: best.pt or last.pt)")
    p.add_argument("--export", default=None, help="write <path>.safetensors (+ .yaml card) from the checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    from .small_cli import register as register_small

    register_small(subparsers)


def _train_config(args):
    from .trainer import TrainConfig

    run = Path(args.run)
    if (run / "config.json").exists():  # resuming: the run's own settings win, flags may extend/stop it
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    elif args.config:
        cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    else:
        cfg = TrainConfig()
    cfg.run_dir = str(run)
    for name in ("steps", "batch", "lr", "warmup", "seed", "teacher", "threads"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    if args.time_budget is not None:
        cfg.time_budget_min = args.time_budget
    if args.overfit_steps is not None:
        cfg.overfit_steps = args.overfit_steps
    if args.teacher_config:
        cfg.teacher_config = json.loads(Path(args.teacher_config).read_text())
    if not (run / "config.json").exists():
        cfg.pool = args.pool
        cfg.hw = tuple(args.hw)
    cfg.max_minutes = args.max_minutes
    return cfg


def _checkpoint(args) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    run = Path(args.run)
    for name in ("best.pt", "last.pt"):
        if (run / name).exists():
            return run / name
    raise FileNotFoundError(f"no checkpoint in {run}")


def main(args) -> int:
    from .data import render_pool

    if args.pool_only:
        render_pool(args.pool, args.pool_size, args.pool_frames, tuple(args.hw))
        return 0
    if args.eval or args.export:
        from .evaluate import evaluate_run, export_run

        ck = _checkpoint(args)
        if args.eval:
            evaluate_run(Path(args.run), ck, n_frames=args.eval_frames, n_seq=args.eval_sequences,
                         window=args.window)
        if args.export:
            export_run(Path(args.run), ck, Path(args.export))
        return 0
    from .trainer import train

    cfg = _train_config(args)
    train(cfg, progress=not args.no_progress)
    return 0
