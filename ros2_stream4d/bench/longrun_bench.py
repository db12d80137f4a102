"""`stream4d bench longrun`: the long-run back-end through the mapping pipeline the node runs, back-end off and on.

For each seed a sim bag is written once (``stream4d sim``: scene, trajectory, frames; cached under --cache), then the
oracle model replays it with the front-end error model ``oracle_noise`` (seeded by the same seed) through
``MappingPipeline`` twice: ``backend=False`` (odometry only) and ``backend=True`` (re-anchored segments, loop closure,
Sim(3) pose graph; exactly the node's code path, loader included). Camera only: ``map`` is the REP-103 body frame of
the first camera, as the node publishes it.

Per run it records:
- ATE / RPE (eval/metrics.py; Sim(3)-aligned) of three trajectories: ``odometry`` (the poses the pipeline
  publishes as odometry), ``online`` (each frame's published ~/camera_pose: odometry moved by the correction in force
  at that frame) and ``final`` (every frame moved with the keyframe it was integrated into, by that keyframe's final
  correction: the trajectory the saved map holds);
- loops: candidates verified, accepted, rejected (by reason); an accepted loop joins the *same place* when its two
  keyframes are within 1 m and 30 deg of each other in the ground truth (else it is a false loop: a look-alike
  place); it is *accurate* when its measured relative pose is the ground truth's (rotation within 3 deg, translation
  within 0.2 m + 10 % of the keyframes' distance); precision = same place / accepted;
- map accuracy after correction: the keyframe map's cloud, moved onto the ground truth by the final trajectory's
  Sim(3) alignment, against the scene mesh (F-score at --threshold; completeness against the surface the ground-truth
  depth observed);
- cost: the back-end's added per-frame time in the frame thread (the pipeline's ``backend`` stage: copying new
  keyframes, applying corrections), its worker's time per keyframe and per optimisation, and resident memory.

Writes <out>/<name>.json and <name>.png (top view: ground truth, back-end off and on, accepted loops).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

TRUE_ROT_DEG, TRUE_TRANS_M, TRUE_TRANS_FRAC = 3.0, 0.2, 0.1
SAME_PLACE_M, SAME_PLACE_DEG = 1.0, 30.0


# the cloud's voxel cap: the office figure-eight's cloud under the realistic depth noise (noisy pixels fill voxels off
# the surface until ~/map's surface filter leaves them out) outgrew 2 M, and the oldest voxels, true surface among
# them, were evicted: with exact poses its cloud F was 0.815 at 2 M and 0.923 at 8 M (benchmarks/map_depth_noise.py,
# the 1-voxel filter of the time, no pull)
MAP_MAX_POINTS = 8_000_000


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def heap_mib() -> dict[str, float] | None:
    """glibc's malloc accounting over all its arenas (malloc_info) in MiB: ``in_use`` (allocated from the arenas),
    ``free_held`` (freed but kept by the arenas: resident memory no object holds), ``mmapped`` (large blocks, returned
    to the system on free), and the number of arenas; None where the C library has no malloc_info (the JSON then
    says null). Tells a growing map from memory the allocator keeps."""
    import tempfile
    import xml.etree.ElementTree as ET

    try:
        libc = ctypes.CDLL(None)
        malloc_info, fopen, fclose = libc.malloc_info, libc.fopen, libc.fclose
    except (OSError, AttributeError):
        return None
    fopen.restype, fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
    malloc_info.argtypes, fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r", suffix=".xml") as f:
        fp = fopen(f.name.encode(), b"w")
        if not fp:
            return None
        malloc_info(0, fp)
        fclose(fp)
        root = ET.fromstring(f.read())
    total = {e.get("type"): int(e.get("size")) for e in root.findall("total")}
    system = {e.get("type"): int(e.get("size")) for e in root.findall("system")}
    free = total.get("fast", 0) + total.get("rest", 0)
    mib = 2.0**20
    return {"in_use": (system["current"] - free) / mib, "free_held": free / mib, "mmapped": total.get("mmap", 0) / mib,
            "arenas": len(root.findall("heap"))}


def memory_sample(frame: int, pipe) -> dict:
    """What the process holds at a frame: RSS, the allocator's split (heap_mib), and the keyframe map's own sizes
    (points in its cloud, TSDF blocks, keyframes and their bytes in RAM: the parts that may grow with the run)."""
    st = pipe.map.stats()
    return {"frame": frame, "rss": rss_mib(), "heap": heap_mib(), "map_points": st["map points"],
            "tsdf_blocks": st["tsdf blocks"], "keyframes": st["keyframes"],
            "keyframes_in_memory": st["keyframes in memory"], "keyframe_mib": st["keyframe bytes in memory"] / 2**20}


def sim_bag(cache: Path, scene: str, trajectory: str, frames: int, width: int, height: int, seed: int) -> Path:
    """The sim bag of one run, written once (its directory name says what it holds)."""
    from ros2_stream4d.sim.bag import SimConfig, write_sim_bag

    path = cache / f"{scene}_{trajectory}_{frames}_{width}x{height}_s{seed}"
    if not (path / "metadata.yaml").exists():
        write_sim_bag(path, SimConfig(scene=scene, trajectory=trajectory, frames=frames, width=width, height=height,
                                      seed=seed, hfov_deg=70.0), progress=True, overwrite=True)
    return path


def read_inputs(bag: Path):
    """(stamps, rgb images, K) of the bag's camera."""
    from ros2_stream4d.codec import camera_info_to_k, image_to_rgb, stamp_ns
    from ros2_stream4d.sim.bag import TOPICS, iter_messages

    stamps, images, K = [], [], None
    for topic, _, msg in iter_messages(bag, [TOPICS["image"], TOPICS["camera_info"]]):
        if topic == TOPICS["camera_info"]:
            K = K if K is not None else camera_info_to_k(msg)[0]
        else:
            stamps.append(stamp_ns(msg.header.stamp))
            images.append(image_to_rgb(msg))
    order = np.argsort(stamps)
    return np.asarray(stamps, np.int64)[order], [images[i] for i in order], K


