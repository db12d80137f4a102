"""Soak: thousands of frames through the node's per-frame code (scripts/soak.py) with a rolling window.

Resident memory and per-frame time must stay flat (time is printed, never asserted), the map bounded, threads and
open file descriptors constant. The full runs are marked slow; the documented commands:
    python scripts/soak.py --route inprocess --frames 5000 --input-width 56 --window 8 --torch-threads 1 \
        --set path_publish_rate=1.0
    python scripts/soak.py --route dds --frames 500 --input-width 56 --window 8 --torch-threads 1
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


def _run(tmp_path, *args) -> dict:
    import torch

    soak = _soak_module()
    threads = torch.get_num_threads()
    try:
        assert soak.main([*args, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --torch-threads is process-wide: leave the other tests theirs
    route = args[args.index("--route") + 1]
    result = json.loads((tmp_path / f"soak_{route}.json").read_text())
    assert (tmp_path / f"soak_{route}.png").stat().st_size > 0
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
