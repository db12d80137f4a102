"""Map products against sim ground truth with the oracle model: cloud and mesh F-score, mesh accuracy, occupancy IoU,
and the per-frame map update time (the pipeline's ``map_fusion`` stage).

    python benchmarks/map_products.py --scene room --frames 200 [--out results.json]

The oracle session gives exact depth and poses at the model resolution (640x480 input, 518 wide). A ground-robot
trajectory is used with the base->camera extrinsic, so ``map`` = base_link at the first frame and the floor is z = 0;
ground truth is moved into ``map`` by the inverse of the first base pose. Metrics: ros2_stream4d/eval/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", default="room")
    p.add_argument("--trajectory", default="ground_robot")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voxel", type=float, default=0.05, help="TSDF voxel, grid cell and F-score threshold (m)")
    p.add_argument("--cloud-voxel", type=float, default=0.02)
    p.add_argument("--conf-percentile", type=float, default=30.0, help="as the demo sets it")
    p.add_argument("--depth-max", type=float, default=5.0, help="map_depth_max (m)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from ros2_stream4d.eval.metrics import (
        map_metrics,
        mesh_metrics,
        observed_cells,
        observed_surface,
        occupancy_iou,
        reference_occupancy,
    )
    from ros2_stream4d.mapping.conventions import inverse
    from ros2_stream4d.mapping.occupancy import OccupancyOptions
    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig
    from ros2_stream4d.sim.oracle import OracleSession
    from ros2_stream4d.sim.render import CameraModel, raycast_depth
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene(args.scene, args.seed)
    traj = make_trajectory(scene, args.trajectory, args.frames, 10.0, args.seed)
    cam = CameraModel.from_hfov(640, 480, 60.0)
    K, (h, w) = cam.K, (480, 640)
    V = np.concatenate([pt.vertices for pt in scene.parts])
    offs = np.cumsum([0] + [len(pt.vertices) for pt in scene.parts[:-1]])
    F = np.concatenate([pt.triangles + o for pt, o in zip(scene.parts, offs)])
    stamps = 1_000_000_000 + np.arange(args.frames, dtype=np.int64) * 100_000_000
    T_wc = traj.T_world_cam
    session = OracleSession(stamps, T_wc, K, source_hw=(h, w), mesh=(V, F))
    cfg = PipelineConfig(input_width=518, conf_percentile=args.conf_percentile, map_voxel_size=args.cloud_voxel,
                         tsdf_voxel_size=args.voxel, occupancy_resolution=args.voxel, intrinsics_source="model",
                         map_depth_max=args.depth_max)
    pipe = MappingPipeline(cfg, session)
    T_base_cam = traj.T_base_cam
    img = np.zeros((h, w, 3), np.uint8)
    times = []
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    for i in range(args.frames):
        pipe.process(img, int(stamps[i]), T_base_cam=T_base_cam)
        times.append(pipe.timings["map_fusion"])
    wall = time.perf_counter() - t_all
    load1 = os.getloadavg()
    # ground truth into map: map = base at frame 0
    T_map_world = inverse(traj.T_world_base[0])
    Vm = V @ T_map_world[:3, :3].T + T_map_world[:3, 3]
    T_map_cam = np.einsum("ij,njk->nik", T_map_world, T_wc)
    gt_depths = np.stack([raycast_depth(scene.raycasting_scene, K, T, w, h) for T in T_wc]).astype(np.float32)
    surface = observed_surface(gt_depths, K, T_map_cam, voxel=args.voxel / 2)
    out = {"scene": args.scene, "trajectory": args.trajectory, "frames": args.frames, "voxel": args.voxel,
           "cloud_voxel": args.cloud_voxel, "map_update_ms_median": 1e3 * statistics.median(times[1:]),
           "map_update_ms_p90": 1e3 * float(np.percentile(times[1:], 90)), "wall_s": wall,
           "loadavg_before": load0, "loadavg_after": load1, **pipe.map.stats()}
    xyz, _, _ = pipe.map_points()
    m = map_metrics(xyz, Vm, F, threshold=args.voxel, surface_samples=surface)
    out.update({k: v for k, v in m.items() if not k.endswith("_errors")})
    t = time.perf_counter()
    mv, mf, _ = pipe.mesh()
    out["mesh_extract_ms"] = 1e3 * (time.perf_counter() - t)
    out.update(mesh_metrics(mv, mf, Vm, F, threshold=args.voxel, surface_samples=surface))
    t = time.perf_counter()
    data, origin, res = pipe.occupancy()
    out["grid_ms"] = 1e3 * (time.perf_counter() - t)
    lo = np.round(np.asarray(origin) / res).astype(np.int64)
    o = pipe.map.config.occupancy_options()
    ref = reference_occupancy(Vm, F, lo, data.shape, res, o.floor_z, o.min_height, o.max_height)
    seen, seen_occ = observed_cells(gt_depths, K, T_map_cam, lo, data.shape, OccupancyOptions(
        res, o.floor_z, o.min_height, o.max_height, o.max_range))
    out.update(occupancy_iou(data, ref, seen, seen_occ))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