def ground_truth_in_map(bag: Path, threshold: float):
    """The bag's ground truth in the pipeline's map (camera only: the first camera's body axes): (ground truth with
    depth, camera poses (N, 4, 4) in map, scene mesh (vertices in map, triangles), the observed surface sampled at
    threshold / 2)."""
    from ros2_stream4d.eval.metrics import observed_surface
    from ros2_stream4d.mapping.conventions import T_MAP_WORLD, inverse
    from ros2_stream4d.sim.bag import read_ground_truth
    from ros2_stream4d.sim.scenes import load_mesh

    gt = read_ground_truth(bag, with_depth=True)
    T_map_world = T_MAP_WORLD @ inverse(gt.T_world_cam[0])
    gt_T = np.einsum("ij,njk->nik", T_map_world, gt.T_world_cam)
    V, F = load_mesh(gt.mesh_path)
    Vm = V @ T_map_world[:3, :3].T + T_map_world[:3, 3]
    return gt, gt_T, (Vm, F), observed_surface(gt.depths, gt.K, gt_T, voxel=threshold / 2)


def run_pipeline(bag: Path, images, stamps, K, backend: bool, noise: str, seed: int, input_width: int,
                 conf_percentile: float = 30.0, progress: bool = True, loop_overrides: dict | None = None,
                 lockstep: bool = False, sample_memory: bool = False, **pipeline_overrides) -> dict:
    """One pass of the bag through the node's pipeline; per-frame poses and the keyframe map at the end.

    lockstep: the back-end in step with the frames, for comparisons that timing must not blur: after every frame
    the bench waits for its worker, the graph is solved in the worker itself (no child process, no duty pause) and
    an accepted correction is applied before the next frame. Two lockstep runs give the same figures; a live run
    (the node's way: the worker and the optimiser beside the frames) gives figures that depend on when each
    correction lands (docs/longrun/README.md). The time figures of a lockstep run are not the node's.
    sample_memory: every 500 frames a memory_sample in rec["memory"] (the memory runs)."""
    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.pipeline import PipelineConfig

    opts = ModelOptions(model="oracle", oracle_bag=str(bag), oracle_noise=noise, oracle_seed=seed, device="cpu",
                        torch_threads=1)
    cfg = PipelineConfig(input_width=input_width, conf_percentile=conf_percentile, intrinsics_source="model",
                         # 2 cm cloud voxels, at most MAP_MAX_POINTS of them
                         mesh_enabled=True, occupancy_enabled=False, map_voxel_size=0.02, map_max_points=MAP_MAX_POINTS,
                         map_stride=1,  # keyframes keep the full (small) image: ORB needs its pixels
                         backend=backend, backend_apply_rate=2.0)
    cfg = dataclasses.replace(cfg, **pipeline_overrides)
    pipe = load_pipeline(opts, cfg)
    if loop_overrides and pipe.backend is not None:  # experiments on loop verification settings
        pipe.backend.detector.config = dataclasses.replace(pipe.backend.detector.config, **loop_overrides)
    if lockstep and pipe.backend is not None:
        pipe.backend.config = dataclasses.replace(pipe.backend.config, optimise_in_subprocess=False,
                                                  optimise_duty=1.0)
    n = len(stamps)
    rec = {"T_odom_cam": np.zeros((n, 4, 4)), "C": np.zeros((n, 4, 4)), "kf": np.zeros(n, np.int64),
           "T_kf_cam": np.zeros((n, 4, 4)), "backend_s": [], "frame_s": [], "rss": [], "memory": []}
    t_start = time.perf_counter()
    try:
        for i in range(n):
            t0 = time.perf_counter()
            out = pipe.process(images[i], int(stamps[i]), K_src=K)
            rec["frame_s"].append(time.perf_counter() - t0)
            if lockstep and pipe.backend is not None:
                pipe.backend.wait_idle()
                pipe.backend.apply(pipe)
            r = out.result
            rec["T_odom_cam"][i] = r.T_map_cam
            rec["C"][i] = r.odom_correction if r.odom_correction is not None else np.eye(4)
            kf = pipe.map.keyframes[-1]  # the keyframe this frame was integrated into
            # the frame's pose relative to its keyframe, as the map stores it (what its geometry follows)
            rec["kf"][i], rec["T_kf_cam"][i] = kf.id, kf.frames.T_kf_cam[kf.n_frames - 1]
            if backend:
                rec["backend_s"].append(pipe.timings["backend"])
            if i % 100 == 0 or i == n - 1:
                rec["rss"].append((i, rss_mib()))
                if sample_memory and (i % 500 == 0 or i == n - 1):  # the memory runs' split (run_memory)
                    rec["memory"].append(memory_sample(i, pipe))
                if progress:
                    print(f"  backend={backend} frame {i + 1}/{n}  {time.perf_counter() - t_start:.0f} s  "
                          f"RSS {rec['rss'][-1][1]:.0f} MiB  load {os.getloadavg()[0]:.1f}", flush=True)
        t_settle = time.perf_counter()
        rec["settled"] = pipe.settle_backend(timeout=900)
        rec["settle_s"] = time.perf_counter() - t_settle
        rec["wall_s"] = time.perf_counter() - t_start
        rec["kf_final"] = {kf.id: kf.T_map_kf.copy() for kf in pipe.map.keyframes}
        rec["kf_stamp"] = {kf.id: int(pipe.map.frames_of(kf).stamps[0]) for kf in pipe.map.keyframes}
        rec["cloud"] = pipe.map_points()[0].astype(np.float64)
        vertices, triangles, _ = pipe.mesh()
        rec["mesh"] = (vertices.astype(np.float64), triangles)
        rec["diagnostics"] = pipe.backend.diagnostics() if pipe.backend is not None else {}
        rec["loops"] = list(pipe.backend.detector.history) if pipe.backend is not None else []
        # each loop edge's final state: in the final solve (True) or switched off by the graph (False)
        rec["loop_edges"] = final_loop_edges(pipe.backend.graph) if pipe.backend is not None else {}
        rec["segments"] = pipe.reconstructor.session.segment_stats.segments if backend else 1
        rec["describe"] = pipe.describe()
    finally:
        pipe.close()
    from ros2_stream4d.mapping.backend import sim3 as S3

    # every frame follows its keyframe: final = T_kf_final T_kf_cam (the stored relative pose); a keyframe's pose may
    # be a Sim(3) (its scale resizes its geometry): the camera pose is its rigid part
    final = np.empty_like(rec["T_odom_cam"])
    online = np.einsum("nij,njk->nik", rec["C"], rec["T_odom_cam"])
    for i in range(n):
        final[i] = S3.to_se3(rec["kf_final"][int(rec["kf"][i])] @ rec["T_kf_cam"][i])
    rec["online"], rec["final"] = online, final
    return rec


