"""Model construction for the node and every offline tool: one place below ros/.

``load_pipeline(options, pipeline_config)`` resolves the device and dtype, builds the model's streaming session
(a model card, a checkpoint path, 'random-small', or the oracle replaying a sim bag) and returns the mapping
pipeline around it. Errors say what is wrong with the model specification; nothing here imports ROS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig


@dataclass(frozen=True)
class ModelOptions:
    model: str = "streamvggt"
    oracle_bag: str = ""
    oracle_noise: str = "none"  # none | realistic | a YAML file of magnitudes (sim/oracle_noise.py)
    oracle_seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "sdpa"
    window: int = 16  # 0 = unlimited
    anchors: int = 1
    allow_download: bool = False
    torch_threads: int = 0  # 0 = torch's default

    @classmethod
    def from_config(cls, cfg) -> ModelOptions:
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(opts: ModelOptions, pipeline_config: PipelineConfig) -> MappingPipeline:
    """The mapping pipeline around the model `opts` asks for (the model is loaded here, before any input)."""
    import dataclasses

    device = resolve_device(opts.device)
    if opts.torch_threads > 0:
        import torch

        torch.set_num_threads(opts.torch_threads)
    if opts.model == "oracle":
        from ros2_stream4d.sim.oracle import OracleSession

        if not opts.oracle_bag:
            raise ValueError("model 'oracle' needs the oracle_bag parameter (a sim bag with /ground_truth topics)")
        if not os.path.exists(os.path.expanduser(opts.oracle_bag)):
            raise FileNotFoundError(f"oracle_bag {opts.oracle_bag!r} does not exist")
        session, describe = OracleSession.from_bag(opts.oracle_bag), f"oracle ({opts.oracle_bag})"
        if opts.oracle_noise != "none":  # the exact oracle made to err like a streaming model (sim/oracle_noise.py)
            from ros2_stream4d.sim.oracle_noise import noisy_session

            session, noise = noisy_session(session, opts.oracle_noise, opts.oracle_seed)
            describe = f"oracle ({opts.oracle_bag}), {noise}"
    else:
        from ros2_stream4d.mapping.reconstructor import build_session
        from ros2_stream4d.model.checkpoint import CheckpointError

        dtype = opts.dtype if opts.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        try:
            # bfloat16 runs as fp32 weights under CUDA autocast (the session does it); heads stay fp32
            session = build_session(opts.model, device=device, dtype="float32" if dtype == "bfloat16" else dtype,
                                    window=opts.window or None, anchors=opts.anchors, backend=opts.attention_backend,
                                    allow_download=opts.allow_download)
        except CheckpointError as exc:
            raise explain_checkpoint_error(opts.model, exc) from exc
        describe = (f"{opts.model} on {device} ({dtype}), window {opts.window or 'unlimited'}, "
                    f"anchors {opts.anchors}, attention {opts.attention_backend}")
    return MappingPipeline(dataclasses.replace(pipeline_config, device=device), session, describe=describe)


def explain_checkpoint_error(spec: str, exc: Exception) -> Exception:
    """A checkpoint file that exists but cannot be read: say so, with its size (the reader's own message can be
    as terse as "[Errno 22] Invalid argument" for a truncated zip)."""
    path = os.path.expanduser(str(spec))
    if not os.path.isfile(path):
        return exc
    return type(exc)(f"{exc} -- {path} ({os.path.getsize(path)} bytes) is truncated, corrupt or not a checkpoint "
                     "(.safetensors, or a torch state dict readable with weights_only=True)")
