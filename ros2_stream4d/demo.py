"""`stream4d demo`: the whole product in one command, on this machine.

Renders a held-out synthetic sequence as a rosbag2, starts stream4d_node (default model) in its own process, plays
the bag into it over real DDS (loopback only) with /clock, records the node's outputs into a rosbag2, saves the map
through the ~/save_map service, and evaluates the outputs against the ground truth (trajectory and depth plots,
metrics as JSON and markdown). Prints where everything is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ros2_stream4d.topics import OUTPUTS, output_topic
from ros2_stream4d.topics import resolve as topics_resolve

QUIET_S = 20.0  # s without a new pose after the bag was played: the remaining frames were skipped
# every output of the node (one topic table: ros2_stream4d.topics) plus the input TF, for the TF-tree check
OUTPUT_TOPICS = {**{output_topic(key): msgtype for key, (_, msgtype) in OUTPUTS.items()},
                 "/tf_static": "tf2_msgs/msg/TFMessage"}
MAP_TOPIC, POSE_TOPIC = output_topic("map"), output_topic("camera_pose")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="render a sequence, replay it into the node over DDS, write map/plots/metrics",
                              description=__doc__)
    p.add_argument("--out", default="out/demo", help="output folder (replaced)")
    p.add_argument("--model", default="auto",
                   help="model card, checkpoint, 'random-small', 'oracle', or auto: the shipped default model "
                        "(stream4d-small, trained here on a frozen DINOv2-S encoder), else the ground-truth oracle "
                        "(said so loudly); 'oracle' for exact geometry")
    p.add_argument("--scene", default="room")
    p.add_argument("--trajectory", default="ground_robot")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--seed", type=int, default=9001, help="scene/trajectory seed (held out from training)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--input-width", type=int, default=0, help="model input width (0 = the model card's)")
    p.add_argument("--rate", type=float, default=1.0, help="bag playback rate")
    p.set_defaults(func=run)


def _ros_environment() -> dict[str, str]:
    """DDS stays on this machine whatever the caller's shell says."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1]
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(root / "config" / "fastdds_loopback.xml"))
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 1))
    env.pop("ROS_LOCALHOST_ONLY", None)
    return env


def _default_model() -> str:
    from ros2_stream4d.mapping.reconstructor import resolve_model_spec

    try:
        resolve_model_spec("stream4d-small")
        return "stream4d-small"
    except FileNotFoundError:
        print("[demo] NOTE: the embedded model (model/stream4d-small) is missing from this install, so the demo "
              "runs the ORACLE model: ground-truth depth and poses in the model's output format. It shows the whole "
              "ROS pipeline working, not a learned model.")
        return "oracle"


