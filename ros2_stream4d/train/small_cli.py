"""`stream4d train-small`: the small model on the frozen DINOv2 encoder (issue 14).

    stream4d train-small render --pool /work/data/stream4d14/pool_own --sequences 320 --frames 24   # own renderer
    stream4d train-small render --pool /work/data/stream4d14/pool_sim --sequences 48 --source sim   # sim module
    stream4d train-small cache --pool /work/data/stream4d14/pool_own --cache /work/data/stream4d14/cache_own
    stream4d train-small fit --run runs/small1 --cache /work/data/stream4d14/cache_own --minutes 60
    stream4d train-small eval --run runs/small1 --pool /work/data/stream4d14/pool_own --out docs/training
    stream4d train-small export --run runs/small1 --out model/stream4d-small
Every step is resumable: rendering and caching skip finished shards, fitting resumes from <run>/last.pt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("train-small", help="render / cache / fit / eval / export stream4d-small",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("render", help="render a pool of sequences at the model's input size (resumable)")
    r.add_argument("--pool", required=True)
    r.add_argument("--sequences", type=int, default=320)
    r.add_argument("--frames", type=int, default=24)
    r.add_argument("--seed0", type=int, default=0)
    r.add_argument("--source", choices=("own", "sim"), default="own")
    c = sub.add_parser("cache", help="encode a pool with the frozen encoder once (resumable)")
    c.add_argument("--pool", required=True)
    c.add_argument("--cache", required=True)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--follow", type=float, default=0.0, help="keep polling for new shards this many seconds")
    f = sub.add_parser("fit", help="train (or resume) on cached features")
    f.add_argument("--run", required=True)
    f.add_argument("--cache", nargs="+", default=None)
    f.add_argument("--minutes", type=float, default=None, help="LR schedule length (all sittings)")
    f.add_argument("--max-minutes", type=float, default=None, help="stop this sitting after this long")
    f.add_argument("--config", default=None, help="JSON with SmallTrainConfig fields")
    f.add_argument("--threads", type=int, default=None)
    e = sub.add_parser("eval", help="held-out streaming evaluation (3 x 240 frames per kind by default)")
    e.add_argument("--run", required=True)
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--pool", required=True, help="rendered pool (mean-depth baseline maps)")
    e.add_argument("--out", default=None, help="folder for figures and metrics (default <run>/eval)")
    e.add_argument("--sequences", type=int, default=3)
    e.add_argument("--eval-frames", type=int, default=240)
    e.add_argument("--window", type=int, default=16)
    e.add_argument("--sources", nargs="+", default=["own", "sim"])
    e.add_argument("--real", default=None, help="folder of real sequences for depth pictures")
    e.add_argument("--heldout-cache", default=None, help="keep the rendered held-out sequences here (render once)")
    x = sub.add_parser("export", help="write <out>.safetensors (trainable part) and <out>.yaml (card)")
    x.add_argument("--run", required=True)
    x.add_argument("--checkpoint", default=None)
    x.add_argument("--out", required=True)
    x.add_argument("--metrics", default=None, help="metrics JSON to quote in the card")
    p.set_defaults(func=main)


def main(args) -> int:
    if args.action == "render":
        from .small_data import render_pool_source

        render_pool_source(args.pool, args.sequences, args.frames, args.seed0, args.source)
        return 0
    if args.action == "cache":
        from .small_data import cache_pool

        cache_pool(args.pool, args.cache, threads=args.threads, follow_seconds=args.follow)
        return 0
    if args.action == "fit":
        from .small_trainer import SmallTrainConfig, train

        cfg = SmallTrainConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else SmallTrainConfig()
        cfg.run_dir = args.run
        if args.cache:
            cfg.cache = list(args.cache)
        if args.minutes is not None:
            cfg.minutes = args.minutes
        if args.threads is not None:
            cfg.threads = args.threads
        train(cfg, max_minutes=args.max_minutes)
        return 0
    run = Path(args.run)
    ck = Path(args.checkpoint) if args.checkpoint else run / "last.pt"
    if args.action == "eval":
        from .small_eval import evaluate_small

        evaluate_small(run, ck, Path(args.pool), Path(args.out) if args.out else run / "eval", n_seq=args.sequences,
                       n_frames=args.eval_frames, window=args.window, sources=tuple(args.sources), real=args.real,
                       heldout_cache=Path(args.heldout_cache) if args.heldout_cache else None)
        return 0
    from .small_eval import export_small

    export_small(run, ck, Path(args.out), Path(args.metrics) if args.metrics else None)
    return 0
