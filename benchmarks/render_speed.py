"""Rendering speed of the synthetic worlds on ONE core (Embree with 1 thread, numpy/BLAS with 1 thread).

    python benchmarks/render_speed.py [--width 640 --height 480 --frames 30 --scenes room corridor objects outdoor]

Prints frames/s per scene and trajectory (full render: raycast + textures + shading) and the raycast alone, and
writes the figures as JSON with --json. The target is >= 10 frames/s at 640x480. Benchmarks are not tests: nothing
here asserts a time.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one core

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ros2_stream4d.sim.render import CameraModel, Renderer  # noqa: E402
from ros2_stream4d.sim.scenes import SCENE_KINDS, build_scene  # noqa: E402
from ros2_stream4d.sim.trajectories import make_trajectory  # noqa: E402


def bench(scene_kind: str, traj_kind: str, width: int, height: int, frames: int, seed: int) -> dict:
    scene = build_scene(scene_kind, seed)
    traj = make_trajectory(scene, traj_kind, frames, fps=10.0, seed=seed)
    r = Renderer(scene, CameraModel.from_hfov(width, height), nthreads=1)
    r.render(traj.T_world_cam[0])  # warm up (BVH build)
    t0, c0 = time.perf_counter(), time.process_time()
    hits = 0.0
    for T in traj.T_world_cam:
        f = r.render(T)
        hits += np.isfinite(f.depth).mean()
    full, full_cpu = (time.perf_counter() - t0) / frames, (time.process_time() - c0) / frames
    t0, c0 = time.perf_counter(), time.process_time()
    for T in traj.T_world_cam:
        r.cast(T)
    cast, cast_cpu = (time.perf_counter() - t0) / frames, (time.process_time() - c0) / frames
    n_tri = sum(len(p.triangles) for p in scene.parts)
    return {"scene": scene_kind, "trajectory": traj_kind, "fps": 1.0 / full, "ms_per_frame": 1e3 * full,
            "cpu_fps": 1.0 / full_cpu, "cpu_ms_per_frame": 1e3 * full_cpu, "raycast_cpu_ms": 1e3 * cast_cpu,
            "raycast_ms": 1e3 * cast, "shading_ms": 1e3 * (full - cast), "hit_fraction": hits / frames,
            "triangles": n_tri}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", nargs="+", default=list(SCENE_KINDS), choices=SCENE_KINDS)
    ap.add_argument("--trajectories", nargs="+", default=["handheld", "ground_robot"])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # pin to one core where supported
        pinned = True
    except (AttributeError, OSError):
        pinned = False
    print(f"render speed at {args.width}x{args.height}, {args.frames} frames each, one core "
          f"({'pinned' if pinned else 'not pinned'}), {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("frames/s = wall clock; cpu frames/s = per second of this process's CPU time (what one core gives when "
          "other processes compete for it)")
    print(f"{'scene':10s} {'trajectory':13s} {'frames/s':>9s} {'cpu fr/s':>9s} {'ms/frame':>9s} {'raycast ms':>11s} "
          f"{'shading ms':>11s} {'hit %':>6s} {'triangles':>10s}")
    rows = []
    for s in args.scenes:
        for t in args.trajectories:
            row = bench(s, t, args.width, args.height, args.frames, args.seed)
            rows.append(row)
            print(f"{s:10s} {t:13s} {row['fps']:9.1f} {row['cpu_fps']:9.1f} {row['ms_per_frame']:9.1f} "
                  f"{row['raycast_ms']:11.1f} {row['shading_ms']:11.1f} {100 * row['hit_fraction']:6.1f} "
                  f"{row['triangles']:10d}")
    total = len(rows) / sum(1.0 / r["fps"] for r in rows)
    total_cpu = len(rows) / sum(1.0 / r["cpu_fps"] for r in rows)
    print(f"overall: {total:.1f} frames/s wall clock, {total_cpu:.1f} frames/s per CPU second, at "
          f"{args.width}x{args.height} on one core (target >= 10); load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"width": args.width, "height": args.height, "overall_fps": total,
                       "overall_cpu_fps": total_cpu, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
