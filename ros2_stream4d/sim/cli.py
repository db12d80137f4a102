"""`stream4d sim`: render a procedural scene along a trajectory into a rosbag2 with exact ground truth."""

from __future__ import annotations

import argparse
import json
import time

from . import SCENE_KINDS, TRAJECTORY_KINDS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sim", help="render a synthetic scene into a rosbag2 (images, camera_info, TF, ground-truth depth/pose)",
        description=__doc__ + " The bag directory also receives scene.ply (mesh) and scene.json (parameters).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scene", choices=SCENE_KINDS, default="room",
                   help="scene kind; office = a floor of 2 x 2 rooms in a grid of corridors with doors, the two "
                        "western rooms identical twins (look-alike places for false loops)")
    p.add_argument("--trajectory", choices=TRAJECTORY_KINDS, default="handheld",
                   help="camera motion; loop / figure_eight / out_and_back are long ground-robot routes (office: "
                        "loop around both twin rooms, back at its start after ~800 frames at 10 fps; figure_eight "
                        "two lobes crossing at the central junction; out_and_back along the south and east "
                        "corridors and back); other scenes get a rectangle, a bow tie and a straight line")
    p.add_argument("--frames", type=int, default=300, help="number of frames")
    p.add_argument("--out", required=True, help="bag directory to create (must not exist, or be empty)")
    p.add_argument("--width", type=int, default=640, help="image width (px)")
    p.add_argument("--height", type=int, default=480, help="image height (px)")
    p.add_argument("--hfov", type=float, default=60.0, help="horizontal field of view (deg)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate (Hz): stamps advance by 1/fps")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene and trajectory (bit-for-bit reproducible)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="rosbag2 storage plugin")
    p.add_argument("--compressed", action="store_true", help="also write /camera/image_raw/compressed (jpeg)")
    p.add_argument("--no-raw", dest="raw", action="store_false", help="do not write /camera/image_raw")
    p.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8", help="raw image encoding")
    p.add_argument("--jpeg-quality", type=int, default=90, help="jpeg quality of the compressed images")
    p.add_argument("--odom-noise", type=float, default=0.0,
                   help="relative wheel-odometry error on /tf odom->base_link (e.g. 0.02 = 2%%; 0 = exact)")
    p.add_argument("--start-time", type=float, default=1_700_000_000.0, help="stamp of the first frame (s)")
    p.add_argument("--speed", type=float, default=None, help="path speed (m/s); default depends on the scene")
    p.add_argument("--scene-param", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a scene parameter, e.g. size_x=6 (room), length=15 (corridor); repeatable")
    p.add_argument("--trajectory-param", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a trajectory parameter, e.g. height=1.5, yaw_noise_deg=10 (handheld), radius=2 (orbit), "
                        "turn_radius=0.5, turn_rate_deg=40 (routes), camera_pitch_deg=-10, "
                        "camera_offset=[0.2,0,0.5]; repeatable")
    p.add_argument("--distortion", default=None, metavar="MODEL:C1,C2,...",
                   help="lens distortion of the images, in CameraInfo naming: plumb_bob:k1,k2,p1,p2,k3 | "
                        "rational_polynomial:k1,k2,p1,p2,k3,k4,k5,k6 | equidistant:k1,k2,k3,k4 (fisheye), e.g. "
                        "plumb_bob:-0.25,0.08,0,0,-0.015. Images are rendered through the lens and camera_info "
                        "carries the model and D; /ground_truth/depth stays pinhole (K = P). Default: pinhole")
    p.add_argument("--threads", type=int, default=1, help="raycasting threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bag at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _parse_kv(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parse_distortion(spec: str | None) -> tuple[str, list[float]]:
    """'MODEL:c1,c2,...' -> (model, coefficients), validated; None -> a pinhole camera."""
    from ros2_stream4d.mapping.undistort import DISTORTION_MODELS, is_distorted

    if not spec:
        return "plumb_bob", []
    model, _, coeffs = (x.strip() for x in spec.partition(":"))
    try:
        values = [float(c) for c in coeffs.split(",")] if coeffs else []
    except ValueError:
        raise SystemExit(f"--distortion: expected MODEL:c1,c2,... with numbers, got {spec!r}") from None
    if model not in DISTORTION_MODELS:
        raise SystemExit(f"--distortion: unknown distortion model {model!r}; supported: {', '.join(DISTORTION_MODELS)}")
    try:
        is_distorted(model, values)
    except ValueError as exc:
        raise SystemExit(f"--distortion: {exc}") from None
    return model, values


def run(args) -> int:
    from .bag import SimConfig, write_sim_bag

    traj_params = _parse_kv(args.trajectory_param)
    if args.speed is not None:
        traj_params["speed"] = args.speed
    distortion_model, distortion_coeffs = _parse_distortion(args.distortion)
    cfg = SimConfig(scene=args.scene, trajectory=args.trajectory, frames=args.frames, width=args.width,
                    height=args.height, fps=args.fps, seed=args.seed, hfov_deg=args.hfov, storage=args.storage,
                    raw=args.raw, compressed=args.compressed, jpeg_quality=args.jpeg_quality, encoding=args.encoding,
                    odom_noise=args.odom_noise, start_time_ns=int(round(args.start_time * 1e9)),
                    nthreads=args.threads, scene_params=_parse_kv(args.scene_param), trajectory_params=traj_params,
                    distortion_model=distortion_model, distortion_coeffs=distortion_coeffs)
    t0 = time.perf_counter()
    meta = write_sim_bag(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(f"wrote {args.out} ({cfg.storage}): {cfg.frames} frames {cfg.width}x{cfg.height} of a {cfg.scene} scene, "
          f"{cfg.trajectory} trajectory, in {dt:.1f} s ({cfg.frames / dt:.1f} frames/s)")
    for topic, n in meta["counts"].items():
        print(f"  {topic}: {n}")
    print(f"  + {args.out}/scene.ply, {args.out}/scene.json")
    return 0
