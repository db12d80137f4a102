#!/usr/bin/env python3
"""Per-frame time and KV-cache memory of streaming at a small configuration: unlimited vs rolling window.

Prints figures only (no assertions). Random weights, CPU fp32 by default.

    python benchmarks/stream_cache_small.py [--frames 50] [--window 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ros2_stream4d.model import ModelConfig, StreamVGGT


def run_interleaved(model, images, windows, device):
    """Step one session per window over the same frames, alternating frame by frame, so that load changes on the
    machine hit every variant alike. Returns {window: (times, storage bytes after each frame, final stats)}."""
    sessions = {w: model.stream(window=w, anchors=1) for w in windows}
    res = {w: ([], []) for w in windows}
    for i in range(images.shape[0]):
        img = images[i : i + 1].to(device)
        for w, session in sessions.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = session.step(img)
            if device.type == "cuda":
                torch.cuda.synchronize()
            res[w][0].append(time.perf_counter() - t0)
            res[w][1].append(session.cache.storage_nbytes())
            assert all(torch.isfinite(v).all() for v in out.values())
    return {w: (t, m, sessions[w].stats()) for w, (t, m) in res.items()}


def report(title, results, window):
    print(f"\n== {title}")
    for w, (times, mem, st) in results.items():
        name = "unlimited" if w is None else f"rolling W={w}"
        n = len(times)
        print(f"{name}:")
        print(f"  per-frame time  median {1e3 * statistics.median(times):7.2f} ms | frames 2-11 mean "
              f"{1e3 * statistics.mean(times[1:11]):7.2f} ms | last 10 mean {1e3 * statistics.mean(times[-10:]):7.2f} ms")
        print(f"  cache storage   after frame 1: {mem[0] / 2**20:7.3f} MiB | after frame {min(10, n)}: "
              f"{mem[min(10, n) - 1] / 2**20:7.3f} MiB | after frame {n}: {mem[-1] / 2**20:7.3f} MiB "
              f"| distinct sizes over the run: {len(set(mem))}")
        print(f"  frames held at the end: {st.frames_held} (aggregator {st.aggregator_bytes / 2**20:.3f} MiB, "
              f"camera head {st.camera_bytes / 2**20:.3f} MiB)")
    tu, mu, _ = results[None]
    tr, mr, _ = results[window]
    print(f"  last-10-frame time unlimited/rolling: {statistics.mean(tu[-10:]) / statistics.mean(tr[-10:]):.2f}x; "
          f"final cache memory unlimited/rolling: {mu[-1] / mr[-1]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--height", type=int, default=112)
    ap.add_argument("--width", type=int, default=154)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.frames, 3, args.height, args.width)
    for dense in (True, False):
        cfg = ModelConfig.small(embed_dim=args.embed_dim, depth=args.depth, num_heads=4, camera_num_heads=4,
                                camera_trunk_depth=2, cuda_autocast_dtype=None, depth_head=dense, point_head=dense)
        model = StreamVGGT(cfg).eval().to(device)
        P = cfg.patch_start_idx + (args.height // cfg.patch_size) * (args.width // cfg.patch_size)
        if dense:
            print(f"config: embed_dim={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} "
                  f"patch_embed={cfg.patch_embed} camera trunk={cfg.camera_trunk_depth} blocks x "
                  f"{cfg.camera_num_iterations} iterations; image {args.height}x{args.width} ({P} tokens/frame); "
                  f"{args.frames} frames; device {device}, fp32, torch threads {torch.get_num_threads()}")
            print(f"aggregator K+V per frame: {cfg.depth * 2 * P * cfg.embed_dim * 4 / 1024:.1f} KiB "
                  f"({cfg.depth} global blocks)")
        run_interleaved(model, images[:3], (None,), device)  # warm-up
        results = run_interleaved(model, images, (None, args.window), device)
        report("full model (aggregator + camera + depth + point heads)" if dense
               else "aggregator + camera head only (no DPT heads)", results, args.window)

if __name__ == "__main__":
    main()
