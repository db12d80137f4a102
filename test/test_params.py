"""config/stream4d.yaml and ros2_stream4d/ros/params.py describe the same parameters, every one documented."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from ros2_stream4d.ros.params import PARAMS, render_yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "stream4d.yaml"


def test_config_file_is_the_rendered_parameter_list():
    assert CONFIG.read_text() == render_yaml(), (
        "config/stream4d.yaml is out of date: python -m ros2_stream4d.ros.params > config/stream4d.yaml")


def test_config_values_are_the_defaults():
    loaded = yaml.safe_load(CONFIG.read_text())["/**/stream4d"]["ros__parameters"]
    assert list(loaded) == [p.name for p in PARAMS]
    for p in PARAMS:
        assert loaded[p.name] == p.default, p.name
        assert type(loaded[p.name]) is type(p.default), f"{p.name}: YAML type differs (ROS would refuse it)"


def test_every_parameter_is_documented_and_consistent():
    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names))
    for p in PARAMS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", p.name), p.name
        assert len(p.help) > 15, f"{p.name} needs a real description"
        if p.choices:
            assert p.default in p.choices, f"{p.name}: default {p.default!r} not in {p.choices}"
        if isinstance(p.default, list):
            assert p.default and all(isinstance(v, type(p.default[0])) for v in p.default), p.name
    text = CONFIG.read_text()
    for p in PARAMS:  # the comment above each entry carries the help and the unit
        block = text.split(f"\n    {p.name}: ", 1)[0].rsplit("\n", 1)[-1]
        assert p.help in block and (not p.unit or f"[{p.unit}]" in block), p.name


def test_config_refuses_bad_values_and_broken_rules_with_every_reason():
    from ros2_stream4d.ros.config import ParameterError, check_change, make_config

    with pytest.raises(ParameterError) as err:
        make_config({"window": -1, "cloud_frame": "world", "input_width": 100, "nope": 1, "publish_map": "yes"})
    assert set(err.value.problems) == {"window", "cloud_frame", "nope", "publish_map"}
    with pytest.raises(ParameterError) as err:  # rules between parameters come after the values are valid
        make_config({"input_width": 100, "tf_mode": "map_to_odom", "scale_source": "odometry"})
    assert set(err.value.problems) == {"input_width", "tf_mode", "scale_source"}
    assert "base_frame" in err.value.problems["tf_mode"]
    cfg = make_config({"conf_percentile": 10})
    assert cfg.conf_percentile == 10.0 and isinstance(cfg.conf_percentile, float)
    assert check_change(cfg, {"conf_percentile": 30.0}).conf_percentile == 30.0
    with pytest.raises(ParameterError, match="read-only"):
        check_change(cfg, {"model": "random-small"})
    with pytest.raises(ParameterError, match="above the maximum"):
        check_change(cfg, {"conf_percentile": 150.0})


def test_live_and_read_only_split_matches_what_the_node_can_apply():
    live = {p.name for p in PARAMS if p.live}
    assert {"model", "device", "window", "num_cameras", "image_transport", "base_frame", "scale_source"}.isdisjoint(live)
    assert {"conf_threshold", "conf_percentile", "gate_threshold", "publish_cloud", "path_max_length",
            "map_publish_rate", "sync_slop"} <= live


@pytest.mark.ros
def test_node_declares_exactly_these_parameters_with_descriptors():
    import rclpy
    from rclpy.parameter import Parameter

    from ros2_stream4d.ros.node import Stream4DNode

    context = rclpy.Context()
    rclpy.init(context=context)
    node = Stream4DNode(context=context, parameter_overrides=[Parameter("autostart", value=False)])
    try:
        declared = set(node._parameters) - {"use_sim_time", "start_type_description_service"}  # rclpy's own
        assert declared == {p.name for p in PARAMS}
        for p in PARAMS:
            d = node.describe_parameter(p.name)
            assert d.read_only == (not p.live), p.name
            assert p.help in d.description and (not p.unit or f"[{p.unit}]" in d.description), p.name
    finally:
        node.destroy_node()
        context.try_shutdown()
