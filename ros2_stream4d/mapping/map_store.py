"""Saving and loading a keyframe map as a directory, atomically, without pickle.

Layout (format ``ros2_stream4d.map``, version 1)::

    <dir>/metadata.json        format, version, frames, scale, voxel sizes, map config, sha256 + size of every file
    <dir>/keyframes.npz        ids (K,), segments (K,), T_map_kf (K, 4, 4): the poses, in map
    <dir>/keyframes/kf_<id>.npz  the stored frames of each keyframe (depth, confidence, colour, K, relative poses):
                               what rebuilds the cloud, the TSDF and the grid
    <dir>/cloud.ply            the ~/map cloud (binary PLY: xyz, rgb, confidence)
    <dir>/mesh.ply             the TSDF mesh (binary PLY, vertex colours), when the TSDF is on
    <dir>/occupancy.pgm/.yaml  the 2D grid as nav2's map_server reads it (mode trinary), when the grid is on

Atomic: everything is written into a hidden temporary directory beside the target, each file fsynced, then the
temporary directory is exchanged with the target in one step (Linux ``renameat2(RENAME_EXCHANGE)``; a plain rename
when there is no target yet) and the old map removed. A crash at any point leaves the old map or the new one at
the target path, never a mixture (a stale ``.<name>.tmp-*`` directory may remain; it is never read).

Loading checks, before touching the running map: the path is a directory with metadata.json of our format and a
version we read; every listed file exists with its recorded size (else: truncated) and sha256 (else: corrupt); the
arrays have the documented shapes and dtypes. Any failure raises ``MapDirectoryError`` naming the directory and
what is wrong. The products are rebuilt from the keyframes with the running configuration (the saved PLY / PGM
files are for people and other tools).
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ros2_stream4d.mapping.keyframe_map import (
    KeyframeMap,
    KeyframeMapConfig,
    make_keyframe_map,
    read_keyframe_file,
    write_keyframe_file,
)
from ros2_stream4d.mapping.map_io import ply_bytes

FORMAT = "ros2_stream4d.map"
VERSION = 1
PGM_OCCUPIED, PGM_FREE, PGM_UNKNOWN = 0, 254, 128  # occ = (255 - p) / 255: 1.0, 0.004, 0.498
OCCUPIED_THRESH, FREE_THRESH = 0.65, 0.25  # nav2 map_server defaults; 128 is unknown under either convention


class MapDirectoryError(ValueError):
    """A map directory that cannot be loaded (not ours, truncated, corrupt, or an unsupported version)."""


# ---------------------------------------------------------------------------------------------------- writers
def mesh_ply_bytes(vertices: np.ndarray, triangles: np.ndarray, colours: np.ndarray) -> bytes:
    """Binary little-endian PLY of a triangle mesh with per-vertex colours."""
    v = np.asarray(vertices, "<f4").reshape(-1, 3)
    f = np.asarray(triangles, "<i4").reshape(-1, 3)
    c = np.asarray(colours, np.uint8).reshape(-1, 3)
    vert = np.empty(len(v), dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])
    vert["xyz"], vert["rgb"] = v, c
    face = np.empty(len(f), dtype=[("n", "u1"), ("idx", "<i4", 3)])
    face["n"], face["idx"] = 3, f
    header = ("ply\nformat binary_little_endian 1.0\ncomment ros2_stream4d TSDF mesh (map frame)\n"
              f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n")
    return header.encode("ascii") + vert.tobytes() + face.tobytes()


def pgm_bytes(data: np.ndarray) -> bytes:
    """nav_msgs-layout grid (row 0 = lowest y; -1/0/100) -> binary PGM (P5), image row 0 = highest y."""
    img = np.full(data.shape, PGM_UNKNOWN, np.uint8)
    img[data == 0] = PGM_FREE
    img[data == 100] = PGM_OCCUPIED
    img = np.flipud(img)
    h, w = img.shape
    return f"P5\n{w} {h}\n255\n".encode("ascii") + img.tobytes()


def map_server_yaml(image: str, resolution: float, origin) -> str:
    """The YAML nav2's map_server loads (image path relative to the YAML file)."""
    return (f"image: {image}\nmode: trinary\nresolution: {float(resolution)!r}\n"
            f"origin: [{float(origin[0])!r}, {float(origin[1])!r}, 0.0]\nnegate: 0\n"
            f"occupied_thresh: {OCCUPIED_THRESH}\nfree_thresh: {FREE_THRESH}\n")