def run(args) -> int:
    import shutil

    os.environ.update(_ros_environment())  # before rclpy is imported
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    from ros2_stream4d.mapping.reconstructor import model_input_width
    from ros2_stream4d.ros.compat.recorder import BagRecorder
    from ros2_stream4d.sim.bag import SimConfig, write_sim_bag

    if args.model == "auto":
        args.model = _default_model()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    print(f"[demo] 1/5 rendering {args.frames} frames ({args.scene}, {args.trajectory}, seed {args.seed})")
    gt_bag = out / "input_bag"
    write_sim_bag(gt_bag, SimConfig(scene=args.scene, trajectory=args.trajectory, frames=args.frames,
                                    width=args.width, height=args.height, seed=args.seed), progress=True)

    input_width = args.input_width or model_input_width(args.model)
    map_path = out / "map"  # the whole map directory: keyframes, cloud.ply, mesh.ply, nav2 grid, metadata
    params = [f"model:={args.model}", f"window:={args.window}", f"input_width:={input_width}", "use_sim_time:=true",
              "process_every_frame:=true", "input_qos:=reliable", f"map_save_path:={map_path}", "conf_percentile:=30.0"]
    if args.model == "oracle":
        # the oracle replays ground truth, metric by construction: its scale is exactly 1 m per unit
        params += [f"oracle_bag:={gt_bag}", "scale_source:=fixed", "fixed_scale:=1.0"]
    else:
        # a learned model predicts up to scale: the robot's wheel odometry (odom -> base_link) gives metres; the
        # sim camera's calibration comes with CameraInfo; 1 torch thread beside the player and the recorder
        params += ["scale_source:=odometry", "intrinsics_source:=camera_info", "torch_threads:=1"]
    # the sim bag is a robot: base_link -> camera_link -> camera_optical_frame on /tf_static and wheel odometry
    # odom -> base_link on /tf, so the node runs the robot set-up and publishes map -> odom (REP-105)
    params += ["base_frame:=base_link", "tf_timeout:=1.0"]  # a replay can wait for the odometry of each image
    remaps = ["image:=/camera/image_raw", "camera_info:=/camera/camera_info"]
    node_cmd = [sys.executable, "-m", "ros2_stream4d.ros.node", "--ros-args"]
    for p in params:
        node_cmd += ["-p", p]
    for r in remaps:
        node_cmd += ["-r", r]
    print(f"[demo] 2/5 starting stream4d_node (robot set-up: the bag has odom -> base_link, so the node publishes "
          f"map -> odom): {' '.join(params + remaps)}")
    log = open(out / "node.log", "w")  # noqa: SIM115 - closed in finally
    node_proc = subprocess.Popen(node_cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    player = None
    rclpy.init()
    demo_node = rclpy.create_node("stream4d_demo")
    executor = SingleThreadedExecutor()
    executor.add_node(demo_node)
    recorder = BagRecorder(demo_node, out / "output_bag", OUTPUT_TOPICS, latched=(MAP_TOPIC, "/tf_static"))

    def spin_until(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if node_proc.poll() is not None:
                raise RuntimeError(f"stream4d_node exited ({node_proc.returncode}); see {out / 'node.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; see {out / 'node.log'}")
            executor.spin_once(timeout_sec=0.05)

    try:
        spin_until(lambda: demo_node.count_publishers(POSE_TOPIC) > 0, 120, "the node to start")
        print(f"[demo] 3/5 playing the bag over DDS (loopback) at rate {args.rate}")
        player = subprocess.Popen([sys.executable, "-m", "ros2_stream4d.cli", "play", str(gt_bag), "--quiet",
                                   "--rate", str(args.rate), "--wait-for-subscribers", "/camera/image_raw",
                                   "/tf_static"], env=os.environ.copy())
        last = [-1, time.monotonic()]

        def all_frames_done() -> bool:
            n = recorder.counts[POSE_TOPIC]
            if n != last[0]:
                last[:] = [n, time.monotonic()]
                print(f"\r[demo]     frames processed: {n}/{args.frames}", end="", flush=True)
            # a frame the node skipped (logged in node.log) never gets a pose: once the bag is played, stop
            # waiting when no pose came for QUIET_S
            played = player.poll() is not None
            return n >= args.frames or (played and time.monotonic() - last[1] > QUIET_S)

        spin_until(all_frames_done, 30 + args.frames * 5.0 / args.rate, "every frame to be processed")
        print()
        if last[0] < args.frames:
            print(f"[demo] WARNING: {args.frames - last[0]} of {args.frames} frames gave no pose (skipped by the "
                  f"node: see {out / 'node.log'})")
        client = demo_node.create_client(Trigger, topics_resolve("~/save_map"))
        client.wait_for_service(timeout_sec=30)
        future = client.call_async(Trigger.Request())
        spin_until(future.done, 60, "~/save_map")
        print(f"[demo] 4/5 {future.result().message}")
        spin_until(lambda: recorder.counts[MAP_TOPIC] > 0, 30, "the accumulated map")
    finally:
        recorder.close()
        if player is not None and player.poll() is None:
            player.terminate()
        node_proc.send_signal(2)
        try:
            node_proc.wait(30)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        log.close()
        demo_node.destroy_node()
        rclpy.try_shutdown()

    print("[demo] 5/5 evaluating against ground truth")
    from ros2_stream4d.eval.evaluate import evaluate_bags
    from ros2_stream4d.eval.report import write_report

    # scored on the map the run ends with (the saved directory: cloud, mesh, grid), not an earlier ~/map snapshot
    result = evaluate_bags(out / "output_bag", gt_bag, map_file=map_path)
    files = write_report(result, out / "report", title=f"stream4d demo: {args.model} on {args.scene}/{args.trajectory}")
    m = result.metrics
    print(f"[demo] done in {time.monotonic() - t0:.0f} s")
    print(f"  ATE RMSE {m['ate_rmse']:.4f} m (Sim(3)-aligned)   RPE {m['rpe_trans_rmse']:.4f} m / "
          f"{m['rpe_rot_rmse']:.3f} deg   depth AbsRel {m.get('depth_abs_rel', float('nan')):.3f} "
          f"delta<1.25 {m.get('depth_delta1', float('nan')):.3f}")
    print(f"  map directory        {map_path} (cloud.ply, mesh.ply, nav2 occupancy PGM + YAML, keyframes)")
    print(f"  output rosbag        {out / 'output_bag'}")
    print(f"  input (sim) rosbag   {gt_bag}")
    for key, path in files.items():
        print(f"  {key:<20} {path}")
    print(f"  node log             {out / 'node.log'}")
    from ros2_stream4d.viewer.recording import write_demo_recording

    rrd = write_demo_recording(out)
    print(f"  rerun recording      {rrd}")
    print(f"[demo] look at it in a browser: stream4d view {rrd} --serve")
    return 0
