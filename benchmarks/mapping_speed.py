"""Per-stage CPU times of the mapping layer for one 518x392 prediction (no model: a synthetic prediction).

    python benchmarks/mapping_speed.py [--repeat 5] [--points 200000] [--json results.json]

Stages: preprocess (640x480 camera image -> 518x392), unprojection, frame cloud, voxel fusion of N points into a
map that already holds a few frames, map.points(), save_map to PLY and PCD, nearest resample back to the camera.
Prints the median over --repeat runs; tests never assert times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ros2_stream4d.mapping import conventions as cv
from ros2_stream4d.mapping.cloud import frame_cloud
from ros2_stream4d.mapping.fusion import VoxelMap
from ros2_stream4d.mapping.map_io import save_map
from ros2_stream4d.mapping.preprocess import Preprocessor
from ros2_stream4d.mapping.reconstructor import FramePrediction


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--voxel", type=float, default=0.01)
    ap.add_argument("--max-map-points", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    res: dict[str, float] = {}

    camera = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pre = Preprocessor(518, "crop")
    res["preprocess_640x480_ms"], (image, mapping) = timed(lambda: pre.prepare(camera), args.repeat)
    h, w = mapping.model_hw
    assert (h, w) == (392, 518)

    K = np.array([[400.0, 0, w / 2], [0, 400.0, h / 2], [0, 0, 1]])
    depth = (2.0 + rng.uniform(0, 3, (h, w))).astype(np.float32)
    T = cv.make_transform(np.eye(3), [0.1, 0.0, 0.2])
    res["unproject_ms"], pts = timed(lambda: cv.unproject_depth(depth, K, T), args.repeat)
    conf = rng.uniform(1, 10, (h, w)).astype(np.float32)
    rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    pred = FramePrediction(0, depth, conf, pts, conf, T, K, mapping, rgb)
    res["frame_cloud_all_ms"], (xyz, col, cf) = timed(lambda: frame_cloud(pred), args.repeat)
    res["frame_cloud_pct50_stride2_ms"], _ = timed(lambda: frame_cloud(pred, conf_percentile=50, stride=2),
                                                   args.repeat)
    res["depth_to_source_ms"], _ = timed(pred.depth_source, args.repeat)

    n = args.points
    cloud = (rng.uniform(-2, 2, (n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8),
             rng.uniform(1, 5, n).astype(np.float32))

    def fuse():
        m = VoxelMap(args.voxel, args.max_map_points)
        for i in range(4):  # a map that already holds earlier frames, then the timed one
            m.integrate(cloud[0] + np.float32(0.3 * i), cloud[1], cloud[2])
        t = time.perf_counter()
        m.integrate(cloud[0] + np.float32(0.15), cloud[1], cloud[2])
        return time.perf_counter() - t, m

    fuse_times, maps = zip(*(fuse() for _ in range(args.repeat)))
    vmap = maps[-1]
    res[f"fuse_{n // 1000}k_points_ms"] = statistics.median(fuse_times)
    res["map_voxels"] = len(vmap)
    res["map_points_ms"], (mx, mc, mf) = timed(vmap.points, args.repeat)
    with tempfile.TemporaryDirectory() as d:
        res[f"save_ply_{len(mx) // 1000}k_ms"], _ = timed(lambda: save_map(Path(d) / "m.ply", mx, mc, mf), args.repeat)
        res[f"save_pcd_{len(mx) // 1000}k_ms"], _ = timed(lambda: save_map(Path(d) / "m.pcd", mx, mc, mf), args.repeat)

    for k, v in res.items():
        print(f"{k:32s} {v * 1e3:10.1f}" if k.endswith("_ms") else f"{k:32s} {v:10d}")
    if args.json:
        args.json.write_text(json.dumps({k: (v * 1e3 if k.endswith("_ms") else v) for k, v in res.items()}, indent=2))


if __name__ == "__main__":
    main()
