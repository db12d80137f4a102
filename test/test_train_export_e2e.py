"""`stream4d train` end to end on a tiny configuration (issue 17, item 2): render a pool, train two steps, export
the checkpoint as weights + model card, and load the card through the node's loader and stream a frame."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_train_then_export_then_the_loader_streams_a_frame(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import yaml
    from safetensors.torch import load_file

    from ros2_stream4d.cli import main
    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.pipeline import PipelineConfig, Processed

    monkeypatch.chdir(tmp_path)
    run, pool, out = tmp_path / "run", tmp_path / "pool", tmp_path / "out" / "tiny_e2e"
    # the trainer waits for a pool of at least 8 sequences; 8 frames each at the tiny model's 56 x 70
    assert main(["train", "--run", str(run), "--pool", str(pool), "--pool-only", "--pool-size", "8",
                 "--pool-frames", "8"]) == 0
    assert main(["train", "--run", str(run), "--pool", str(pool), "--steps", "2", "--batch", "1", "--warmup", "1",
                 "--overfit-steps", "0", "--threads", "1", "--no-progress"]) == 0
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert int(checkpoint["step"]) == 2
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)

    assert main(["train", "--run", str(run), "--export", str(out)]) == 0
    card = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert card["name"] == "tiny_e2e" and card["weights"] == "tiny_e2e.safetensors"
    assert card["source"]["steps"] == 2 and card["config"]["img_size"] == 70
    # the exported weights are the trained checkpoint's (not a fresh initialisation)
    weights = load_file(str(out.with_suffix(".safetensors")))
    assert weights and all(torch.equal(v, checkpoint["model." + k]) for k, v in weights.items())

    pipeline = load_pipeline(ModelOptions(model=str(out.with_suffix(".yaml")), device="cpu", window=4),
                             PipelineConfig(input_width=70))
    try:
        rgb = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
        outcome = pipeline.process(rgb, 1_000_000_000)
        assert isinstance(outcome, Processed)
        r = outcome.result
        assert r.depth.ndim == 2 and np.isfinite(r.depth).mean() > 0.5
        assert np.isfinite(r.T_map_cam).all() and r.stamp_ns == 1_000_000_000
        assert len(r.cloud_xyz) > 0
    finally:
        pipeline.close()