def final_loop_edges(graph) -> dict[tuple[int, int], bool]:
    """(i, j) -> whether the graph's loop edge between keyframes i and j is in its final solve (active and an
    inlier of the last optimisation)."""
    from ros2_stream4d.mapping.backend.posegraph import LOOP

    in_force = {id(e) for e in graph.loops_in_force()}
    return {(e.i, e.j): id(e) in in_force for e in graph.edges if e.kind == LOOP}


def loop_truth(loops, kf_stamp: dict, gt_by_stamp, loop_edges: dict | None = None) -> list[dict]:
    """Each verified loop against the ground-truth relative pose of its two keyframes; an accepted one also says
    whether it is in the graph's final solve (``loop_edges``, final_loop_edges)."""
    from ros2_stream4d.mapping.backend import sim3 as S3

    out = []
    for i, j, accepted, S, reason in loops:
        if i not in kf_stamp or j not in kf_stamp:
            continue
        Ti, Tj = gt_by_stamp(kf_stamp[i]), gt_by_stamp(kf_stamp[j])
        rel = np.linalg.inv(Ti) @ Tj
        dist = float(np.linalg.norm(rel[:3, 3]))
        rec = {"i": int(i), "j": int(j), "accepted": bool(accepted), "gt_distance_m": dist, "reason": reason,
               "same_place": bool(dist < SAME_PLACE_M and S3.rotation_angle_deg(rel[:3, :3]) < SAME_PLACE_DEG)}
        if accepted:
            R, t, _ = S3.decompose(S)
            err = t - rel[:3, 3]  # in keyframe i's camera axes: z is its view
            rec["rot_error_deg"] = S3.rotation_angle_deg(R.T @ rel[:3, :3])
            rec["trans_error_m"] = float(np.linalg.norm(err))
            rec["trans_error_along_view_m"] = float(err[2])  # signed
            rec["trans_error_across_view_m"] = float(np.hypot(err[0], err[1]))
            rec["accurate"] = bool(rec["rot_error_deg"] < TRUE_ROT_DEG
                                   and rec["trans_error_m"] < TRUE_TRANS_M + TRUE_TRANS_FRAC * dist)
            if loop_edges is not None:
                rec["in_final_graph"] = bool(loop_edges.get((int(i), int(j)), False))
        out.append(rec)
    return out


