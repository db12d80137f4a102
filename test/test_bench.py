"""Benchmarks (ros2_stream4d.bench): they run on tiny configurations and write well-formed results.

Behaviour only: no test here asserts a time (timings belong to the benchmarks' own output files).
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from ros2_stream4d.bench.roofline import flops_per_frame, roofline_table
from ros2_stream4d.bench.stream_bench import PROBE, SERIES, StreamBenchConfig, markdown_table, run_stream_bench
from ros2_stream4d.model import ModelConfig, StreamVGGT

FRAMES = 10
H, W = 28, 42


@pytest.fixture(scope="module")
def stream_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "stream_tiny.json"
    cfg = StreamBenchConfig(preset="tiny", frames=FRAMES, windows=(2, 3), recompute_windows=(2,), height=H, width=W,
                            neighbourhood=1, warmup_frames=1, distinct_frames=3)
    result = run_stream_bench(cfg, out=out, log=lambda *a: None)
    return out, result


def test_stream_bench_writes_json_with_expected_series(stream_result):
    out, _ = stream_result
    data = json.loads(out.read_text())
    assert data["schema"] == "stream4d.bench.stream/1"
    assert data["frame_index"] == list(range(1, FRAMES + 1))
    names = [m["name"] for m in data["modes"]]
    assert names == ["unlimited", "rolling W=2", "rolling W=3", "recompute W=2", PROBE]
    for m in data["modes"]:
        for key in SERIES:
            assert len(m[key]) == FRAMES, (m["name"], key)
        assert all(isinstance(t, float) and math.isfinite(t) for t in m["time_s"])
        assert all(r > 0 for r in m["rss_bytes"])
        # the summary is computed from the recorded series, not measured again
        s = data["summary"]["modes"][m["name"]]
        assert s["median_time_s"] == statistics.median(m["time_s"]) and s["first_frame_time_s"] == m["time_s"][0]
        assert s["cache_bytes_at_end"] == m["cache_bytes"][-1]
        assert m["peak_rss_bytes"] == sorted(m["peak_rss_bytes"])  # a running peak never decreases
    env = data["environment"]
    for key in ("torch", "torch_threads", "cpu", "device", "load_at_start"):
        assert key in env
    cfg = data["config"]
    assert (cfg["height"], cfg["width"], cfg["preset"]) == (H, W, "tiny")
    assert cfg["tokens_per_frame"] == 5 + (H // 14) * (W // 14)
    assert set(data["summary"]["modes"]) == set(names)
    assert set(data["summary"]["done_when"]) == {"unlimited", "rolling W=2", "rolling W=3"}
    assert "rel_end_over_ref" in data["summary"]["modes"]["rolling W=2"]  # normalised by the load probe
    assert all(c >= 0 for c in data["modes"][0]["cpu_s"])


def test_rolling_cache_bytes_constant_after_window_fills_and_unlimited_grows(stream_result):
    _, result = stream_result
    modes = {m["name"]: m for m in result["modes"]}
    anchors = result["config"]["anchors"]
    for w in (2, 3):
        cache = modes[f"rolling W={w}"]["cache_bytes"]
        full = w + anchors  # first frame with a full window
        assert cache[full - 1] > 0
        assert len(set(cache[full - 1 :])) == 1, cache
        assert result["summary"]["done_when"][f"rolling W={w}"]["cache_bytes_constant_after_ref"]
    probe = modes[PROBE]["cache_bytes"]  # constant work: a fresh 2-frame cache every round
    assert len(set(probe)) == 1
    unlimited = modes["unlimited"]["cache_bytes"]
    assert unlimited[-1] > unlimited[0]
    assert unlimited == sorted(unlimited)
    assert unlimited[-1] > modes["rolling W=3"]["cache_bytes"][-1]
    assert result["summary"]["done_when"]["unlimited"]["cache_bytes_grow"]
    # the recompute baseline keeps no K/V cache, only its last W input frames
    rec = modes["recompute W=2"]
    assert set(rec["cache_bytes"]) == {0}
    frame_bytes = 3 * H * W * 4
    assert rec["state_bytes"] == [frame_bytes] + [2 * frame_bytes] * (FRAMES - 1)


def test_markdown_table_lists_every_mode(stream_result):
    _, result = stream_result
    table = markdown_table(result)
    for m in result["modes"]:
        assert f"| {m['name']} |" in table


def test_recompute_baseline_matches_causal_forward_last_frame():
    torch.manual_seed(0)
    model = StreamVGGT(ModelConfig.small()).eval()
    from ros2_stream4d.bench.stream_bench import Recompute

    frames = torch.rand(4, 1, 3, H, W)
    rec = Recompute(model, window=3)
    for f in frames:
        out = rec.step(f)
    with torch.inference_mode():
        ref = model(frames[1:, 0][None])
    torch.testing.assert_close(out["depth"], ref["depth"][:, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["pose_enc"], ref["pose_enc"][:, -1], rtol=1e-4, atol=1e-5)


def test_cli_stream_writes_json_and_png(tmp_path):
    from ros2_stream4d.cli import main

    rc = main(["bench", "stream", "--config", "tiny", "--frames", "3", "--windows", "1", "--recompute-windows",
               "--height", "28", "--width", "28", "--neighbourhood", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "stream_tiny.json").read_text())
    assert [m["name"] for m in data["modes"]] == ["unlimited", "rolling W=1", PROBE]
    assert "CPU run" in data["gpu_fps"]["skipped"]
    assert (tmp_path / "stream_tiny.png").stat().st_size > 1000


def test_roofline_global_attention_grows_linearly_with_window():
    cfg = ModelConfig(track_head=False)
    held = [2, 3, 5, 9, 17, 33]
    rows = [flops_per_frame(cfg, 392, 518, k) for k in held]
    P = 5 + 28 * 37
    per_frame = cfg.depth * 4 * P * P * cfg.embed_dim
    for k, r in zip(held, rows):
        assert r["global_attention"] == pytest.approx(per_frame * k, rel=1e-12)
        for term in ("patch_embed", "frame_attention", "frame_mlp_linear", "global_mlp_linear", "depth_head",
                     "point_head"):
            assert r[term] == rows[0][term]  # no other aggregator / dense-head term depends on W
    table = roofline_table(windows=(1, 16))
    r1, r16 = table["by_window"]
    assert r16["flops"]["global_attention"] - r1["flops"]["global_attention"] == pytest.approx(15 * per_frame)
    assert r16["bytes"]["kv_cache_read_bytes"] > r1["bytes"]["kv_cache_read_bytes"]
    assert r16["fps_compute_bound"] < r1["fps_compute_bound"]
    assert table["kv_cache_bytes_per_frame_bf16"] == 2 * 24 * P * 1024 * 2  # ~98 MiB (REFERENCE_FACTS)


def test_roofline_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig.small(camera_trunk_depth=1)
    torch.manual_seed(0)
    model = StreamVGGT(cfg).eval().set_attention_backend("eager").requires_grad_(False)
    session = model.stream(window=2, anchors=1)
    x = torch.rand(1, 3, H, W)
    for _ in range(4):
        session.step(x)
    with FlopCounterMode(display=False) as counter:
        session.step(x)
    assert flops_per_frame(cfg, H, W, frames_held=3)["total"] == counter.get_total_flops()


def test_gpu_fps_says_cpu_run_and_runs_with_allow_cpu():
    from ros2_stream4d.bench.gpu_bench import run_gpu_fps

    if not torch.cuda.is_available():
        assert "CPU run" in run_gpu_fps(device="cpu")["skipped"]
    res = run_gpu_fps(device="cpu", preset="tiny", hw=(H, W), window=2, frames=2, backends=("sdpa", "flash"),
                      allow_cpu=True)
    sdpa = res["results"]["sdpa"]
    assert sdpa["frames"] == 2 and {"fps", "median_ms", "p90_ms", "cache_bytes"} <= set(sdpa)
    assert res["config"]["window"] == 2 and res["config"]["anchors"] == 1
    # the cache it reports is the full rolling cache of that window: the same model stepped past window + anchors
    from ros2_stream4d.bench.env import preset_config

    session = StreamVGGT(preset_config("tiny")).eval().stream(window=2, anchors=1)
    for _ in range(4):
        session.step(torch.rand(1, 3, H, W))
    assert sdpa["cache_bytes"] == session.cache.storage_nbytes()
    assert "skipped" in res["results"]["flash"]


def test_stage_bench_times_every_stage(tmp_path):
    pytest.importorskip("rclpy")
    from ros2_stream4d.bench.stage_bench import STAGES, StageBenchConfig, markdown_table, run_stage_bench

    cfg = StageBenchConfig(configs=("tiny",), frames=1, warmup=0, input_hw=(60, 80), model_width=70, window=2,
                           cloud_points=1000)
    res = run_stage_bench(cfg, out=tmp_path / "stages.json", log=lambda *a: None)
    data = json.loads((tmp_path / "stages.json").read_text())
    c = data["configs"][0]
    for s in ("decode", "preprocess", "frame_blocks", "global_blocks", "camera_head", "depth_head", "point_head",
              "postprocess", "cloud", "map_fusion", "messages_build", "serialize"):
        assert s in STAGES and s in c["median_ms"], s
        # the medians are those of the per-frame records written beside them
        assert c["median_ms"][s] == pytest.approx(1e3 * statistics.median(r[s] for r in c["per_frame_s"])), s
    assert c["frames_timed"] == len(c["per_frame_s"]) == 1
    assert c["frame_total_ms"] == c["median_ms"]["frame_total"]
    assert c["stage_order"][0] == "decode" and set(c["stage_order"]) <= set(STAGES)
    assert c["model_hw"] == [56, 70]
    assert c["message_bytes"]["cloud"] > 0 and c["message_bytes"]["cloud_points"] > 0
    assert data["cloud_check"]["points"] == 1000 and data["cloud_check"]["bytes"] == 1000 * 20
    assert "frame total" in markdown_table(res)


def test_map_depth_noise_study_runs_and_its_surface_filter_leaves_points_out(tmp_path, monkeypatch):
    """benchmarks/map_depth_noise.py (the study behind the map's confidence cut and surface filter) on a short office
    bag: it writes one row per (cut, filter), and the filter leaves points out (it rotted once, unnoticed, when a
    method it called was removed)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("open3d")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "map_depth_noise.py"
    spec = importlib.util.spec_from_file_location("map_depth_noise", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "study.json"
    assert mod.main(["--frames", "30", "--percentiles", "50", "--surface-voxels", "0", "1", "--pulls", "0", "1",
                     "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["conf_percentile"], r["cloud_surface_voxels"], r["cloud_surface_pull"]) for r in rows] == [
        (50.0, 0.0, 0.0), (50.0, 1.0, 0.0), (50.0, 1.0, 1.0)]
    assert rows[1]["cloud_points"] < rows[0]["cloud_points"]
    assert rows[2]["cloud_points"] == rows[1]["cloud_points"]  # the pull moves points, it leaves none out
    assert all(0.0 < r["cloud_fscore"] <= 1.0 and 0.0 < r["mesh_fscore"] <= 1.0 for r in rows)
