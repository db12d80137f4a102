#!/usr/bin/env python3
"""Top view of the office scene (sim/scenes.py) with its three ground-robot routes (sim/trajectories.py): walls,
doors, furniture, the twin rooms, and loop / figure_eight / out_and_back as driven (camera positions, one period).

usage: nice -n 19 python scripts/office_map.py [--seed 0] [--out docs/longrun/office_trajectories.png]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="scene and trajectory seed")
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--out", default="docs/longrun/office_trajectories.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene("office", args.seed)
    fig, ax = plt.subplots(figsize=(9.5, 8.5))
    for name, room in scene.params["rooms"].items():
        x0, x1, y0, y1 = room["box"]
        twin = name in scene.params["twins"]["parts"]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="#f3e6c8" if twin else "#eeeeee",
                               edgecolor="none", zorder=0))
        ax.text((x0 + x1) / 2, y1 - 0.35, name + (" (twin)" if twin else ""), ha="center", va="top", fontsize=8,
                color="0.3")
    for part in scene.parts:  # walls and obstacles below 2 m, as their footprints
        lo, hi = part.aabb
        if not part.obstacle or lo[2] > 2.0:
            continue
        wall = "_wall_" in part.name
        ax.add_patch(Rectangle(lo[:2], *(hi[:2] - lo[:2]), facecolor="0.15" if wall else "#9a7b55",
                               edgecolor="none", zorder=1))
    X, Y = scene.free_hi[:2] + 0.3
    ax.add_patch(Rectangle((0, 0), X, Y, fill=False, edgecolor="0.15", linewidth=2, zorder=1))
    styles = {"loop": ("tab:blue", "-"), "figure_eight": ("tab:red", "--"), "out_and_back": ("tab:green", ":")}
    for kind, (colour, ls) in styles.items():
        probe = make_trajectory(scene, kind, 2, fps=args.fps, seed=args.seed)
        n = int(np.ceil(probe.params["period_s"] * args.fps)) + 1
        t = make_trajectory(scene, kind, n, fps=args.fps, seed=args.seed)
        cam = t.T_world_cam[:, :3, 3]
        label = f"{kind}: {t.params['route_length']:.1f} m, {n - 1} frames at {args.fps:g} fps"
        ax.plot(cam[:, 0], cam[:, 1], color=colour, linestyle=ls, linewidth=1.8, label=label, zorder=3)
        ax.plot(*cam[0, :2], marker="o", color=colour, markersize=7, zorder=4)
        k = len(cam) // 7
        ax.annotate("", xy=cam[k + 3, :2], xytext=cam[k, :2], zorder=4,
                    arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.5})
    ax.set_aspect("equal")
    ax.set_xlim(-0.5, X + 0.5)
    ax.set_ylim(-0.5, Y + 0.5)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(f"office scene, seed {args.seed}: walls (black), furniture (brown), twin rooms (beige); "
                 "start = dot", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