def loop_error_split(loops: list[dict]) -> dict:
    """Median translation error and RMS of its parts along and across the view of loop_truth's accepted loops (None
    without any)."""
    if not loops:
        return {"trans_error_median_m": None, "trans_error_along_view_rms_m": None,
                "trans_error_across_view_rms_m": None}
    along = np.array([x["trans_error_along_view_m"] for x in loops])
    across = np.array([x["trans_error_across_view_m"] for x in loops])
    return {"trans_error_median_m": float(np.median([x["trans_error_m"] for x in loops])),
            "trans_error_along_view_rms_m": float(np.sqrt(np.mean(along**2))),
            "trans_error_across_view_rms_m": float(np.sqrt(np.mean(across**2)))}


def _reasons(reasons: list[str]) -> dict[str, int]:
    """Rejection reasons counted by kind (numbers stripped: "12 inliers (0.21)" -> "inliers")."""
    out: dict[str, int] = {}
    for r in reasons:
        key = " ".join(w for w in r.split() if not any(ch.isdigit() for ch in w)) or r
        out[key] = out.get(key, 0) + 1
    return out


def evaluate(rec: dict, gt_T: np.ndarray, stamps, surface, mesh_vf, threshold: float) -> dict:
    from ros2_stream4d.eval.metrics import ate, map_metrics, mesh_metrics, rpe

    res = {}
    for name in ("odometry", "online", "final"):
        T = rec["T_odom_cam"] if name == "odometry" else rec[name]
        a = ate(T, gt_T, align="sim3")
        r = rpe(a["aligned"], gt_T, delta=10)
        res[name] = {"ate_rmse_m": a["ate_rmse"], "ate_max_m": a["ate_max"], "ate_rot_rmse_deg": a["ate_rot_rmse"],
                     "scale": a["scale"], **{k: v for k, v in r.items() if isinstance(v, float)}}
        if name == "final":
            al = a["alignment"]
            cloud = al.apply_points(rec["cloud"])
            m = map_metrics(cloud, *mesh_vf, threshold=threshold, surface_samples=surface)
            res["map"] = {k: m[k] for k in ("map_points", "map_precision", "map_recall", "map_fscore",
                                            "map_accuracy_median", "map_completeness_median")}
            v, f = rec["mesh"]
            mm = mesh_metrics(al.apply_points(v), f, *mesh_vf, threshold=threshold, surface_samples=surface)
            res["map"].update({k: mm[k] for k in ("mesh_triangles", "mesh_precision", "mesh_recall", "mesh_fscore",
                                                  "mesh_accuracy_median", "mesh_completeness_median")})
            res["final_trajectory_xy"] = a["aligned"][:, :2, 3]
    index = {int(s): k for k, s in enumerate(stamps)}
    loops = loop_truth(rec["loops"], rec["kf_stamp"], lambda s: gt_T[index[s]], rec.get("loop_edges"))
    acc = [x for x in loops if x["accepted"]]
    res["loops"] = {"verified": len(loops), "accepted": len(acc), "accepted_true": sum(x["same_place"] for x in acc),
                    "accepted_accurate": sum(x["accurate"] for x in acc), "rejected": len(loops) - len(acc),
                    "precision": (sum(x["same_place"] for x in acc) / len(acc)) if acc else None,
                    "false_accepted": [x for x in acc if not x["same_place"]],
                    "inaccurate_accepted": [x for x in acc if x["same_place"] and not x["accurate"]],
                    "rejected_by": _reasons([x["reason"] for x in loops if not x["accepted"]]),
                    # held back by the loop gate (a verified loop that disagrees with the corrected map), and
                    # released later (enough held loops agreed): a released loop is listed twice, held and accepted
                    "held": sum(x["reason"].startswith("held") for x in loops),
                    "released": sum(x["reason"].startswith("released") for x in loops),
                    "held_same_place": sum(x["reason"].startswith("held") and x["same_place"] for x in loops),
                    "false_in_final_graph": sum(not x["same_place"] and x.get("in_final_graph", False) for x in acc),
                    # the true loops' measurement error (m), along keyframe i's view (its camera's z) and across it:
                    # a depth-based measurement errs most along the view (docs/longrun/README.md)
                    **loop_error_split([x for x in acc if x["same_place"]])}
    res["accepted_frames"] = [(index[rec["kf_stamp"][x["i"]]], index[rec["kf_stamp"][x["j"]]]) for x in acc]
    b = np.asarray(rec["backend_s"]) * 1e3
    res["cost"] = {"frame_ms_median": 1e3 * float(np.median(rec["frame_s"])),
                   "frame_ms_p99": 1e3 * float(np.percentile(rec["frame_s"], 99)),
                   "frame_ms_max": 1e3 * float(np.max(rec["frame_s"])),
                   "backend_added_ms_median": float(np.median(b)) if b.size else None,
                   "backend_added_ms_p95": float(np.percentile(b, 95)) if b.size else None,
                   "backend_added_ms_max": float(b.max()) if b.size else None,
                   "rss_mib": rec["rss"], "wall_s": rec["wall_s"]}
    d = rec["diagnostics"]
    res["backend"] = {k: d[k] for k in ("keyframes", "optimisations_ok", "optimisations_dropped", "last_drop_reason",
                                        "corrections_applied", "corrections_withdrawn", "time per keyframe [ms] median",
                                        "time per optimisation [ms] median", "edges_rejected_by_graph",
                                        "drift calibrations", "rotation drift calibrated [deg/m]")
                      if k in d}
    res["segments"] = rec["segments"]
    res["keyframes"] = len(rec["kf_final"])
    res["settled"] = rec["settled"]
    return res


