"""A FrameProcessor with a small random model and a TF buffer the test fills: the node's per-frame code without
DDS (the fast contract tests)."""

from __future__ import annotations

from ros2_stream4d.loader import ModelOptions, load_pipeline
from ros2_stream4d.mapping.pipeline import PipelineConfig
from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
from ros2_stream4d.ros.config import as_dict, make_config
from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings


class ListLog:
    def __init__(self):
        self.lines: list[str] = []

    def warning(self, msg):
        self.lines.append(msg)

    info = error = warning


def make_processor(num_cameras: int = 1, tf: TfBuffer | None = None, pipeline=None, **overrides):
    """(processor, pipeline, log): random-small model at 56 px, window 4, path with every frame."""
    values = {"model": "random-small", "input_width": 56, "window": 4, "path_publish_rate": 0.0,
              "num_cameras": num_cameras, **overrides}
    cfg = make_config(values)
    log = ListLog()
    if pipeline is None:
        pipeline = load_pipeline(ModelOptions.from_config(cfg), PipelineConfig.from_params(as_dict(cfg)))
    processor = FrameProcessor(cfg, pipeline, tf if tf is not None else TfBuffer(), RateLimitedWarnings(log), log,
                               num_cameras)
    return processor, pipeline, log
