"""ROS-free field builders for the map products' messages (plain numpy / dicts; ros/ fills the real messages).

- ``mesh_marker_fields``: a visualization_msgs/Marker TRIANGLE_LIST (type 11) of the TSDF mesh: every triangle as
  three consecutive points with one colour per point (RViz draws per-vertex colours when ``colors`` has one entry
  per point). Large meshes are split into several markers (ids id, id + 1, ...) of at most ``max_triangles`` each,
  since one Marker message is one DDS sample.
- ``occupancy.grid_msg_fields``: nav_msgs/OccupancyGrid fields.
"""

from __future__ import annotations

import numpy as np

TRIANGLE_LIST = 11
ADD, DELETEALL = 0, 3


def mesh_marker_fields(vertices: np.ndarray, triangles: np.ndarray, colours: np.ndarray | None = None,
                       frame_id: str = "map", ns: str = "mesh", marker_id: int = 0,
                       max_triangles: int = 500_000) -> list[dict]:
    """One dict per marker: header frame_id, ns, id, type, action, pose (identity), scale (1, 1, 1), color (white,
    opaque: used when colours is None), points (3 T, 3) float64 and colors (3 T, 4) float32 rgba in [0, 1]."""
    v = np.asarray(vertices, np.float64).reshape(-1, 3)
    f = np.asarray(triangles, np.int64).reshape(-1, 3)
    c = None if colours is None else np.asarray(colours, np.uint8).reshape(-1, 3)
    out = []
    for k, start in enumerate(range(0, max(len(f), 1), max_triangles)):
        tri = f[start:start + max_triangles].reshape(-1)
        rgba = np.empty((0, 4), np.float32)
        if c is not None:
            rgba = np.concatenate([c[tri].astype(np.float32) / 255.0, np.ones((len(tri), 1), np.float32)], axis=1)
        out.append({"header": {"frame_id": frame_id}, "ns": ns, "id": int(marker_id + k), "type": TRIANGLE_LIST,
                    "action": ADD, "pose": {"position": (0.0, 0.0, 0.0), "orientation": (0.0, 0.0, 0.0, 1.0)},
                    "scale": (1.0, 1.0, 1.0), "color": (1.0, 1.0, 1.0, 1.0), "points": v[tri], "colors": rgba})
    return out
