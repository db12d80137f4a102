"""Launch files resolve without the `launch` package: the resolver on a test file, and every launch/*.launch.py."""

from __future__ import annotations

import os
import pathlib
import runpy
import sys

import pytest

from ros2_stream4d.ros.compat import minilaunch
from ros2_stream4d.ros.compat.minilaunch import LaunchResolutionError, resolve_launch

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "test" / "data"
PROJECT_LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
NOT_INSTALLABLE_HERE = {"rviz2"}

pytestmark = pytest.mark.skipif(minilaunch.real_launch_available(),
                                reason="the real launch package is installed: `ros2 launch` checks these files")


@pytest.fixture(autouse=True)
def package_registered(tmp_path_factory, monkeypatch):
    """An ament prefix registering ros2_stream4d (scripts/install_share.py), first on AMENT_PREFIX_PATH."""
    prefix = tmp_path_factory.getbasetemp() / "ament_prefix"
    if not (prefix / "share" / "ros2_stream4d").exists():
        runpy.run_path(str(ROOT / "scripts" / "install_share.py"), run_name="install_share").get("main")(str(prefix))
    monkeypatch.setenv("AMENT_PREFIX_PATH", os.pathsep.join([str(prefix), os.environ.get("AMENT_PREFIX_PATH", "")]))
    yield prefix
    for name in [m for m in sys.modules if m.split(".")[0] in ("launch", "launch_ros")]:
        del sys.modules[name]  # stand-ins are process-global; leave none behind for other tests


def entries_by_name(resolved):
    return {entry.name: entry for entry in resolved.entries}


def test_resolver_turns_the_test_launch_file_into_command_lines(monkeypatch):
    monkeypatch.setenv("S4D_TEST_DEVICE", "cuda:1")
    resolved = resolve_launch(DATA / "minimal.launch.py", {"rate": "3"})
    entries = entries_by_name(resolved)
    assert set(entries) == {"mapper", "list_config", "echo"}  # rviz off by default

    mapper = entries["mapper"].cmd
    assert pathlib.Path(mapper[0]).name == "stream4d" and os.access(mapper[0], os.X_OK)
    assert mapper[1:3] == ["run", "--ros-args"]
    assert "__node:=mapper" in mapper and "__ns:=/robot1/sub" in mapper
    assert mapper[mapper.index("--params-file") + 1] == str(DATA / "params.yaml")
    assert "image:=/camera/image_raw" in mapper
    params = entries["mapper"].parameters
    assert params == {"use_sim_time": False, "window": 8, "model.name": "tiny", "model.device": "cuda:1",
                      "rate_hz": 15}
    # the global SetParameter precedes the node's own values, which come after the params file
    assert mapper.index("use_sim_time:=false") < mapper.index("window:=8")
    assert mapper.index("--params-file") < mapper.index("window:=8")

    share = pathlib.Path(entries["list_config"].cmd[1])
    assert share.parts[-2:] == ("ros2_stream4d", "config") and (share / "fastdds_loopback.xml").exists()
    assert entries["echo"].cmd == ["echo", "hello", "robot1"]
    assert set(resolved.arguments) == {"use_sim_time", "namespace", "image_topic", "rate", "rviz", "greeting"}


def test_conditions_and_arguments_change_the_result():
    resolved = resolve_launch(DATA / "minimal.launch.py", {"use_sim_time": "true", "rviz": "true",
                                                           "namespace": "", "image_topic": "/cam/rgb"},
                              allow_missing=True)
    entries = entries_by_name(resolved)
    assert "list_config" not in entries  # UnlessCondition(use_sim_time)
    assert entries["rviz2"].cmd[0] == "rviz2"
    mapper = entries["mapper"].cmd
    assert "use_sim_time:=true" in mapper and "__ns:=/sub" in mapper and "image:=/cam/rgb" in mapper


@pytest.mark.parametrize("arguments, message", [
    ({"use_sim_time": "maybe"}, r"use_sim_time='maybe' is not one of \['true', 'false'\]"),
    ({"no_such_argument": "1"}, r"unknown launch argument\(s\) \['no_such_argument'\]"),
    ({"rviz": "yes please"}, "is not a boolean"),
])
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(LaunchResolutionError, match=message):
        resolve_launch(DATA / "minimal.launch.py", arguments, allow_missing=True)


def test_missing_executable_and_package_are_named(monkeypatch):
    with pytest.raises(LaunchResolutionError, match="executable 'rviz2' of package 'rviz2' not found"):
        resolve_launch(DATA / "minimal.launch.py", {"rviz": "true"})
    monkeypatch.setenv("AMENT_PREFIX_PATH", "/nonexistent")
    with pytest.raises(LaunchResolutionError, match="package 'ros2_stream4d' not found in the ament index"):
        resolve_launch(DATA / "minimal.launch.py")


def test_dry_run_prints_the_commands(capsys):
    assert minilaunch.main([str(DATA / "minimal.launch.py"), "rate:=1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[node mapper]" in out and "rate_hz:=5" in out and "[process echo] echo hello robot1" in out
    assert minilaunch.main([str(DATA / "minimal.launch.py"), "rate:=1", "use_sim_time:=no", "--dry-run"]) == 1


def required_arguments_filled(path):
    """Resolve with defaults; arguments without one (a bag path ...) get a placeholder."""
    arguments = {}
    for _ in range(20):
        try:
            return resolve_launch(path, arguments, allow_missing=True), arguments
        except LaunchResolutionError as exc:
            text = str(exc)
            if "is required" not in text:
                raise
            arguments[text.split("'")[1]] = str(DATA)
    raise AssertionError(f"{path} keeps asking for arguments: {arguments}")


@pytest.mark.parametrize("path", PROJECT_LAUNCH_FILES, ids=[p.name for p in PROJECT_LAUNCH_FILES])
def test_project_launch_file_resolves(path):
    resolved, _ = required_arguments_filled(path)
    assert resolved.entries, f"{path.name} starts nothing with its default arguments"
    for entry in resolved.entries:
        if entry.kind == "node" and pathlib.Path(entry.cmd[0]).name not in NOT_INSTALLABLE_HERE:
            assert os.path.isabs(entry.cmd[0]) and os.access(entry.cmd[0], os.X_OK), \
                f"executable {entry.cmd[0]!r} is not installed (console_scripts need `pip install -e .`): {entry.shell()}"
        for i, part in enumerate(entry.cmd[:-1]):
            if part == "--params-file":
                assert os.path.isfile(entry.cmd[i + 1]), entry.shell()
