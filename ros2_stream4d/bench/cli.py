"""`stream4d bench`: performance figures (they print and write JSON + PNG; nothing here passes or fails).

    stream4d bench stream   [--config small] [--frames 300] [--windows 4 8 16] [--recompute-windows 16] [--out DIR]
    stream4d bench stages   [--configs small medium] [--frames 5] [--out DIR]
    stream4d bench roofline [--height 392 --width 518] [--out DIR]
    stream4d bench cloud    [--points 300000]  (PointCloud2 build + serialisation)
    stream4d bench gpu      (CUDA only: bf16, SDPA vs flash-attn, FPS at 518x392 with W=16)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "docs/bench"


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: per-frame time/memory vs frame index, per-stage times, "
                                            "roofline", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")

    s = sub.add_parser("stream", help="latency and memory against the frame index: unlimited cache, rolling windows, "
                                      "recompute-from-scratch baseline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--config", default="small", choices=("tiny", "small", "medium", "full"),
                   help="model preset (random weights; see ros2_stream4d.bench.env.PRESETS)")
    s.add_argument("--frames", type=int, default=300)
    s.add_argument("--windows", type=int, nargs="*", default=[4, 8, 16], help="rolling window sizes W")
    s.add_argument("--recompute-windows", type=int, nargs="*", default=[16],
                   help="sliding windows recomputed from scratch every frame (the offline way)")
    s.add_argument("--no-unlimited", action="store_true", help="skip the unlimited-cache mode")
    s.add_argument("--anchors", type=int, default=1)
    s.add_argument("--height", type=int, default=None, help="model input height (multiple of 14; preset default)")
    s.add_argument("--width", type=int, default=None, help="model input width (multiple of 14; preset default)")
    s.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    s.add_argument("--backend", default="sdpa", choices=("sdpa", "eager", "flash"))
    s.add_argument("--warmup", type=int, default=2, help="untimed steps per mode on throw-away sessions first")
    s.add_argument("--neighbourhood", type=int, default=5,
                   help="medians over frames [k, k + 2*n] de-noise the reference and end figures")
    s.add_argument("--isolated-memory", action="store_true",
                   help="also step each mode alone in a child process for per-mode RSS / peak RSS")
    s.add_argument("--gpu-fps", choices=("auto", "off"), default="auto",
                   help="on CUDA also run the bf16 SDPA / flash-attn FPS measurement of `bench gpu`")
    s.add_argument("--label", default="", help="free text stored in the JSON")
    s.add_argument("--out", default=DEFAULT_OUT, help="output directory, or a .json path")
    s.add_argument("--name", default=None, help="file stem (default stream_<config>)")
    s.add_argument("--no-plot", action="store_true")
    s.set_defaults(func=run_stream)

    g = sub.add_parser("stages", help="where the time goes per frame through the real pipeline (640x480 input)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--configs", nargs="+", default=["small", "medium"],
                   choices=("tiny", "small", "medium", "full"))
    g.add_argument("--frames", type=int, default=5, help="timed frames per configuration (after warm-up)")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--input-height", type=int, default=480)
    g.add_argument("--input-width", type=int, default=640)
    g.add_argument("--model-width", type=int, default=518, help="model input width (the node's input_width)")
    g.add_argument("--window", type=int, default=16)
    g.add_argument("--cloud-points", type=int, default=300_000, help="size of the standalone PointCloud2 check")
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--out", default=DEFAULT_OUT)
    g.add_argument("--name", default="stages")
    g.add_argument("--no-plot", action="store_true")
    g.set_defaults(func=run_stages)

    r = sub.add_parser("roofline", help="analytic FLOPs per frame of the full model vs W and the frame-rate limit",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--height", type=int, default=392)
    r.add_argument("--width", type=int, default=518)
    r.add_argument("--windows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128])
    r.add_argument("--anchors", type=int, default=1)
    r.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 tensor-core peak (H100 SXM)")
    r.add_argument("--hbm-tb-s", type=float, default=3.35, help="HBM bandwidth in TB/s (H100 SXM)")
    r.add_argument("--mfu", type=float, default=0.4, help="fraction of peak assumed reachable")
    r.add_argument("--out", default=DEFAULT_OUT)
    r.add_argument("--name", default="roofline")
    r.add_argument("--no-plot", action="store_true")
    r.set_defaults(func=run_roofline)

    k = sub.add_parser("cloud", help="build + serialise a PointCloud2 of N points (xyz + rgb + confidence)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("--points", type=int, default=300_000)
    k.add_argument("--repeat", type=int, default=50)
    k.add_argument("--out", default=DEFAULT_OUT)
    k.add_argument("--name", default="cloud_check")
    k.set_defaults(func=run_cloud)

    lr = sub.add_parser("longrun", help="the long-run back-end through the node's pipeline, off and on: ATE/RPE, "
                                        "loops and their precision, map F-score, added per-frame time, memory",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lr.add_argument("--scene", default="office")
    lr.add_argument("--trajectory", default="loop")
    lr.add_argument("--frames", type=int, default=1200)
    lr.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lr.add_argument("--width", type=int, default=224, help="image and model width (multiple of 14)")
    lr.add_argument("--height", type=int, default=168)
    lr.add_argument("--noise", default="realistic", help="oracle_noise: none, realistic or a YAML file")
    lr.add_argument("--threshold", type=float, default=0.05, help="map F-score threshold (m)")
    lr.add_argument("--cache", default="/tmp/stream4d_longrun", help="where the sim bags are written once")
    lr.add_argument("--out", default="docs/longrun/node")
    lr.add_argument("--name", default=None, help="file stem (default <scene>_<trajectory>_<noise>)")
    lr.add_argument("--lockstep", action="store_true",
                    help="the back-end in step with the frames (wait for it after every frame, solve in its worker, "
                         "apply at once): reproducible figures for comparisons; not the node's timing")
    lr.add_argument("--memory-only", action="store_true",
                    help="back-end on, first seed only, no ground truth: memory and added time over a long run")
    lr.add_argument("--map-max-points", type=int, default=None,
                    help="with --memory-only: the map cloud's voxel cap (default the bench's 8 M, set for the F-score; "
                         "the node's default, map_max_points, is 1 M)")
    lr.set_defaults(func=run_longrun_cmd)

    u = sub.add_parser("gpu", help="CUDA: bf16 SDPA vs flash-attn FPS at 518x392, W=16 (says so on CPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    u.add_argument("--config", default="full", choices=("tiny", "small", "medium", "full"))
    u.add_argument("--height", type=int, default=392)
    u.add_argument("--width", type=int, default=518)
    u.add_argument("--window", type=int, default=16)
    u.add_argument("--frames", type=int, default=60, help="timed frames (after the window has filled)")
    u.add_argument("--backends", nargs="+", default=["sdpa", "flash"])
    u.add_argument("--device", default="auto")
    u.add_argument("--out", default=DEFAULT_OUT)
    u.add_argument("--name", default="gpu_fps")
    u.set_defaults(func=run_gpu)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _out_paths(out: str, stem: str) -> tuple[Path, Path]:
    o = Path(out)
    if o.suffix == ".json":
        return o, o.with_suffix(".png")
    return o / f"{stem}.json", o / f"{stem}.png"


def _progress(every: int = 25):
    def cb(i, n, last):
        if i % every == 0 or i == n:
            txt = "  ".join(f"{k} {v * 1e3:.0f}ms" for k, v in last.items())
            print(f"  frame {i}/{n}: {txt}", flush=True)

    return cb


def run_stream(args) -> int:
    from .stream_bench import StreamBenchConfig, markdown_table, run_stream_bench, write_json

    device = _device(args.device)
    cfg = StreamBenchConfig(
        preset=args.config, frames=args.frames, windows=tuple(args.windows), recompute_windows=tuple(args.recompute_windows),
        unlimited=not args.no_unlimited, anchors=args.anchors, height=args.height, width=args.width, device=device,
        threads=args.threads, backend=args.backend, neighbourhood=args.neighbourhood,
        isolated_memory=args.isolated_memory, label=args.label, warmup_frames=args.warmup)
    js, png = _out_paths(args.out, args.name or f"stream_{args.config}")
    result = run_stream_bench(cfg, out=js, progress=_progress())
    if not device.startswith("cuda"):
        result["gpu_fps"] = {"skipped": "CPU run: bf16 / SDPA vs flash-attn / FPS at 518x392 W=16 need CUDA "
                                        "(see docs/benchmarks.md for expected GPU figures)"}
    elif args.gpu_fps == "auto":
        from .gpu_bench import run_gpu_fps

        result["gpu_fps"] = run_gpu_fps(device=device)
    else:
        result["gpu_fps"] = {"skipped": "--gpu-fps off"}
    write_json(result, js)
    print(markdown_table(result))
    for name, c in result["summary"]["done_when"].items():
        print(f"done-when {name}: {'MET' if c['met'] else 'NOT met'} {c}")
    print(f"wrote {js}")
    if not args.no_plot:
        from .plotting import plot_stream

        print(f"wrote {plot_stream(result, png)}")
    return 0


def run_stages(args) -> int:
    from .stage_bench import StageBenchConfig, markdown_table, run_stage_bench

    cfg = StageBenchConfig(configs=tuple(args.configs), frames=args.frames, warmup=args.warmup,
                           input_hw=(args.input_height, args.input_width), model_width=args.model_width,
                           window=args.window, cloud_points=args.cloud_points, device=_device(args.device),
                           threads=args.threads)
    js, png = _out_paths(args.out, args.name)
    result = run_stage_bench(cfg, out=js)
    print(markdown_table(result))
    print(f"wrote {js}")
    if not args.no_plot:
        from .plotting import plot_stages

        print(f"wrote {plot_stages(result, png)}")
    return 0


def run_roofline(args) -> int:
    from .roofline import Hardware, markdown_report, roofline_table

    hw = Hardware(peak_bf16_dense_tflops=args.peak_tflops, hbm_tb_s=args.hbm_tb_s, assumed_mfu=args.mfu)
    result = roofline_table(height=args.height, width=args.width, windows=args.windows, anchors=args.anchors,
                            hardware=hw)
    js, png = _out_paths(args.out, args.name)
    from .stream_bench import write_json

    write_json(result, js)
    print(markdown_report(result))
    print(f"wrote {js}")
    if not args.no_plot:
        from .plotting import plot_roofline

        print(f"wrote {plot_roofline(result, png)}")
    return 0


def run_cloud(args) -> int:
    from .env import environment
    from .stage_bench import cloud_check
    from .stream_bench import write_json

    res = {"schema": "stream4d.bench.cloud/1", "environment": environment("cpu"),
           **cloud_check(args.points, repeat=args.repeat)}
    js, _ = _out_paths(args.out, args.name)
    write_json(res, js)
    print(f"PointCloud2 {res['points']} points ({res['bytes'] / 1e6:.1f} MB): build median {res['build_ms']:.2f} ms "
          f"(min {res['build_min_ms']:.2f}), serialise median {res['serialize_ms']:.2f} ms (min "
          f"{res['serialize_min_ms']:.2f}); load {res['load']['loadavg_1m']}")
    print(f"wrote {js}")
    return 0


def run_longrun_cmd(args) -> int:
    from pathlib import Path

    from .longrun_bench import MAP_MAX_POINTS, run_longrun, run_memory

    noise = Path(args.noise).stem if args.noise not in ("none", "realistic") else args.noise
    if args.memory_only and args.lockstep:
        raise SystemExit("--lockstep is for comparing figures; --memory-only measures the node's timing: not both")
    if args.map_max_points is not None and not args.memory_only:
        raise SystemExit("--map-max-points is for --memory-only (the F-score runs keep the bench's cap)")
    if args.memory_only:
        run_memory(args.scene, args.trajectory, args.frames, args.seeds[0], args.width, args.height, args.noise,
                   Path(args.out), args.name or f"{args.scene}_{args.trajectory}_{args.frames}_memory",
                   Path(args.cache), map_max_points=args.map_max_points or MAP_MAX_POINTS)
        return 0
    run_longrun(args.scene, args.trajectory, args.frames, args.seeds, args.width, args.height, args.noise,
                Path(args.out), args.name or f"{args.scene}_{args.trajectory}_{noise}", Path(args.cache),
                threshold=args.threshold, lockstep=args.lockstep)
    return 0


def run_gpu(args) -> int:
    from .gpu_bench import run_gpu_fps
    from .stream_bench import write_json

    device = _device(args.device)
    res = run_gpu_fps(device=device, preset=args.config, hw=(args.height, args.width), window=args.window,
                      frames=args.frames, backends=tuple(args.backends))
    js, _ = _out_paths(args.out, args.name)
    write_json(res, js)
    print(res.get("skipped") or "\n".join(f"{k}: {v}" for k, v in res["results"].items()))
    print(f"wrote {js}")
    return 0


if __name__ == "__main__":  # python -m ros2_stream4d.bench.cli ...
    parser = argparse.ArgumentParser(prog="stream4d")
    register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(int(a.func(a) or 0))
