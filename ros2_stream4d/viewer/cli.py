"""`stream4d view BAG [BAG ...]`: open a run's bags in Rerun (a recording file, the web viewer, or a window)."""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "view", help="open the node's output bag (+ the sim bag for ground truth) in Rerun",
        description="Log a run's bags into a Rerun recording: camera images (JPEG), depth and confidence, "
                    "per-frame clouds, the accumulated map (and --mesh), the camera and ground-truth trajectories, "
                    "in the map frame on one timeline (header stamps). Give the node's output bag and, for images "
                    "and ground truth, the sim/input bag, in any order. Default: a native viewer window when there "
                    "is a display, else says how to look at it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 folders (mcap or sqlite3), or one .rrd recording "
                                                         "(e.g. out/demo/demo.rrd) to open as it is")
    p.add_argument("--save", metavar="FILE.rrd", help="write the recording to this file (and do not open a viewer "
                                                      "unless --serve is given too)")
    p.add_argument("--serve", action="store_true", help="serve the web viewer on 127.0.0.1 and print its URL; "
                                                        "runs until Ctrl-C")
    p.add_argument("--web-port", type=int, default=9090, help="web viewer HTTP port (--serve); 0 = any free port")
    p.add_argument("--grpc-port", type=int, default=9876, help="the viewer's gRPC port; 0 = any free port")
    p.add_argument("--ns", default="/stream4d", help="the node's output namespace")
    p.add_argument("--image-topic", default="/camera/image_raw", help="camera images (or its /compressed)")
    p.add_argument("--camera-info-topic", default="/camera/camera_info")
    p.add_argument("--mesh", metavar="PLY", help="a mesh of the map (map frame) to show")
    p.add_argument("--gt-scene", action="store_true", help="also show the sim scene mesh (scene.ply in the sim "
                                                           "bag), aligned like the ground-truth trajectory")
    p.add_argument("--mcap-topics", nargs="+", metavar="REGEX", help="also add these topics as Rerun's own MCAP "
                                                                     "importer decodes them (e.g. '^/tf$')")
    p.add_argument("--cloud-points", type=int, default=4000, help="per-frame cloud points kept")
    p.add_argument("--map-points", type=int, default=150_000, help="map points kept per logged map")
    p.add_argument("--map-updates", type=int, default=10, help="map messages logged at most (the last always)")
    p.add_argument("--depth-width", type=int, default=160, help="depth / confidence subsampled to this width")
    p.add_argument("--image-width", type=int, default=0, help="camera images resized to this width (0 = as is)")
    p.add_argument("--jpeg-quality", type=int, default=80)
    p.add_argument("--frame-stride", type=int, default=1, help="images, depth, confidence and clouds of every n-th "
                                                             "frame only (poses of all): for long runs")
    p.add_argument("--path-updates", type=int, default=300, help="the growing trajectories are logged at most this "
                                                               "many times (the last pose always)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .entities import ViewOptions
    from .recording import Topics, save_recording
    from .server import ViewerUnavailable, display_available, serve_web, spawn_native

    options = ViewOptions(jpeg_quality=args.jpeg_quality, image_width=args.image_width, depth_width=args.depth_width,
                          cloud_points=args.cloud_points, map_points=args.map_points, map_updates=args.map_updates,
                          frame_stride=args.frame_stride, path_updates=args.path_updates)
    topics = Topics(ns=args.ns.rstrip("/"), image=args.image_topic, camera_info=args.camera_info_topic)
    rrds = [Path(b) for b in args.bags if Path(b).suffix == ".rrd"]
    if rrds:  # a recording already (e.g. out/demo/demo.rrd): open it as it is
        if len(rrds) != len(args.bags) or args.save:
            print("stream4d view: give either bags or one .rrd recording (and no --save with a recording)")
            return 1
        if not rrds[0].is_file():
            print(f"stream4d view: no such recording: {rrds[0]}")
            return 1
        path = rrds[0]
    else:
        path = Path(args.save) if args.save else Path(tempfile.mkdtemp(prefix="stream4d_view_")) / "recording.rrd"
        try:
            summary = save_recording(args.bags, path, options, topics, mesh=args.mesh, gt_scene=args.gt_scene,
                                     mcap_topics=args.mcap_topics)
        except (ValueError, FileNotFoundError) as exc:
            print(f"stream4d view: {exc}")
            return 1
        print(f"[view] {path}: {summary.describe()}")
        if args.save and not args.serve:
            print(f"[view] open it with:  stream4d view {path} --serve   (browser)   or:  rerun {path}   (window)")
            return 0
    if args.serve:
        try:
            viewer = serve_web([path], web_port=args.web_port, grpc_port=args.grpc_port)
        except ViewerUnavailable as exc:
            print(f"stream4d view: {exc}")
            return 1
        print(f"[view] web viewer (this machine only): {viewer.url}")
        w, g = viewer.web_port, viewer.grpc_port
        print(f"[view] from another machine: ssh -L {w}:127.0.0.1:{w} -L {g}:127.0.0.1:{g} <this host>, then open "
              "the same URL; Ctrl-C stops the viewer")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the viewer on SIGTERM as on Ctrl-C
        try:
            while viewer.alive():
                time.sleep(0.5)
            print(f"stream4d view: the viewer exited ({viewer.proc.returncode})")
        except KeyboardInterrupt:
            pass
        finally:
            viewer.stop()
        return 0
    if not display_available():
        print(f"[view] no display for a native viewer. Look at it with:\n"
              f"  stream4d view {path} --serve     (web viewer on 127.0.0.1:{args.web_port})\n"
              f"  rerun {path}     (on a machine with a display)")
        return 0
    try:
        spawn_native([path], grpc_port=0)
    except ViewerUnavailable as exc:
        print(f"stream4d view: {exc}; the recording is {path} (open it with `rerun {path}`)")
        return 1
    print(f"[view] native viewer started on {path}")
    return 0
