"""Saving maps as binary PLY or PCD, atomically: a reader sees the old file or the complete new one, never a part.

Files are written by our own little-endian writers (fast, exact field layout, an optional float ``confidence``
field); Open3D (``open3d.io.read_point_cloud``), PCL and CloudCompare read them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

FORMATS = (".ply", ".pcd")


def _path_text(path) -> str:
    text = os.fspath(path)
    if not text or "\x00" in text:
        raise ValueError(f"invalid map path {text!r}")
    return text


def _resolve_target(text: str, root) -> Path:
    """The absolute target of a map path: inside `root` when given (symlinks followed, no escape), else resolved
    (a symlinked target: os.replace on the link would replace the link itself)."""
    p = Path(text).expanduser()
    if root is None:
        return p.resolve()
    root_dir = Path(root).expanduser().resolve()
    p = (root_dir / p).resolve()
    if not p.is_relative_to(root_dir):
        raise PermissionError(f"map path {text!r} resolves to {p}, outside the allowed directory {root_dir}")
    return p


def _check_parent(p: Path) -> Path:
    parent = p.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"directory {parent} is not writable")
    return p


def validate_map_path(path, root=None) -> Path:
    """The absolute path to write, or a clear error.

    root: when given (e.g. a ``~/save_map`` service writing for remote clients), relative paths are taken relative to
    it and the resolved target (symlinks followed) must stay inside it, so "../" or a link cannot escape.
    """
    text = _path_text(path)
    if Path(text).suffix.lower() not in FORMATS:
        raise ValueError(f"map path must end in one of {FORMATS}, got {text!r}")
    p = _resolve_target(text, root)
    if p.is_dir():
        raise IsADirectoryError(f"map path {p} is a directory")
    return _check_parent(p)


def validate_map_dir_path(path, root=None) -> Path:
    """The absolute map directory to write (mapping/map_store.py), or a clear error: like validate_map_path, but the
    target is a directory that is absent, empty, or a map saved before (it has metadata.json); never a file."""
    p = _resolve_target(_path_text(path), root)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"map path {p} exists and is not a directory")
    if p.is_dir() and not (p / "metadata.json").is_file() and any(p.iterdir()):
        raise FileExistsError(f"{p} is a non-empty directory that is not a saved map")
    return _check_parent(p)


def _check_cloud(xyz, rgb, conf):
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be (N, 3), got {xyz.shape}")
    n = xyz.shape[0]
    rgb = np.asarray(rgb)
    if rgb.shape != (n, 3):
        raise ValueError(f"rgb must be ({n}, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        if np.issubdtype(rgb.dtype, np.floating) and rgb.size and (np.nanmin(rgb) < 0 or np.nanmax(rgb) > 1):
            raise ValueError("float colours must be in [0, 1] (or pass uint8)")
        rgb = np.clip(np.rint(rgb * 255.0), 0, 255) if np.issubdtype(rgb.dtype, np.floating) else rgb
        rgb = rgb.astype(np.uint8)
    if conf is not None:
        conf = np.asarray(conf, dtype=np.float32)
        if conf.shape != (n,):
            raise ValueError(f"conf must be ({n},), got {conf.shape}")
    return xyz.astype("<f4"), rgb, conf


def ply_bytes(xyz, rgb, conf=None) -> tuple[bytes, np.ndarray]:
    """(header, structured vertex array) of a binary little-endian PLY."""
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if conf is not None:
        fields.append(("confidence", "<f4"))
    data = np.empty(xyz.shape[0], dtype=fields)
    data["x"], data["y"], data["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    data["red"], data["green"], data["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    if conf is not None:
        data["confidence"] = conf
    types = {"<f4": "float", "u1": "uchar"}
    props = "".join(f"property {types[t]} {name}\n" for name, t in fields)
    header = f"ply\nformat binary_little_endian 1.0\ncomment ros2_stream4d map\nelement vertex {xyz.shape[0]}\n{props}end_header\n"
    return header.encode("ascii"), data


def pcd_bytes(xyz, rgb, conf=None) -> tuple[bytes, np.ndarray]:
    """(header, structured point array) of a binary PCD v0.7; colour is PCL's packed float ``rgb``."""
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")]
    if conf is not None:
        fields.append(("confidence", "<f4"))
    data = np.empty(xyz.shape[0], dtype=fields)
    data["x"], data["y"], data["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rgb32 = rgb.astype(np.uint32)
    data["rgb"] = (rgb32[:, 0] << 16) | (rgb32[:, 1] << 8) | rgb32[:, 2]
    if conf is not None:
        data["confidence"] = conf
    names = " ".join(name for name, _ in fields)
    n_fields = len(fields)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {names}\nSIZE {' '.join(['4'] * n_fields)}\nTYPE {' '.join(['F'] * n_fields)}\n"
        f"COUNT {' '.join(['1'] * n_fields)}\nWIDTH {xyz.shape[0]}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {xyz.shape[0]}\nDATA binary\n"
    )
    return header.encode("ascii"), data


def _write_payload(f, header: bytes, data: np.ndarray) -> None:
    f.write(header)
    f.write(data.tobytes())


def save_map(path, xyz, rgb, conf=None, *, root=None) -> Path:
    """Write a coloured cloud to ``path`` (.ply or .pcd, binary little endian) atomically; returns the final path.

    The data goes to a temporary file in the same directory, is flushed and fsynced, then renamed over the target
    (os.replace is atomic on POSIX); on any error the temporary file is removed and an existing map is untouched.
    """
    target = validate_map_path(path, root)
    xyz, rgb, conf = _check_cloud(xyz, rgb, conf)
    header, data = (ply_bytes if target.suffix.lower() == ".ply" else pcd_bytes)(xyz, rgb, conf)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_payload(f, header, data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600): give it the old file's mode, or the usual 0644 for a new map
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)  # make the rename itself durable
    return target


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
