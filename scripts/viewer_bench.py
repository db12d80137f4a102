#!/usr/bin/env python3
"""What the live viewer costs the node: the mapping pipeline (oracle model) over a sim sequence, without and with a
LiveViewer, frame for frame as the node runs it.

Alternating rounds (without, with a fresh viewer; --rounds) so that a shared machine's load drift hits both alike.
Measures, per frame: the pipeline step (wall), LiveViewer.submit (the only call on the node's hot path) and, without
a viewer, the same kind of call (lock + deque append) as this machine's noise floor; per run: wall and process CPU,
the logging thread's CPU, the viewer server process's CPU, frames logged / dropped; then a long run (the same
results re-stamped, submitted every ~2 ms) sampling this process's and the server's RSS. Prints a table and writes
JSON. No browser is involved: the served viewer buffers for late viewers up to its memory limit, the live path's
worst case.

    python scripts/viewer_bench.py --frames 60 --rounds 3 --long 10000 --memory-limit 64MiB
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mib(pid: int | None = None) -> float:
    """Resident set size now (MiB) of pid (default: this process), from /proc."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pipeline_run(gt, input_width: int, viewer=None, rate_hz: float = 0.0, map_every: int = 10):
    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig
    from ros2_stream4d.sim.oracle import OracleSession

    session = OracleSession(gt.stamps, gt.T_world_cam, gt.K, gt.depths)
    pipeline = MappingPipeline(PipelineConfig(input_width=input_width, conf_percentile=30.0), session)
    step_s, submit_s, results = [], [], []
    # without a viewer, the same kind of call (a lock and a deque append) is timed: the noise floor of this machine
    lock, dq = threading.Lock(), collections.deque(maxlen=2)
    t_next = time.monotonic()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(len(gt.stamps)):
        t0 = time.perf_counter()
        outcome = pipeline.process(gt.images[i], int(gt.stamps[i]), K_src=gt.K)
        t1 = time.perf_counter()
        result = getattr(outcome, "result", outcome)
        step_s.append(t1 - t0)
        publish_map = i % map_every == map_every - 1
        xyz_rgb = pipeline.map_points()[:2] if publish_map else None  # the node builds its map message anyway
        t2 = time.perf_counter()
        if viewer is not None and result is not None:
            viewer.submit(result, gt.images[i])
            if xyz_rgb is not None:
                viewer.submit_map(*xyz_rgb, int(gt.stamps[i]))
        else:
            with lock:
                dq.append((result, gt.images[i]))
        submit_s.append(time.perf_counter() - t2)
        # kept for the long run without the prediction (MBs of model outputs the viewer does not read)
        results.append(None if result is None else dataclasses.replace(result, prediction=None))
        if rate_hz > 0:
            t_next += 1.0 / rate_hz
            time.sleep(max(0.0, t_next - time.monotonic()))
    totals = {"wall_s": time.perf_counter() - wall0, "process_cpu_s": time.process_time() - cpu0}
    return np.array(step_s), np.array(submit_s), results, totals


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 when unknown)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def stats_ms(a: np.ndarray) -> dict:
    if len(a) == 0:
        return {}
    return {"median_ms": float(np.median(a) * 1e3), "p99_ms": float(np.percentile(a, 99) * 1e3),
            "max_ms": float(a.max() * 1e3), "mean_ms": float(a.mean() * 1e3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bag", help="sim bag (default: render one)")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--input-width", type=int, default=518, help="model input width (the demo's)")
    ap.add_argument("--rate", type=float, default=0.0, help="frames per second (0: back to back)")
    ap.add_argument("--mode", default="serve", choices=("serve", "save"), help="LiveViewer mode")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs without / with the viewer")
    ap.add_argument("--long", type=int, default=3000, help="frames of the long run (0: skip)")
    ap.add_argument("--memory-limit", default="512MiB", help="the viewer server's memory limit")
    ap.add_argument("--out", default="out/viewer_bench.json")
    args = ap.parse_args(argv)

    from ros2_stream4d.sim.bag import SimConfig, read_ground_truth, write_sim_bag
    from ros2_stream4d.viewer.live import LiveViewer

    tmp = Path(tempfile.mkdtemp(prefix="viewer_bench_"))
    bag = args.bag
    if not bag:
        bag = tmp / "bag"
        write_sim_bag(bag, SimConfig(scene="room", trajectory="ground_robot", frames=args.frames, width=args.width,
                                     height=args.height, seed=9001), progress=False)
    gt = read_ground_truth(bag, with_depth=True, with_images=True)
    n = min(args.frames, len(gt.stamps))
    gt = dataclasses.replace(gt, stamps=gt.stamps[:n], T_world_cam=gt.T_world_cam[:n], depths=gt.depths[:n],
                             images=gt.images[:n])
    load0 = os.getloadavg()
    cpu0 = time.process_time()
    warnings: list[str] = []
    kw = {"path": tmp / "live.rrd"} if args.mode == "save" else {"web_port": 0, "grpc_port": 0}
    off, on, floor, submit, tot_off, tot_on, starts, rounds = [], [], [], [], [], [], [], []
    viewer = results = server_pid = None
    for _ in range(args.rounds):  # alternate, so that the load's drift hits both alike
        s_off, f_off, _, t_off = pipeline_run(gt, args.input_width, rate_hz=args.rate)
        off.append(s_off)
        floor.append(f_off)
        tot_off.append(t_off)
        if viewer is not None:
            viewer.close()
        viewer = LiveViewer(args.mode, warn=warnings.append, memory_limit=args.memory_limit, **kw)
        t_ready = time.perf_counter()
        viewer.ready.wait(60)  # the node starts its viewer at start-up, before frames come in
        starts.append(time.perf_counter() - t_ready)
        proc = getattr(getattr(viewer, "_viewer", None), "proc", None)
        server_pid = proc.pid if proc is not None else None
        server_cpu0 = cpu_s(server_pid)
        s_on, f_on, results, t_on = pipeline_run(gt, args.input_width, viewer=viewer, rate_hz=args.rate)
        t_drain = time.monotonic() + 20
        while viewer.pending() and time.monotonic() < t_drain:
            time.sleep(0.05)
        time.sleep(0.5)
        t_on["server_cpu_s"] = cpu_s(server_pid) - server_cpu0 if server_pid else None
        on.append(s_on)
        submit.append(f_on)
        tot_on.append(t_on)
        rounds.append({"logged": viewer.logged, "dropped": viewer.dropped, "submitted": viewer.submitted,
                       "thread_cpu_s": viewer.thread_cpu_s, "maps_logged": viewer.maps_logged,
                       "server_rss_mib": rss_mib(server_pid) if server_pid else None})
    off, on, floor, submit = (np.concatenate(x) for x in (off, on, floor, submit))
    logged = sum(r["logged"] for r in rounds)
    run_stats = {"rounds": rounds, "logged": logged, "dropped": sum(r["dropped"] for r in rounds),
                 "thread_cpu_s": sum(r["thread_cpu_s"] for r in rounds),
                 "thread_cpu_ms_per_logged_frame": 1e3 * sum(r["thread_cpu_s"] for r in rounds) / max(1, logged),
                 "server_cpu_ms_per_frame": (1e3 * sum(t["server_cpu_s"] or 0 for t in tot_on) / max(1, logged)),
                 "process_rss_mib": rss_mib()}
    t_ready = float(np.median(starts))

    long_samples = []
    if args.long > 0 and viewer.active:
        valid = [r for r in results if r is not None]
        dt = int(np.median(np.diff(gt.stamps))) if n > 1 else 100_000_000
        t_start = int(gt.stamps[-1]) + dt
        long_submit = []
        for k in range(args.long):
            r = valid[k % len(valid)]
            r = dataclasses.replace(r, stamp_ns=t_start + k * dt)
            t0 = time.perf_counter()
            viewer.submit(r, gt.images[k % len(valid)])
            long_submit.append(time.perf_counter() - t0)
            time.sleep(0.002)  # ~ a fast camera; the thread drops what it cannot keep up with
            if k % max(1, args.long // 10) == 0 or k == args.long - 1:
                long_samples.append({"frame": k, "process_rss_mib": rss_mib(),
                                     "server_rss_mib": rss_mib(server_pid) if server_pid else None,
                                     "logged": viewer.logged, "dropped": viewer.dropped})
        run_stats["long_submit"] = stats_ms(np.array(long_submit))
    viewer.close()
    report = {
        "frames": n, "image": f"{args.width}x{args.height}", "input_width": args.input_width, "mode": args.mode,
        "rate_hz": args.rate, "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "process_cpu_s": time.process_time() - cpu0,
        "pipeline_step_without_viewer": stats_ms(off), "pipeline_step_with_viewer": stats_ms(on),
        "submit": stats_ms(submit), "lock_and_append_without_viewer": stats_ms(floor),
        "submit_series_ms": [round(float(x) * 1e3, 3) for x in submit],
        "step_series_ms": {"without_viewer": [round(float(x) * 1e3, 1) for x in off],
                           "with_viewer": [round(float(x) * 1e3, 1) for x in on]},
        "run_totals": {"without_viewer": tot_off, "with_viewer": tot_on}, "viewer": run_stats,
        "long_run": long_samples, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "warnings": warnings, "viewer_url": viewer.view_url, "viewer_start_s": t_ready}
    shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    def row(name, s):
        return f"| {name} | {s.get('median_ms', float('nan')):.3f} | {s.get('p99_ms', float('nan')):.3f} | " \
               f"{s.get('max_ms', float('nan')):.3f} |"

    print(f"{n} frames {args.width}x{args.height}, model input {args.input_width}, mode {args.mode}, "
          f"load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| per frame | median ms | p99 ms | max ms |\n|---|---|---|---|")
    print(row(f"pipeline step, no viewer ({args.rounds} x {n} frames)", report["pipeline_step_without_viewer"]))
    print(row(f"pipeline step, viewer on ({args.rounds} x {n} frames)", report["pipeline_step_with_viewer"]))
    print(row("LiveViewer.submit (+ submit_map every 10th)", report["submit"]))
    print(row("noise floor: lock + deque append, no viewer", report["lock_and_append_without_viewer"]))
    if "long_submit" in run_stats:
        print(row(f"LiveViewer.submit, long run ({args.long} frames)", run_stats["long_submit"]))
    print(f"logging thread: {run_stats['thread_cpu_s']:.2f} s CPU for {run_stats['logged']} frames "
          f"({run_stats['thread_cpu_ms_per_logged_frame']:.1f} ms/frame), dropped {run_stats['dropped']}")
    print(f"viewer start (server up, SDK warmed up): {t_ready:.1f} s (median of {args.rounds})")
    print(f"viewer server process: {run_stats['server_cpu_ms_per_frame']:.1f} ms CPU per logged frame")
    for k, (a, b) in enumerate(zip(tot_off, tot_on)):
        print(f"round {k + 1}: without viewer {a['wall_s']:.1f} s wall / {a['process_cpu_s']:.1f} s CPU; with viewer "
              f"{b['wall_s']:.1f} s wall / {b['process_cpu_s']:.1f} s CPU (+ server {b['server_cpu_s'] or 0:.1f} s)")
    for s in long_samples:
        print(f"  long run frame {s['frame']:>6}: process RSS {s['process_rss_mib']:.0f} MiB, server RSS "
              f"{s['server_rss_mib'] or float('nan'):.0f} MiB, logged {s['logged']}, dropped {s['dropped']}")
    if warnings:
        print("warnings:", *warnings, sep="\n  ")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