def read_pgm(path: Path) -> np.ndarray:
    """A binary P5 PGM written by pgm_bytes -> uint8 image (rows as stored)."""
    raw = Path(path).read_bytes()
    parts = raw.split(b"\n", 3)
    if len(parts) < 4 or parts[0] != b"P5":
        raise ValueError(f"{path} is not a binary PGM")
    w, h = (int(x) for x in parts[1].split())
    body = parts[3]
    if len(body) != w * h:
        raise ValueError(f"{path}: {len(body)} pixel bytes, expected {w * h}")
    return np.frombuffer(body, np.uint8).reshape(h, w)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _stage_hook(name: str) -> None:
    """Called between the steps of a save (tests make it fail to simulate a crash at that point)."""


def save_map_dir(kmap: KeyframeMap, path, *, frame_id: str = "map", scale: float | None = None,
                 scale_valid: bool = False, extra: dict | None = None) -> Path:
    """Write ``kmap`` to the directory ``path`` atomically (module docstring); returns the final path. The map is
    locked while it is written (a consistent snapshot; integration waits)."""
    with kmap._lock:
        return _save_map_dir(kmap, path, frame_id=frame_id, scale=scale, scale_valid=scale_valid, extra=extra)


def _save_map_dir(kmap: KeyframeMap, path, *, frame_id: str, scale: float | None, scale_valid: bool,
                  extra: dict | None) -> Path:
    target = Path(os.fspath(path)).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"map path {target} exists and is not a directory")
    if target.exists() and not (target / "metadata.json").is_file() and any(target.iterdir()):
        raise FileExistsError(f"{target} is a non-empty directory that is not a saved map; refusing to replace it")
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"directory {parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "keyframes").mkdir()
        kfs = kmap.keyframes
        ids = np.array([kf.id for kf in kfs], np.int64)
        with open(tmp / "keyframes.npz", "wb") as f:
            np.savez(f, ids=ids, segments=np.array([kf.segment for kf in kfs], np.int64),
                     T_map_kf=np.array([kf.T_map_kf for kf in kfs], np.float64).reshape(-1, 4, 4))
            f.flush()
            os.fsync(f.fileno())
        for kf in kfs:
            write_keyframe_file(tmp / "keyframes" / f"kf_{kf.id:07d}.npz", kf.id, kf.segment, kmap.frames_of(kf))
            _stage_hook("keyframe")
        xyz, rgb, conf = kmap.points()
        header, body = ply_bytes(xyz, rgb, conf)
        _write(tmp / "cloud.ply", header + body.tobytes())
        _stage_hook("cloud")
        cfg = kmap.config
        if cfg.tsdf:
            _write(tmp / "mesh.ply", mesh_ply_bytes(*kmap.mesh()))
        grid_info = None
        if cfg.occupancy:
            data, origin, res = kmap.occupancy()
            _write(tmp / "occupancy.pgm", pgm_bytes(data))
            _write(tmp / "occupancy.yaml", map_server_yaml("occupancy.pgm", res, origin).encode())
            grid_info = {"width": int(data.shape[1]), "height": int(data.shape[0]), "resolution": float(res),
                         "origin": [float(origin[0]), float(origin[1]), 0.0]}
        _stage_hook("products")
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        meta = {"format": FORMAT, "version": VERSION,
                "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "frames": {"map": frame_id, "keyframe": "the keyframe's first camera optical frame",
                           "camera": "optical (x right, y down, z forward)"},
                "units": "metres (model units times the scale when the scale was not valid)",
                "scale": None if scale is None else float(scale), "scale_valid": bool(scale_valid),
                "voxel_sizes": {"cloud": cfg.cloud_voxel_size, "tsdf": cfg.tsdf_voxel_size if cfg.tsdf else None,
                                "occupancy": cfg.occupancy_resolution if cfg.occupancy else None},
                "keyframes": len(kfs), "stored_frames": int(sum(kf.n_frames for kf in kfs)),
                "segments": int(len({kf.segment for kf in kfs})), "cloud_points": int(len(xyz)),
                "occupancy": grid_info, "config": cfg.to_dict(), "extra": extra or {}, "files": files}
        _write(tmp / "metadata.json", json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp / "keyframes")
        _fsync_dir(tmp)
        _stage_hook("exchange")
        if target.exists():
            if not _exchange(tmp, target):
                # no atomic exchange on this filesystem: move the old map aside, then the new one in
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
                os.rmdir(old)
                os.rename(target, old)
                os.rename(tmp, target)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # the old map now
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------------- loading
def read_metadata(path) -> dict:
    """The checked metadata of a map directory (format, version, every file's size and checksum)."""
    d = Path(os.fspath(path)).expanduser()

    def fail(what: str):
        raise MapDirectoryError(f"cannot load map {d}: {what}")

    if not d.exists():
        fail("no such directory")
    if not d.is_dir():
        fail("not a directory")
    mp = d / "metadata.json"
    if not mp.is_file():
        fail("no metadata.json (not a ros2_stream4d map directory)")
    try:
        meta = json.loads(mp.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"metadata.json is not valid JSON ({exc})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fail(f"foreign map: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        fail(f"unsupported map format version {meta.get('version')!r} (this build reads {VERSION})")
    files = meta.get("files")
    if not isinstance(files, dict) or "keyframes.npz" not in files:
        fail("metadata.json lists no files (incomplete save)")
    for rel, info in files.items():
        p = d / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            fail(f"metadata.json lists a file outside the map: {rel!r}")
        if not p.is_file():
            fail(f"missing file {rel}")
        size = p.stat().st_size
        if size != info.get("bytes"):
            fail(f"file {rel} is truncated or altered ({size} bytes, metadata says {info.get('bytes')})")
        if _sha256(p) != info.get("sha256"):
            fail(f"file {rel} is corrupt (sha256 differs from metadata.json)")
    return meta


def load_map_dir(path, config: KeyframeMapConfig | None = None) -> tuple[KeyframeMap, dict]:
    """(a new KeyframeMap rebuilt from the directory's keyframes, metadata). Raises MapDirectoryError; the caller's
    running map is never touched (swap it in only after this returns)."""
    d = Path(os.fspath(path)).expanduser()
    meta = read_metadata(d)

    def fail(what: str):
        raise MapDirectoryError(f"cannot load map {d}: {what}")

    try:
        with np.load(d / "keyframes.npz", allow_pickle=False) as z:
            ids, segments, poses = z["ids"], z["segments"], z["T_map_kf"]
    except Exception as exc:
        fail(f"keyframes.npz is unreadable ({type(exc).__name__}: {exc})")
    k = len(ids)
    if ids.dtype != np.int64 or segments.shape != (k,) or poses.shape != (k, 4, 4) or not np.isfinite(poses).all():
        fail("keyframes.npz has inconsistent ids, segments or poses")
    if len(set(ids.tolist())) != k:
        fail("keyframes.npz has duplicate keyframe ids")
    keyframes = []
    for kid, seg, T in zip(ids.tolist(), segments.tolist(), poses):
        rel = f"keyframes/kf_{kid:07d}.npz"
        if rel not in meta["files"]:
            fail(f"keyframe {kid} has no file in metadata.json")
        try:
            _, fseg, frames = read_keyframe_file(d / rel, kid)
        except ValueError as exc:
            fail(str(exc))
        if fseg != seg:
            fail(f"keyframe {kid}: segment {fseg} in its file, {seg} in keyframes.npz")
        keyframes.append((kid, seg, T, frames))
    cfg = config or KeyframeMapConfig(**{k: v for k, v in meta.get("config", {}).items()
                                         if k in KeyframeMapConfig.__dataclass_fields__})
    return make_keyframe_map(keyframes, cfg), meta
