"""Training data for stream4d-small: the frozen encoder's features of a rendered pool, computed once and cached.

``cache_pool(pool, cache)`` reads the pool's ``shard_*.npz`` (ros2_stream4d.train.data: uint8 RGB, float16 depth,
camera-to-world poses, K), runs the frozen DINOv2 encoder (ros2_stream4d.model.small.FrozenEncoder) on every frame and
writes ``<cache>/<shard>.feats.npy`` (float16 [n_seq, L, P, 1152]) plus ``<cache>/<shard>.meta.npz`` (depth, T_wc, K,
kind). It is resumable (finished shards are skipped) and can follow a renderer that is still writing the pool.
``FeaturePool`` loads the cache and samples clips with the targets of the small model's losses.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .data import KINDS, load_shard


def cache_pool(pool_dir: str | Path, cache_dir: str | Path, batch: int = 16, threads: int = 1,
               follow_seconds: float = 0.0, max_shards: int | None = None, log=print) -> int:
    """Encode every pool shard not cached yet; with follow_seconds > 0 keep polling for new shards until none has
    appeared for that long. Returns the number of shards encoded."""
    from ros2_stream4d.model.small import FrozenEncoder, SmallConfig

    torch.set_num_threads(threads)
    pool, cache = Path(pool_dir), Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    enc = FrozenEncoder(SmallConfig())
    done = 0
    last_new = time.time()
    while True:
        todo = [p for p in sorted(pool.glob("shard_*.npz")) if not p.name.endswith(".tmp.npz")
                and not (cache / (p.stem + ".meta.npz")).exists()]
        if max_shards is not None:
            todo = todo[: max(0, max_shards - len(list(cache.glob("*.meta.npz"))))]
        if not todo:
            if follow_seconds <= 0 or time.time() - last_new > follow_seconds:
                return done
            time.sleep(10)
            continue
        last_new = time.time()
        for p in todo:
            t0 = time.time()
            seqs = load_shard(p)
            n, L = len(seqs), len(seqs[0])
            imgs = np.concatenate([s.rgb for s in seqs])  # [n*L, H, W, 3]
            out = []
            for i in range(0, len(imgs), batch):
                x = torch.from_numpy(imgs[i: i + batch]).permute(0, 3, 1, 2).float().div(255.0)
                out.append(enc(x).half().numpy())
            feats = np.concatenate(out).reshape(n, L, *out[0].shape[1:])
            tmp = cache / (p.stem + ".feats.tmp.npy")
            np.save(tmp, feats)
            tmp.rename(cache / (p.stem + ".feats.npy"))
            meta_tmp = cache / (p.stem + ".meta.tmp.npz")
            np.savez(meta_tmp, depth=np.stack([s.depth for s in seqs]).astype(np.float16),
                     T_wc=np.stack([s.T_wc for s in seqs]).astype(np.float32),
                     K=np.stack([s.K for s in seqs]).astype(np.float32),
                     kind=np.array([KINDS.index(s.kind) for s in seqs], np.int64))
            meta_tmp.rename(cache / (p.stem + ".meta.npz"))
            done += 1
            log(f"cache: {p.name} {n}x{L} frames in {time.time() - t0:.0f} s "
                f"({(time.time() - t0) / (n * L) * 1000:.0f} ms/frame)", )


class FeaturePool:
    """Cached features in memory; ``refresh()`` picks up shards cached since."""

    def __init__(self, cache_dir: str | Path, max_shards: int | None = None, exclude: tuple[str, ...] = ()):
        self.dir = Path(cache_dir)
        self.max_shards = max_shards
        self.exclude = set(exclude)
        self.loaded: list[str] = []
        self.feats: list[np.ndarray] = []  # [L, P, C] float16 per sequence
        self.depth: list[np.ndarray] = []
        self.T: list[np.ndarray] = []
        self.K: list[np.ndarray] = []
        self.kind: list[int] = []
        self.refresh()

    def refresh(self) -> int:
        new = 0
        for meta in sorted(self.dir.glob("*.meta.npz")):
            name = meta.name[: -len(".meta.npz")]
            if name in self.loaded or name in self.exclude or meta.name.endswith(".tmp.npz"):
                continue
            if self.max_shards is not None and len(self.loaded) >= self.max_shards:
                break
            feats = np.load(self.dir / f"{name}.feats.npy", mmap_mode="r")
            with np.load(meta) as z:
                d, T, K, k = z["depth"], z["T_wc"], z["K"], z["kind"]
            for i in range(feats.shape[0]):
                self.feats.append(np.ascontiguousarray(feats[i]))
                self.depth.append(d[i])
                self.T.append(T[i])
                self.K.append(K[i])
                self.kind.append(int(k[i]))
            self.loaded.append(name)
            new += 1
        return new

    def __len__(self) -> int:
        return len(self.feats)

    def sample(self, rng: np.random.Generator, batch: int, frames: int, strides: tuple[int, ...],
               reverse_p: float = 0.3) -> dict[str, torch.Tensor]:
        """Clips of ``frames`` frames (one stride per clip) -> feats [B, S, P, C] float32, depth [B, S, H, W] metres,
        rel targets for frame s-1 -> s: rotvec [B, S-1, 3] (rad), trans [B, S-1, 3] / mean depth of frame s-1,
        fov_w [B] (rad)."""
        if not self.feats:
            raise RuntimeError(f"feature cache {self.dir} is empty")
        F, D, Ts, fovs = [], [], [], []
        for _ in range(batch):
            i = int(rng.integers(len(self.feats)))
            L = self.feats[i].shape[0]
            st = int(strides[int(rng.integers(len(strides)))])
            st = max(1, min(st, (L - 1) // max(1, frames - 1)))
            start = int(rng.integers(0, L - (frames - 1) * st))
            idx = start + st * np.arange(frames)
            if rng.random() < reverse_p:
                idx = idx[::-1].copy()
            F.append(self.feats[i][idx])
            D.append(self.depth[i][idx].astype(np.float32))
            Ts.append(self.T[i][idx].astype(np.float64))
            K = self.K[i]
            W = D[-1].shape[-1]
            fovs.append(2 * np.arctan((W / 2) / K[0, 0]))
        feats = torch.from_numpy(np.stack(F)).float()
        depth = torch.from_numpy(np.stack(D))
        T = torch.from_numpy(np.stack(Ts))  # camera-to-world
        rel = torch.linalg.inv(T[:, 1:]) @ T[:, :-1]  # camera s from camera s-1
        from ros2_stream4d.model.small import matrix_to_rotvec

        rot = matrix_to_rotvec(rel[..., :3, :3]).float()
        valid = depth > 1e-3
        mean_prev = (depth[:, :-1] * valid[:, :-1]).flatten(2).sum(-1) / valid[:, :-1].flatten(2).sum(-1).clamp_min(1)
        trans = (rel[..., :3, 3] / mean_prev[..., None].double()).float()
        return {"feats": feats, "depth": depth, "valid": valid, "rot": rot, "trans": trans,
                "fov": torch.tensor(np.array(fovs), dtype=torch.float32)}


def render_pool_source(pool_dir: str | Path, n_sequences: int, n_frames: int, seed0: int = 0, source: str = "own",
                       hw: tuple[int, int] = (168, 224), per_shard: int = 16, log=print) -> None:
    """Render a pool at the small model's input size from this package's training renderer ("own") or from the
    synthetic-worlds module ("sim", through data.sim_sequence); shards in data.render_pool's format, resumable."""
    from .data import render_pool, sim_sequence

    if source == "own":
        render_pool(pool_dir, n_sequences, n_frames, hw, seed0=seed0, per_shard=per_shard, log=log)
        return
    out = Path(pool_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for s0 in range(0, n_sequences, per_shard):
        path = out / f"shard_{seed0 + s0:07d}.npz"
        if path.exists():
            continue
        seqs = []
        for s in range(s0, min(n_sequences, s0 + per_shard)):
            kind = KINDS[s % len(KINDS)]
            for attempt in range(5):  # a sim seed may have no collision-free trajectory: take the next one
                try:
                    seqs.append(sim_sequence(seed0 + s + 100_000 * attempt, kind, n_frames, hw))
                    break
                except RuntimeError:
                    continue
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, rgb=np.stack([q.rgb for q in seqs]), depth=np.stack([q.depth for q in seqs]).astype(np.float16),
                 T_wc=np.stack([q.T_wc for q in seqs]), K=np.stack([q.K for q in seqs]),
                 kind=np.array([KINDS.index(q.kind) for q in seqs], np.int64))
        tmp.rename(path)
        log(f"pool (sim): {path.name} ({min(n_sequences, s0 + per_shard)}/{n_sequences}, {time.time() - t0:.0f} s)")
