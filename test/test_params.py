"""config/stream4d.yaml and ros2_stream4d/ros/params.py describe the same parameters, every one documented."""

from __future__ import annotations

import pathlib
import re

import yaml

from ros2_stream4d.ros.params import PARAMS, render_yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "stream4d.yaml"


def test_config_file_is_the_rendered_parameter_list():
    assert CONFIG.read_text() == render_yaml(), (
        "config/stream4d.yaml is out of date: python -m ros2_stream4d.ros.params > config/stream4d.yaml")


def test_config_values_are_the_defaults():
    loaded = yaml.safe_load(CONFIG.read_text())["stream4d"]["ros__parameters"]
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


def test_node_declares_exactly_these_parameters():
    source = (ROOT / "ros2_stream4d" / "ros" / "node.py").read_text()
    assert "for p in PARAMS:\n            self.declare_parameter(p.name, p.default)" in source
    assert "declare_parameter(\"" not in source and "declare_parameter('" not in source
