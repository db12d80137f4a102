"""`stream4d eval`: compare a prediction bag (the node's outputs) with a sim bag's ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="trajectory (ATE/RPE), depth and map metrics of a prediction bag against a sim bag",
        description=__doc__ + " Writes report.md, metrics.json and PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pred", required=True, help="prediction bag (/stream4d/camera_pose, /stream4d/depth, ...)")
    p.add_argument("--gt", required=True, help="ground-truth sim bag written by `stream4d sim`")
    p.add_argument("--out", default=None, help="report directory (default: <pred>_eval)")
    p.add_argument("--align", choices=("sim3", "se3", "scale", "none"), default="sim3",
                   help="trajectory alignment before ATE (sim3 for up-to-scale predictions)")
    p.add_argument("--depth-align", default="median",
                   help="per-frame depth scale: median, none, or a number")
    p.add_argument("--rpe-delta", type=int, default=1, help="RPE frame distance")
    p.add_argument("--map-threshold", type=float, default=0.05, help="distance threshold of precision/recall (m)")
    p.add_argument("--pose-topic", default="/stream4d/camera_pose")
    p.add_argument("--depth-topic", default=None,
                   help="default: /stream4d/depth/image when the bag has it, else /stream4d/depth_relative/image")
    p.add_argument("--map-topic", default="/stream4d/map")
    p.add_argument("--map-file", default=None,
                   help="the map the run ended with (~/save_map's .ply/.pcd or map directory): scored instead of the "
                        "bag's last map message; a map directory also scores the mesh and the occupancy grid")
    p.add_argument("--stamp-tolerance", type=float, default=0.0, help="stamp matching tolerance (ms)")
    p.add_argument("--title", default="stream4d evaluation")
    p.set_defaults(func=run)


def run(args) -> int:
    from .evaluate import evaluate_bags
    from .report import write_report

    depth_align = args.depth_align if args.depth_align in ("median", "none") else float(args.depth_align)
    result = evaluate_bags(args.pred, args.gt, pose_topic=args.pose_topic, depth_topic=args.depth_topic,
                           map_topic=args.map_topic, align=args.align, depth_align=depth_align,
                           rpe_delta=args.rpe_delta, map_threshold=args.map_threshold,
                           stamp_tolerance_ns=int(round(args.stamp_tolerance * 1e6)), map_file=args.map_file)
    out = Path(args.out) if args.out else Path(str(Path(args.pred)).rstrip("/") + "_eval")
    files = write_report(result, out, title=args.title)
    m = result.metrics
    print(f"matched {m['matched_poses']} poses, {m['matched_depths']} depth maps")
    print(f"ATE RMSE {m['ate_rmse']:.4f} m ({args.align}, scale {m['scale']:.4f}); RPE {m['rpe_trans_rmse']:.4f} m "
          f"{m['rpe_rot_rmse']:.3f} deg")
    if "depth_abs_rel" in m:
        print(f"depth AbsRel {m['depth_abs_rel']:.4f}  RMSE {m['depth_rmse']:.4f} m  delta<1.25 {m['depth_delta1']:.4f}")
    if "map_fscore" in m:
        print(f"map accuracy {m['map_accuracy_mean']:.4f} m  completeness {m['map_completeness_mean']:.4f} m  "
              f"F-score {m['map_fscore']:.3f} (@{m['map_threshold']} m)")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {files['report']}")
    for path in files.values():
        if path.suffix == ".png":
            print(f"  plot: {path}")
    return 0
