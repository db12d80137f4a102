#!/usr/bin/env python3
"""Long synthetic loops: ATE of a drifting front-end with and without the back-end (segments, loop closure, Sim(3)
pose graph). Writes docs/longrun/results.json and PNG figures; prints a summary.

The front-end is the exact oracle (sim/oracle.py, depth re-raycast from the scene mesh) wrapped in the seeded drift
model of mapping/backend/drift.py: NOT a learned model. Variants per run:
  plain        the drifted stream, one segment (no back-end)
  segments     the same stream cut into re-anchored, Sim(3)-aligned segments (mapping/backend/segments.py)
  plain+graph  plain + loop closure + pose graph
  full         segments + loop closure + pose graph (the back-end)
  exact        the exact oracle through segments + loop closure + pose graph (must change nothing)

usage: nice -n 19 python scripts/longrun.py [--frames 900] [--runs corridor:4,objects:3] [--exact-runs 1] [--out docs/longrun]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ros2_stream4d.mapping.backend import sim3 as S3
from ros2_stream4d.mapping.backend.drift import DriftedSession
from ros2_stream4d.mapping.backend.loops import KeyframeView, LoopDetector
from ros2_stream4d.mapping.backend.posegraph import LOOP, BackendWorker
from ros2_stream4d.mapping.backend.segments import ReanchorPolicy, SegmentedSession
from ros2_stream4d.mapping.conventions import extrinsic_to_pose, inverse

DRIFT = dict(scale_per_m=0.003, scale_per_m2=0.0003, yaw_deg_per_m=0.3, yaw_deg_per_m2=0.02, scale_walk=0.002,
             yaw_walk_deg=0.05)
DT_NS = 100_000_000
KF_DISTANCE, KF_ANGLE = 0.3, 15.0


def load_run(kind: str, seed: int, frames: int, width: int, height: int):
    from ros2_stream4d.sim.render import CameraModel, Renderer
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene(kind, seed)
    traj = make_trajectory(scene, "ground_robot", n_frames=frames, fps=10, seed=seed)
    cam = CameraModel.from_hfov(width, height, 70)
    mesh = scene.mesh()
    return traj, cam, (np.asarray(mesh.vertices), np.asarray(mesh.triangles)), Renderer(scene, cam)


def front_end(traj, cam, mesh, segments: bool, drift: bool, seed: int):
    """Per frame: (T_odom_cam, depth, K) of the drifted (or exact) stream, and the segment events."""
    from ros2_stream4d.sim.oracle import OracleSession

    n = len(traj)
    s = OracleSession(np.arange(n) * DT_NS, traj.T_world_cam, cam.K, source_hw=(cam.height, cam.width), mesh=mesh)
    if drift:
        s = DriftedSession(s, seed=seed, **DRIFT)
    if segments:
        s = SegmentedSession(s, ReanchorPolicy(min_anchor_overlap=0.3, max_segment_frames=120, min_segment_frames=24,
                                               overlap_frames=8))
    poses, depths = [], {}
    for i in range(n):
        o = s.step(None, stamp_ns=i * DT_NS)
        T = extrinsic_to_pose(o["extrinsic"][0].double().numpy())
        poses.append(T)
        depths[i] = (o["depth"][0, ..., 0].numpy(), o["intrinsic"][0].double().numpy())
    events = s.segment_stats.events if segments else []
    return np.stack(poses), depths, events


def keyframe_indices(P):
    kfs, last = [0], P[0]
    for i in range(1, len(P)):
        rel = inverse(last) @ P[i]
        if np.linalg.norm(rel[:3, 3]) > KF_DISTANCE or S3.rotation_angle_deg(rel[:3, :3]) > KF_ANGLE:
            kfs.append(i)
            last = P[i]
    return kfs


def back_end(P, depths, renderer, T_world_cam, T_true, kf_idx):
    """Loop closure + pose graph over the keyframes of a stream: corrected per-frame positions and stats."""
    worker = BackendWorker()
    det = LoopDetector()
    per_kf, loops = [], []
    images = {}
    try:
        for k, i in enumerate(kf_idx):
            t0 = time.perf_counter()
            worker.add_keyframe(k, P[i])
            if i not in images:
                images[i] = renderer.render(T_world_cam[i]).rgb  # what the camera saw (never drifted)
            d, K = depths[i]
            det.add(KeyframeView(k, images[i], np.where(d > 0, d, np.nan), K, P[i]))
            found = False
            for r in det.detect():
                Ti, Tj = T_true[kf_idx[r.i]], T_true[i]
                gt_dist = float(np.linalg.norm(Ti[:3, 3] - Tj[:3, 3]))
                rel = inverse(Ti) @ Tj
                if r.accepted:  # correct = the measured relative pose is the true one (scale drift <= ~10 %)
                    Rm, tm, _ = S3.decompose(r.S_i_j)
                    correct = bool(S3.rotation_angle_deg(Rm.T @ rel[:3, :3]) < 3.0
                                   and np.linalg.norm(tm - rel[:3, 3]) < 0.2)
                else:
                    correct = gt_dist < 1.0 and S3.rotation_angle_deg(rel[:3, :3]) < 30.0
                loops.append({"i": r.i, "j": r.j, "accepted": r.accepted, "reason": r.reason,
                              "gt_distance_m": gt_dist, "true_revisit": correct})
                if r.accepted:
                    worker.add_edge(r.i, r.j, r.S_i_j, LOOP)
                    found = True
            if found:
                worker.request()
            per_kf.append(time.perf_counter() - t0)
        worker.request()
        worker.wait_idle(600)
        X = worker.poses()
        results = list(worker.results)
        rejected_by_graph = sorted({tuple(e) for r in results if r.ok for e in r.rejected_edges})
    finally:
        worker.close()
    # every frame follows its keyframe's correction
    corrected = np.empty((len(P), 3))
    k = 0
    for i in range(len(P)):
        while k + 1 < len(kf_idx) and kf_idx[k + 1] <= i:
            k += 1
        C = X[k] @ S3.inverse(P[kf_idx[k]])
        corrected[i] = S3.apply(C, P[i][:3, 3][None])[0]
    opt = [r for r in results if r.ok]
    stats = {"keyframes": len(kf_idx), "loops": loops,
             "loops_accepted": sum(x["accepted"] for x in loops),
             "loops_accepted_true": sum(x["accepted"] and x["true_revisit"] for x in loops),
             "loops_rejected": sum(not x["accepted"] for x in loops),
             "edges_rejected_by_graph": [list(e) for e in rejected_by_graph],
             "optimisations_ok": len(opt), "optimisations_dropped": [r.reason for r in results if not r.ok],
             "time_per_keyframe_ms_median": 1e3 * float(np.median(per_kf)),
             "time_per_keyframe_ms_p95": 1e3 * float(np.percentile(per_kf, 95)),
             "time_per_optimisation_ms_median": 1e3 * float(np.median([r.seconds for r in opt])) if opt else None,
             "kf_positions": np.array([X[k][:3, 3] for k in range(len(kf_idx))]).tolist()}
    return corrected, stats


def ate(est_xyz, gt_xyz, sim3_align=True):
    A = S3.umeyama(est_xyz, gt_xyz, with_scale=sim3_align)
    e = S3.apply(A, est_xyz) - gt_xyz
    return float(np.sqrt((e ** 2).sum(1).mean())), A


def run_one(kind, seed, frames, width, height, out: Path, exact: bool = True, only=("plain", "segments", "exact")):
    traj, cam, mesh, renderer = load_run(kind, seed, frames, width, height)
    T = traj.T_world_cam
    G = np.stack([inverse(T[0]) @ t for t in T])  # the front-end's world = the first camera
    gt = G[:, :3, 3]
    res = {"scene": kind, "seed": seed, "frames": frames, "loop_length_m": traj.params["loop_length"],
           "path_m": float(np.linalg.norm(np.diff(gt, axis=0), axis=1).sum())}
    tracks = {"ground truth": gt}
    variants = (("plain", False, True), ("segments", True, True)) + ((("exact", True, False),) if exact else ())
    variants = tuple(v for v in variants if v[0] in only)
    for name, segs, drift in variants:
        t0 = time.perf_counter()
        P, depths, events = front_end(traj, cam, mesh, segs, drift, seed)
        t_fe = time.perf_counter() - t0
        kf_idx = keyframe_indices(P)
        a, _ = ate(P[:, :3, 3], gt)
        res[name] = {"ate_m": a, "segments": 1 + len(events), "front_end_s": t_fe,
                     "segment_alignments_failed": sum(not e.ok for e in events)}
        if name != "exact":
            tracks[name] = P[:, :3, 3]
        t0 = time.perf_counter()
        corrected, stats = back_end(P, depths, renderer, T, G, kf_idx)
        stats["back_end_s"] = time.perf_counter() - t0
        a_be, _ = ate(corrected, gt)
        key = {"plain": "plain+graph", "segments": "full", "exact": "exact+graph"}[name]
        res[key] = {"ate_m": a_be, **{k: v for k, v in stats.items() if k != "kf_positions"}}
        if name == "exact":
            res[key]["max_change_m"] = float(np.abs(corrected - P[:, :3, 3]).max())
            res[key]["ate_change_m"] = abs(a_be - a)
        else:
            tracks[key] = corrected
            if key == "full":
                res["_full_kf"] = (stats["kf_positions"], [(x["i"], x["j"]) for x in stats["loops"] if x["accepted"]],
                                   kf_idx)
        print(f"{kind}:{seed} {name:9s} ATE {a:.3f} m -> {key:12s} ATE {a_be:.4f} m; loops accepted "
              f"{stats['loops_accepted']} (true {stats['loops_accepted_true']}) rejected {stats['loops_rejected']}; "
              f"segments {1 + len(events)}", flush=True)
    plot_run(res, tracks, out / f"traj_{kind}_{seed}.png")
    res.pop("_full_kf", None)
    return res


def plot_run(res, tracks, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    gt = tracks["ground truth"]
    styles = {"ground truth": ("k", 2.0), "plain": ("tab:red", 1.0), "segments": ("tab:orange", 1.0),
              "plain+graph": ("tab:purple", 1.0), "full": ("tab:green", 1.5)}
    for name, xyz in tracks.items():
        al = xyz if name == "ground truth" else S3.apply(ate(xyz, gt)[1], xyz)
        label = name if name == "ground truth" else f"{name} (ATE {ate(xyz, gt)[0]:.3f} m)"
        ax.plot(al[:, 0], al[:, 2], color=styles[name][0], lw=styles[name][1], label=label)
    if "_full_kf" in res:
        kf_pos, pairs, kf_idx = res["_full_kf"]
        full = tracks["full"]
        A = ate(full, gt)[1]
        for i, j in pairs:
            a, b = S3.apply(A, full[[kf_idx[i], kf_idx[j]]])
            ax.plot([a[0], b[0]], [a[2], b[2]], color="tab:blue", lw=0.8)
        ax.plot([], [], color="tab:blue", lw=0.8, label=f"accepted loops ({len(pairs)})")
    ax.set_aspect("equal")
    ax.set_xlabel("x of the first camera (m)")
    ax.set_ylabel("z of the first camera (m, forward)")
    ax.set_title(f"{res['scene']} seed {res['seed']}: {res['frames']} frames, {res['path_m']:.0f} m")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=900)
    p.add_argument("--runs", default="corridor:4,objects:3")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--out", default="docs/longrun")
    p.add_argument("--exact-runs", type=int, default=1, help="the first N runs also run the exact oracle")
    p.add_argument("--variants", default="plain,segments,exact", help="which front-ends to run")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = [open("/proc/loadavg").read().strip()]
    t0 = time.time()
    runs = []
    for n, spec in enumerate(a.runs.split(",")):
        kind, seed = spec.split(":")
        runs.append(run_one(kind, int(seed), a.frames, a.width, a.height, out, exact=n < a.exact_runs,
                            only=tuple(a.variants.split(","))))
        load.append(open("/proc/loadavg").read().strip())
        summary = {"drift": DRIFT, "keyframe_distance_m": KF_DISTANCE, "keyframe_angle_deg": KF_ANGLE,
                   "image": [a.width, a.height], "loadavg": load, "wall_s": time.time() - t0, "runs": runs}
        (out / "results.json").write_text(json.dumps(summary, indent=1))  # after every run
    print(json.dumps({r["scene"] + ":" + str(r["seed"]): {k: r[k]["ate_m"] for k in
                                                           ("plain", "segments", "plain+graph", "full", "exact+graph")
                                                           if k in r}
                      for r in runs}, indent=1))


if __name__ == "__main__":
    main()
