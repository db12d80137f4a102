"""Soak: thousands of frames through the node's per-frame code (scripts/soak.py) with a rolling window.

Resident memory and per-frame time must stay flat (time is printed, never asserted), the map bounded, threads and
open file descriptors constant. The full runs are marked slow; the documented commands:
    python scripts/soak.py --route inprocess --frames 5000 --input-width 56 --window 8 --torch-threads 1 \
        --set path_publish_rate=1.0
    python scripts/soak.py --route dds --frames 500 --input-width 56 --window 8 --torch-threads 1
    python scripts/soak.py --model oracle --frames 5000 --image-width 160 --image-height 120 --input-width 112 \
        --torch-threads 1 --name _products        # every map product on (issue 12)
Figures and findings: docs/soak/README.md.
A short in-process run is part of the default suite.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _soak_module():
    spec = importlib.util.spec_from_file_location("stream4d_soak", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *args, name: str = "") -> dict:
    import torch

    soak = _soak_module()
    threads = torch.get_num_threads()
    try:
        assert soak.main([*args, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --torch-threads is process-wide: leave the other tests theirs
    route = args[args.index("--route") + 1] if "--route" in args else "inprocess"
    result = json.loads((tmp_path / f"soak_{route}{name}.json").read_text())
    assert (tmp_path / f"soak_{route}{name}.png").stat().st_size > 0
    s = result["summary"]
    print(json.dumps(s))
    return result


def _check_flat(result: dict, rss_growth_mib: float) -> None:
    s, samples = result["summary"], result["samples"]
    assert s["rss_growth_mib"] < rss_growth_mib, s
    assert s["threads"][0] == s["threads"][1], s
    assert s["fds"][0] == s["fds"][1], s
    bound = result["config"]["map_max_points"]
    assert all(v["map_points"] is None or v["map_points"] <= bound for v in samples)


def test_short_soak_is_bounded(tmp_path):
    result = _run(tmp_path, "--route", "inprocess", "--frames", "150", "--sample-every", "25",
                  "--map-max-points", "5000", "--torch-threads", "1")
    assert result["frames_processed"] == 150 and not result["warnings"]
    assert max(v["map_points"] for v in result["samples"]) == 5000, "the map fills up to its bound and stays there"
    _check_flat(result, rss_growth_mib=40.0)


@pytest.mark.slow
def test_soak_5000_frames_in_process(tmp_path):
    result = _run(tmp_path, "--route", "inprocess", "--frames", "5000", "--input-width", "56", "--window", "8",
                  "--torch-threads", "1", "--set", "path_publish_rate=1.0")
    assert result["frames_processed"] == 5000 and not result["warnings"] and result["resets"] == 0
    _check_flat(result, rss_growth_mib=25.0)
    assert max(v["cache_frames"] for v in result["samples"]) == 9  # anchor + window 8: the cache is bounded


@pytest.mark.slow
@pytest.mark.ros
def test_soak_500_frames_through_the_node_over_dds(tmp_path):
    result = _run(tmp_path, "--route", "dds", "--frames", "500", "--input-width", "56", "--window", "8",
                  "--torch-threads", "1")
    assert result["node_alive_at_end"] and result["node_exit_code"] == 0
    _check_flat(result, rss_growth_mib=25.0)


@pytest.mark.slow
def test_soak_600_frames_every_map_product(tmp_path):
    """The oracle on a ground robot driving loops in the sim room: the keyframe map grows and spills, the TSDF, the
    grid, ~/map, ~/mesh and ~/occupancy are built and serialised at their rates. After the first lap (the first
    quarter) memory is flat, the keyframes in memory stay at their bound and the TSDF stops growing (the robot
    revisits the same place). No timing assertions. The 5000-frame run: docs/soak/README.md."""
    frames, in_memory = 600, 20
    result = _run(tmp_path, "--model", "oracle", "--frames", str(frames), "--bag", str(tmp_path / "bag"),
                  "--image-width", "160", "--image-height", "120", "--input-width", "112", "--torch-threads", "1",
                  "--set", f"map_max_keyframes_in_memory={in_memory}", "--name", "_products", name="_products")
    s, samples = result["summary"], result["samples"]
    assert result["frames_processed"] == frames and not result["warnings"] and result["resets"] == 0
    assert all(result["timer_builds"][k] > 0 for k in ("map", "path", "mesh", "occupancy")), result["timer_builds"]
    assert s["rss_growth_q2_to_q4_mib"] < 40.0, s
    assert s["threads"][0] == s["threads"][1] and s["fds"][0] == s["fds"][1], s
    assert s["max_keyframes_in_memory"] <= in_memory, s
    kf_half, kf_end = s["keyframes_half_end"]
    assert kf_end > kf_half > in_memory and s["keyframes_spilled_half_end"][1] == kf_end - in_memory, s
    assert s["spill_mib_on_disk_half_end"][1] > 0, s
    blocks_half, blocks_end = s["tsdf_blocks_half_end"]
    assert blocks_end <= 1.05 * blocks_half, s  # the loop revisits the room: no new blocks after the first lap
    cells_half, cells_end = s["grid_cells_half_end"]
    assert cells_end <= 1.05 * cells_half, s
    assert all(v["map_points"] <= result["node_params"]["map_max_points"] for v in samples)
