"""The node's per-frame code without DDS: several cameras in one stream, and the near-duplicate gate."""

import numpy as np
import pytest

pytest.importorskip("rclpy")

from processor_helpers import make_processor as _processor  # noqa: E402


def _image(seed, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_simultaneous_cameras_each_get_their_own_outputs_in_one_stream():
    processor, pipeline, log = _processor(num_cameras=2)
    stamp = 1_000_000_000
    for k in range(3):
        for cam, frame in ((0, "front_optical"), (1, "rear_optical")):
            out = dict(processor.process(cam, stamp + k * 100_000_000, frame, _image(10 * k + cam)).messages)
            assert out["camera_pose"].header.frame_id == "map"
            assert out["depth_relative"].header.frame_id == frame
            (tf,) = out["tf"].transforms
            assert (tf.header.frame_id, tf.child_frame_id) == ("map", frame)
    assert processor.frames_done == 6
    assert pipeline.reconstructor.session.stats().frames_seen == 6  # one stream: both cameras share the cache
    assert not any("duplicate" in line for line in log.lines)


def test_gate_skips_a_still_camera_and_republishes_the_last_pose():
    processor, _, _ = _processor(gate_threshold=2.0, gate_max_skip=5)
    still = _image(1)
    first = dict(processor.process(0, 1_000_000_000, "cam", still).messages)
    skipped = dict(processor.process(0, 1_100_000_000, "cam", still.copy()).messages)
    assert processor.frames_gated == 1 and processor.frames_done == 1
    assert set(skipped) == {"camera_pose", "odometry", "tf"}, "a skipped frame republishes only the pose"
    assert skipped["camera_pose"].header.stamp.nanosec == 100_000_000
    assert skipped["camera_pose"].pose == first["camera_pose"].pose
    moved = dict(processor.process(0, 1_200_000_000, "cam", _image(2)).messages)
    assert "depth_relative" in moved and processor.frames_done == 2
