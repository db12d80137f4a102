"""Place recognition on a long office loop: the model's own descriptor (pooled tokens of the embedded stream4d-small:
its aggregator on the pretrained DINOv2 ViT-S/14 features) against the classical one (loops.classical_descriptor).

    python benchmarks/place_recognition.py --trajectory loop --seed 0 --out place_recognition.json

The bag is the one `stream4d bench longrun` uses (cached in --cache). Every --every-th frame is streamed through
the model (its rolling cache sees only those frames); every --keyframe-every-th of them is a keyframe. For each
keyframe j with an earlier keyframe i at least --min-separation keyframes back that shows the same place (ground
truth: cameras within --same-m metres and --same-deg degrees), the earlier keyframes are ranked by cosine similarity
of the descriptors: recall@1 / @5 = the share of such queries with a true revisit among the top 1 / 5. No odometry
gate (the back-end adds one): this scores the descriptor alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", default="office")
    p.add_argument("--trajectory", default="loop")
    p.add_argument("--frames", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=5, help="frames streamed through the model")
    p.add_argument("--keyframe-every", type=int, default=2, help="streamed frames per keyframe")
    p.add_argument("--min-separation", type=int, default=15)
    p.add_argument("--same-m", type=float, default=1.0)
    p.add_argument("--same-deg", type=float, default=30.0)
    p.add_argument("--model", default="stream4d-small")
    p.add_argument("--input-width", type=int, default=224)
    p.add_argument("--cache", default="/tmp/stream4d_longrun")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)

    from ros2_stream4d.bench.env import environment
    from ros2_stream4d.bench.longrun_bench import read_inputs, sim_bag
    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.backend.loops import classical_descriptor
    from ros2_stream4d.mapping.backend.sim3 import rotation_angle_deg
    from ros2_stream4d.mapping.pipeline import PipelineConfig
    from ros2_stream4d.sim.bag import read_ground_truth

    bag = sim_bag(Path(a.cache), a.scene, a.trajectory, a.frames, 224, 168, a.seed)
    stamps, images, K = read_inputs(bag)
    gt = read_ground_truth(bag, with_depth=False)
    pipe = load_pipeline(ModelOptions(model=a.model, device="cpu", torch_threads=1),
                         PipelineConfig(input_width=a.input_width))
    model_d, classic_d, poses = [], [], []
    t0 = time.perf_counter()
    try:
        for n, i in enumerate(range(0, len(stamps), a.every)):
            pred = pipe.reconstructor.step(images[i], int(stamps[i]), K_src=K)
            if n % a.keyframe_every == 0:
                if pred.descriptor is None:
                    raise SystemExit(f"model {a.model!r} returns no place descriptor")
                model_d.append(pred.descriptor)
                classic_d.append(classical_descriptor(images[i]))
                poses.append(gt.T_world_cam[i])
            if n % 50 == 0:
                print(f"frame {i + 1}/{len(stamps)}  {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        pipe.close()
    poses = np.stack(poses)
    n = len(poses)
    same = np.zeros((n, n), bool)
    for j in range(n):
        d = np.linalg.norm(poses[:, :3, 3] - poses[j, :3, 3], axis=1)
        for i in np.flatnonzero(d < a.same_m):
            same[i, j] = rotation_angle_deg(poses[i, :3, :3].T @ poses[j, :3, :3]) < a.same_deg
    result = {"schema": "stream4d.bench.place_recognition/1", "environment": environment("cpu"), "scene": a.scene,
              "trajectory": a.trajectory, "seed": a.seed, "model": a.model, "keyframes": n,
              "frames_per_keyframe": a.every * a.keyframe_every, "min_separation": a.min_separation}
    for name, D in (("model tokens", np.stack(model_d)), ("classical", np.stack(classic_d))):
        D = D / np.linalg.norm(D, axis=1, keepdims=True)
        S = D @ D.T
        hits1 = hits5 = queries = 0
        true_sims, false_sims = [], []
        for j in range(a.min_separation, n):
            old = j - a.min_separation + 1
            truth = same[:old, j]
            true_sims += list(S[:old, j][truth])
            false_sims += list(S[:old, j][~truth])
            if not truth.any():
                continue
            queries += 1
            order = np.argsort(-S[:old, j])
            hits1 += bool(truth[order[0]])
            hits5 += bool(truth[order[:5]].any())
        r = {"queries_with_a_revisit": queries, "recall_at_1": hits1 / max(queries, 1),
             "recall_at_5": hits5 / max(queries, 1), "similarity_true_median": float(np.median(true_sims)),
             "similarity_other_median": float(np.median(false_sims)),
             "similarity_other_p99": float(np.percentile(false_sims, 99)), "dim": int(D.shape[1])}
        result[name] = r
        print(f"{name:13s} ({r['dim']} dims): recall@1 {r['recall_at_1']:.3f}, recall@5 {r['recall_at_5']:.3f} over "
              f"{queries} queries; similarity of true revisits median {r['similarity_true_median']:.3f}, of other "
              f"places median {r['similarity_other_median']:.3f} (p99 {r['similarity_other_p99']:.3f})", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
