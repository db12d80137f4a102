"""The node's configuration: one typed, validated object built from the parameter table (params.py).

``Config`` is generated from ``PARAMS`` (one field per parameter, typed by its default), so params.py stays the
single source. ``make_config(values)`` checks every value (type, choices, range) and the rules between parameters
once, and raises one ``ParameterError`` naming each problem. ``check_change(config, changes)`` is what the node's
on-set callback runs: read-only parameters are refused, live ones are validated against the whole new
configuration before anything changes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ros2_stream4d.ros.params import BY_NAME, PARAMS

# ROS-wide parameters every node has; accepted in files and overrides, not part of Config
ROS_PARAMETERS = ("use_sim_time",)
MAP_FORMATS = (".ply", ".pcd")


class ParameterError(ValueError):
    """Bad parameter values; ``problems`` maps each parameter name to the reason."""

    def __init__(self, problems: dict[str, str]):
        self.problems = dict(problems)
        super().__init__("; ".join(f"{name}: {why}" for name, why in self.problems.items()))


def _field_type(default: Any) -> type:
    if isinstance(default, list | tuple):
        return tuple  # ROS list parameters, held immutable
    return type(default) if not isinstance(default, bool) else bool


def _field_default(default: Any) -> Any:
    return tuple(default) if isinstance(default, list) else default


Config = dataclasses.make_dataclass(
    "Config", [(p.name, _field_type(p.default), dataclasses.field(default=_field_default(p.default)))
               for p in PARAMS],
    frozen=True)
Config.__module__ = __name__
Config.__doc__ = "Every stream4d_node parameter, typed and validated (built by make_config)."


def _coerce(name: str, value: Any) -> Any:
    """The value as the parameter's type (ints accepted for floats, as YAML writes 1 for 1.0)."""
    p = BY_NAME[name]
    want = _field_type(p.default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                          for v in value):
            raise TypeError(f"expected a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if want is bool and not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"expected an integer, got {value!r}")
    if want is float and not isinstance(value, float):
        raise TypeError(f"expected a number, got {value!r}")
    if want is str and not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _check_value(name: str, value: Any) -> str | None:
    p = BY_NAME[name]
    if p.choices and value not in p.choices:
        return f"{value!r} is not one of {', '.join(p.choices)}"
    if p.low is not None and value < p.low:
        return f"{value} is below the minimum {p.low}"
    if p.high is not None and value > p.high:
        return f"{value} is above the maximum {p.high}"
    return None


def _check_rules(c: Any) -> dict[str, str]:
    """Rules between parameters (and a few that need more than a range)."""
    problems: dict[str, str] = {}
    if c.input_width % 14:
        problems["input_width"] = f"{c.input_width} is not a multiple of 14 (the model's patch size)"
    if c.min_image_side > c.max_image_side:
        problems["min_image_side"] = f"{c.min_image_side} is above max_image_side {c.max_image_side}"
    if c.model == "oracle" and not c.oracle_bag:
        problems["oracle_bag"] = "model 'oracle' needs oracle_bag (a sim bag with /ground_truth topics)"
    if not c.model:
        problems["model"] = "empty: give a model card name, a checkpoint path, 'random-small' or 'oracle'"
    if c.tf_mode in ("odom_to_base", "map_to_odom") and not c.base_frame:
        problems["tf_mode"] = f"{c.tf_mode} needs base_frame (the robot's base, e.g. base_link)"
    if c.scale_source == "odometry" and not c.base_frame:
        problems["scale_source"] = "odometry needs base_frame (the scale comes from odom -> base_frame)"
    for name in ("map_frame", "odom_frame"):
        if not getattr(c, name):
            problems[name] = "must not be empty"
    frames = [f for f in (c.map_frame, c.odom_frame, c.base_frame) if f]
    if len(set(frames)) != len(frames):
        problems["base_frame"] = f"map_frame, odom_frame and base_frame must differ (got {frames})"
    if c.camera_frame and c.camera_frame in frames:
        problems["camera_frame"] = f"{c.camera_frame!r} is also the map, odom or base frame"
    if c.map_save_path:
        path = os.path.expanduser(c.map_save_path)
        is_file_format = os.path.splitext(path)[1].lower() in MAP_FORMATS
        if is_file_format and os.path.isdir(path):
            problems["map_save_path"] = f"{c.map_save_path!r} is a directory, not a {MAP_FORMATS} file"
        elif not is_file_format and os.path.isfile(path):
            problems["map_save_path"] = (f"{c.map_save_path!r} is a file: give a .ply/.pcd path (cloud) or a "
                                         "directory path (the whole map)")
    if c.viewer == "rerun" and c.viewer_mode == "save" and not c.viewer_path:
        problems["viewer_path"] = "viewer_mode save needs viewer_path (the .rrd to write)"
    if len(c.map_start_pose) != 4:
        problems["map_start_pose"] = f"needs 4 numbers (x, y, z, yaw), got {list(c.map_start_pose)}"
    if c.occupancy_min_height >= c.occupancy_max_height:
        problems["occupancy_min_height"] = (f"{c.occupancy_min_height} is not below occupancy_max_height "
                                            f"{c.occupancy_max_height}")
    if c.device not in ("auto", "cpu", "cuda") and not (c.device.startswith("cuda:") and c.device[5:].isdigit()):
        problems["device"] = f"{c.device!r} is not auto, cpu, cuda or cuda:N"
    if not (c.segment_overlap_frames < c.segment_min_frames <= c.segment_max_frames):
        problems["segment_overlap_frames"] = (
            f"need segment_overlap_frames < segment_min_frames <= segment_max_frames (got {c.segment_overlap_frames}, "
            f"{c.segment_min_frames}, {c.segment_max_frames})")
    if c.oracle_noise not in ("none", "realistic") and not os.path.isfile(os.path.expanduser(c.oracle_noise)):
        problems["oracle_noise"] = f"{c.oracle_noise!r} is not none, realistic or an existing YAML file of magnitudes"
    if c.backend and c.tf_mode == "odom_to_base":
        problems["backend"] = "the back-end corrects map -> odom: tf_mode odom_to_base publishes no map -> odom"
    if c.num_cameras > 1 and c.process_every_frame is False and c.sync_slop <= 0:
        problems["sync_slop"] = "several cameras need a positive sync_slop to group frames"
    return problems


def make_config(values: dict[str, Any] | None = None) -> Any:
    """A validated Config from parameter values (missing ones take their defaults). Unknown names, wrong types,
    values outside their choices or range, and broken rules between parameters raise one ParameterError."""
    values = {k: v for k, v in (values or {}).items() if k not in ROS_PARAMETERS}
    problems: dict[str, str] = {}
    typed: dict[str, Any] = {}
    for name, value in values.items():
        if name not in BY_NAME:
            problems[name] = "unknown parameter"
            continue
        try:
            typed[name] = _coerce(name, value)
        except TypeError as exc:
            problems[name] = str(exc)
            continue
        why = _check_value(name, typed[name])
        if why:
            problems[name] = why
    if problems:
        raise ParameterError(problems)
    config = Config(**typed)
    problems = _check_rules(config)
    if problems:
        raise ParameterError(problems)
    return config


def check_change(config: Any, changes: dict[str, Any]) -> Any:
    """The configuration after `changes` (name -> value), or ParameterError: a read-only parameter, or a value
    that fails make_config's checks together with the others."""
    refused = {name: "read-only: it takes effect only at start-up (restart the node, or cleanup + configure)"
               for name in changes if name in BY_NAME and not BY_NAME[name].live}
    if refused:
        raise ParameterError(refused)
    return make_config({**dataclasses.asdict(config), **changes})


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
