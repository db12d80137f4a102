"""The keyframe map's cloud and mesh under a model's depth errors, with exact poses: which map settings keep the
map accurate (issue 13's map F-score; docs/longrun/README.md, "The map under depth noise").

    python benchmarks/map_depth_noise.py --trajectory loop --seed 0 --noise realistic --out map_depth_noise.json

Every frame of a long office sim bag (the one `stream4d bench longrun` uses, cached in --cache) gets the oracle's
per-pixel errors of ``--noise`` (sim/oracle_noise.py: depth noise growing with depth, outliers, a confidence that is
lower where the depth is wrong; its pose terms are not used: the ground-truth poses are) and is fused into one
``MapProducts`` per map confidence percentile (the keyframe map's products, fed exactly as the map feeds them).
For each, the cloud's F-score at --threshold with and without the surface filter (``cloud_surface_voxels``) and
the pull toward the surface (``cloud_surface_pull``, --pulls), and the TSDF mesh's, against the surface the
ground-truth depth observed. Progress every 200 frames.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", default="office")
    p.add_argument("--trajectory", default="loop")
    p.add_argument("--frames", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default="realistic", help="oracle_noise: realistic, none or a YAML file")
    p.add_argument("--percentiles", type=float, nargs="+", default=[0.0, 30.0, 50.0, 70.0, 85.0])
    p.add_argument("--surface-voxels", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--pulls", type=float, nargs="+", default=[0.0, 0.75],
                   help="cloud_surface_pull values (with a surface filter > 0)")
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--max-points", type=int, default=2_000_000, help="the cloud's voxel cap (the longrun bench's)")
    p.add_argument("--cache", default="/tmp/stream4d_longrun")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)

    from ros2_stream4d.bench.env import environment
    from ros2_stream4d.bench.longrun_bench import ground_truth_in_map, read_inputs, sim_bag
    from ros2_stream4d.eval.metrics import map_metrics, mesh_metrics
    from ros2_stream4d.mapping.keyframe_map import KeyframeMapConfig, MapProducts, fit_to_surface
    from ros2_stream4d.sim.oracle_noise import load_noise, perturb_depth

    bag = sim_bag(Path(a.cache), a.scene, a.trajectory, a.frames, 224, 168, a.seed)
    stamps, images, _ = read_inputs(bag)
    gt, gt_T, (Vm, F), surface = ground_truth_in_map(bag, a.threshold)
    noise = load_noise(a.noise)
    rng = np.random.default_rng(a.seed)
    # the bench's map: 2 cm cloud voxels (at most 2 M), 5 cm TSDF to 5 m, every stored pixel (stride 1)
    products = {pct: MapProducts(KeyframeMapConfig(cloud_max_points=a.max_points, occupancy=False, cloud_stride=2,
                                                   conf_percentile=pct, cloud_surface_voxels=0.0))
                for pct in a.percentiles}
    t0 = time.perf_counter()
    for i in range(len(stamps)):
        exact = gt.depths[i].astype(np.float64)
        valid = exact > 0
        conf = np.where(valid, 100.0, 0.0)  # the oracle's exact confidence
        depth = exact
        if noise is not None:
            depth, conf, _ = perturb_depth(exact, conf, noise, rng)
        d = np.where(valid & (depth > 0), depth, np.nan).astype(np.float32)
        for pr in products.values():
            pr.fuse(d, conf.astype(np.float32), images[i], gt.K, gt_T[i])
        if i % 200 == 0 or i == len(stamps) - 1:
            print(f"frame {i + 1}/{len(stamps)}  {time.perf_counter() - t0:.0f} s  load {os.getloadavg()[0]:.1f}",
                  flush=True)
    # the pull acts only with a surface filter: without one, a single row (no pull)
    settings = [(sv, pull) for sv in a.surface_voxels for pull in (a.pulls if sv > 0 else [0.0])]
    rows = []
    for pct, pr in products.items():
        v, f, _ = pr.tsdf.mesh()
        mm = mesh_metrics(v.astype(np.float64), f, Vm, F, threshold=a.threshold, surface_samples=surface)
        for sv, pull in settings:
            pr.config.cloud_surface_voxels, pr.config.cloud_surface_pull = sv, pull
            t1 = time.perf_counter()
            xyz = fit_to_surface(*pr.cloud_snapshot(), pr.config)[0].astype(np.float64)
            query_s = time.perf_counter() - t1
            m = map_metrics(xyz, Vm, F, threshold=a.threshold, surface_samples=surface)
            row = {"conf_percentile": pct, "cloud_surface_voxels": sv, "cloud_surface_pull": pull,
                   "cloud_points": len(xyz), "cloud_precision": m["map_precision"], "cloud_recall": m["map_recall"],
                   "cloud_fscore": m["map_fscore"], "cloud_query_s": query_s,
                   "mesh_precision": mm["mesh_precision"], "mesh_recall": mm["mesh_recall"],
                   "mesh_fscore": mm["mesh_fscore"]}
            rows.append(row)
            print(f"map_conf_percentile {pct:4.0f}  surface filter {sv:3.1f} voxel(s), pull {pull:.2f}: cloud F "
                  f"{m['map_fscore']:.3f} (P {m['map_precision']:.3f} R {m['map_recall']:.3f}, {len(xyz)} points, "
                  f"query {query_s:.2f} s); mesh F {mm['mesh_fscore']:.3f} (P {mm['mesh_precision']:.3f} "
                  f"R {mm['mesh_recall']:.3f})", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"schema": "stream4d.bench.map_depth_noise/1", "environment":
                                           environment("cpu"), "scene": a.scene, "trajectory": a.trajectory,
                                           "frames": a.frames, "seed": a.seed, "noise": a.noise,
                                           "threshold": a.threshold, "rows": rows}, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