def run_longrun(scene: str, trajectory: str, frames: int, seeds, width: int, height: int, noise: str, out: Path,
                name: str, cache: Path, threshold: float = 0.05, progress: bool = True, lockstep: bool = False) -> dict:

    from .env import environment

    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    result = {"schema": "stream4d.bench.longrun/1", "environment": environment("cpu"), "scene": scene,
              "trajectory": trajectory, "frames": frames, "image": [width, height], "oracle_noise": noise,
              "backend_timing": "lockstep" if lockstep else "live", "loadavg_start": os.getloadavg(), "runs": {}}
    plots = {}
    for seed in seeds:
        bag = sim_bag(cache, scene, trajectory, frames, width, height, seed)
        stamps, images, K = read_inputs(bag)
        gt, gt_T, (Vm, F), surface = ground_truth_in_map(bag, threshold)
        del gt
        runs = {}
        for backend in (False, True):
            rec = run_pipeline(bag, images, stamps, K, backend, noise, seed, input_width=width, progress=progress,
                               lockstep=lockstep)
            runs["on" if backend else "off"] = evaluate(rec, gt_T, stamps, surface, (Vm, F), threshold)
        plots[seed] = (gt_T[:, :2, 3], runs)
        on, off = runs["on"], runs["off"]
        summary = {"ate_off_m": off["final"]["ate_rmse_m"], "ate_on_m": on["final"]["ate_rmse_m"],
                   "ratio": on["final"]["ate_rmse_m"] / max(off["final"]["ate_rmse_m"], 1e-12),
                   "map_fscore_off": off["map"]["map_fscore"], "map_fscore_on": on["map"]["map_fscore"],
                   "mesh_fscore_off": off["map"]["mesh_fscore"], "mesh_fscore_on": on["map"]["mesh_fscore"],
                   "loops_accepted": on["loops"]["accepted"], "loops_true": on["loops"]["accepted_true"],
                   "backend_added_ms_median": on["cost"]["backend_added_ms_median"]}
        print(f"[{scene}/{trajectory} seed {seed}] ATE off {summary['ate_off_m']:.3f} m, on {summary['ate_on_m']:.3f} "
              f"m ({100 * summary['ratio']:.0f} %); cloud F off {summary['map_fscore_off']:.3f} on "
              f"{summary['map_fscore_on']:.3f}, mesh F off {summary['mesh_fscore_off']:.3f} on "
              f"{summary['mesh_fscore_on']:.3f}; loops accepted {summary['loops_accepted']} (true "
              f"{summary['loops_true']}); back-end added {summary['backend_added_ms_median']:.2f} ms/frame median",
              flush=True)
        result["runs"][str(seed)] = {"summary": summary, **{k: {kk: vv for kk, vv in r.items()
                                                                if kk != "final_trajectory_xy"}
                                                            for k, r in runs.items()}}
    result["loadavg_end"] = os.getloadavg()
    js = out / f"{name}.json"
    js.write_text(json.dumps(result, indent=1, default=_json_default))
    png = plot_runs(plots, out / f"{name}.png", f"{scene} / {trajectory}, {frames} frames, oracle_noise {noise}"
                    + (", back-end in lockstep" if lockstep else ""))
    print(f"wrote {js}\nwrote {png}")
    return result


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def plot_runs(plots: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(5.5 * len(plots), 5.2), squeeze=False)
    for ax, (seed, (gt_xy, runs)) in zip(axes[0], plots.items()):
        ax.plot(gt_xy[:, 0], gt_xy[:, 1], "k-", lw=2.0, label="ground truth")
        for key, colour in (("off", "tab:red"), ("on", "tab:green")):
            xy = runs[key]["final_trajectory_xy"]
            ax.plot(xy[:, 0], xy[:, 1], "-", color=colour, lw=1.0,
                    label=f"back-end {key}: ATE {runs[key]['final']['ate_rmse_m']:.3f} m")
        on = runs["on"]
        # accepted loops between keyframes, drawn on the corrected trajectory at the keyframes' frames
        pairs = on.get("accepted_frames", [])
        xy = on["final_trajectory_xy"]
        for k, (a, b) in enumerate(pairs):
            ax.plot(xy[[a, b], 0], xy[[a, b], 1], "-", color="tab:blue", lw=0.8, alpha=0.6,
                    label="accepted loop" if k == 0 else None)
        ax.set_title(f"seed {seed}: {len(pairs)} loops accepted ({on['loops']['accepted_true']} true)")
        ax.set_aspect("equal")
        ax.legend(fontsize=8, loc="best")
        ax.set_xlabel("x [m] (map)")
        ax.set_ylabel("y [m]")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_memory(scene: str, trajectory: str, frames: int, seed: int, width: int, height: int, noise: str, out: Path,
               name: str, cache: Path, map_max_points: int = MAP_MAX_POINTS) -> dict:
    """Back-end on over a long run (e.g. 10,000 frames): resident memory (every 100 frames; what of it malloc and the
    map hold every 500), the back-end's added per-frame time and its worker's queue; JSON + plot. No ground truth is
    read (it would not fit). map_max_points: the map cloud's voxel cap (the bench's default is set for the F-score;
    the node's is 1 M)."""
    from .env import environment

    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    bag = sim_bag(cache, scene, trajectory, frames, width, height, seed)
    stamps, images, K = read_inputs(bag)
    load0 = os.getloadavg()
    rec = run_pipeline(bag, images, stamps, K, True, noise, seed, input_width=width, sample_memory=True,
                       map_max_points=map_max_points)
    b = np.asarray(rec["backend_s"]) * 1e3
    q = len(b) // 4
    d = rec["diagnostics"]
    result = {"schema": "stream4d.bench.longrun_memory/1", "environment": environment("cpu"), "scene": scene,
              "trajectory": trajectory, "frames": frames, "seed": seed, "image": [width, height],
              "map_max_points": map_max_points,
              "oracle_noise": noise, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "rss_mib": rec["rss"], "memory": rec["memory"], "keyframes": len(rec["kf_final"]),
              "segments": rec["segments"],
              "backend_added_ms_median": float(np.median(b)),
              "backend_added_ms_median_first_quarter": float(np.median(b[:q])),
              "backend_added_ms_median_last_quarter": float(np.median(b[-q:])),
              "frame_ms_median_first_quarter": 1e3 * float(np.median(rec["frame_s"][:q])),
              "frame_ms_median_last_quarter": 1e3 * float(np.median(rec["frame_s"][-q:])),
              "backend": {k: v for k, v in d.items() if not isinstance(v, np.ndarray)}, "wall_s": rec["wall_s"],
              "settled": rec["settled"], "settle_s": rec["settle_s"]}
    js = out / f"{name}.json"
    js.write_text(json.dumps(result, indent=1, default=_json_default))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    f, r = zip(*rec["rss"])
    a1.plot(f, r, "-o", ms=2, label="RSS")
    mem = [m for m in rec["memory"] if m["heap"] is not None]
    if mem:  # what of it objects hold (arenas in use + large blocks) and what the arenas keep freed
        fm = [m["frame"] for m in mem]
        a1.plot(fm, [m["heap"]["in_use"] + m["heap"]["mmapped"] for m in mem], "-s", ms=3, label="allocated")
        a1.plot(fm, [m["heap"]["free_held"] for m in mem], "-^", ms=3, label="freed, kept by malloc")
    a1.set_xlabel("frame")
    a1.set_ylabel("MiB")
    a1.set_title(f"{scene}/{trajectory}, back-end on: memory")
    a1b = a1.twinx()
    a1b.plot([m["frame"] for m in rec["memory"]], [m["map_points"] / 1e6 for m in rec["memory"]], "k:",
             label="map points [M]")
    a1b.set_ylabel("map cloud points [millions]")
    a1.legend(loc="upper left", fontsize=7)
    a1b.legend(loc="lower right", fontsize=7)
    k = max(1, len(b) // 200)
    a2.plot(np.arange(len(b))[::k], [np.median(b[i:i + k]) for i in range(0, len(b), k)], "-")
    a2.set_xlabel("frame")
    a2.set_ylabel("added per-frame time [ms] (median of blocks)")
    a2.set_title("back-end cost in the frame thread")
    fig.tight_layout()
    png = out / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    for m in rec["memory"]:
        h = m["heap"] or {}
        print(f"  frame {m['frame']}: RSS {m['rss']:.0f} MiB, allocated {h.get('in_use', 0) + h.get('mmapped', 0):.0f}"
              f", freed and kept by malloc {h.get('free_held', float('nan')):.0f}; map points {m['map_points']}, "
              f"TSDF blocks {m['tsdf_blocks']}, keyframes in RAM {m['keyframes_in_memory']} "
              f"({m['keyframe_mib']:.0f} MiB)")
    print(f"RSS {r[0]:.0f} -> {r[len(r) // 4]:.0f} (frame {f[len(f) // 4]}) -> {r[-1]:.0f} MiB; keyframes "
          f"{result['keyframes']}; added {result['backend_added_ms_median']:.2f} ms/frame median\nwrote {js}\nwrote {png}")
    return result
