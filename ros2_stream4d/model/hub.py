"""Finding official checkpoints: a local file, the Hugging Face cache, or (only when allowed) a download.

Known checkpoints (repo id, file name):
    streamvggt: lch01/StreamVGGT, checkpoints.pth
    vggt-1b:    facebook/VGGT-1B, model.pt
    stream3r:   yslan/STream3R, model.safetensors
"""

from __future__ import annotations

import os
from pathlib import Path

KNOWN_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "streamvggt": ("lch01/StreamVGGT", "checkpoints.pth"),
    "vggt-1b": ("facebook/VGGT-1B", "model.pt"),
    "stream3r": ("yslan/STream3R", "model.safetensors"),
}


class CheckpointNotAvailable(FileNotFoundError):
    """The checkpoint is neither local nor cached, and downloading was not allowed."""


def resolve_checkpoint(
    name_or_path: str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> Path:
    """Return a local path for a checkpoint.

    name_or_path: an existing file, or a known name ("streamvggt", "vggt-1b", "stream3r"), or None with repo_id and
    filename. A file already in the Hugging Face cache is used without network access; a download happens only when
    allow_download=True.
    """
    if name_or_path is not None:
        p = Path(name_or_path).expanduser()
        if p.is_file():
            return p
        key = str(name_or_path).lower()
        if key in KNOWN_CHECKPOINTS:
            repo_id, default_file = KNOWN_CHECKPOINTS[key]
            filename = filename or default_file
        elif repo_id is None:
            raise CheckpointNotAvailable(
                f"checkpoint {str(name_or_path)!r} is not a file and not a known name ({', '.join(KNOWN_CHECKPOINTS)})"
            )
    if not repo_id or not filename:
        raise ValueError("give a file path, a known checkpoint name, or repo_id and filename")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover
        raise CheckpointNotAvailable(_how_to_place(repo_id, filename) + " (huggingface_hub is not installed)") from e
    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)
        )
    except Exception as cached_miss:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        if not allow_download:
            raise CheckpointNotAvailable(_how_to_place(repo_id, filename)) from cached_miss
    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))


def _how_to_place(repo_id: str, filename: str) -> str:
    return (
        f"checkpoint {repo_id}/{filename} is not available locally and downloading is disabled. Either pass "
        f"allow_download=True (or the CLI's download option) to fetch it from the Hugging Face hub, or download it "
        f"yourself (https://huggingface.co/{repo_id}/resolve/main/{filename}) and pass the file path, or put it in "
        f"the Hugging Face cache with `huggingface-cli download {repo_id} {filename}`."
    )


def load_pretrained(
    name_or_path: str | os.PathLike = "streamvggt",
    *,
    allow_download: bool = False,
    device: str = "cpu",
    **load_kwargs,
):
    """Resolve and load an official checkpoint into a new StreamVGGT: returns (model, LoadReport)."""
    from .checkpoint import load_checkpoint

    path = resolve_checkpoint(name_or_path, allow_download=allow_download)
    return load_checkpoint(path, device=device, **load_kwargs)
