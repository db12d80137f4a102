"""The package layout a ROS 2 user relies on: importable without ROS, ament metadata complete, layers clean."""

import ast
import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINE_LAYERS = ("model", "mapping", "sim", "eval")
ROS_MODULES = {"rclpy", "sensor_msgs", "geometry_msgs", "nav_msgs", "std_msgs", "std_srvs", "tf2_msgs", "tf2_ros",
               "diagnostic_msgs", "rosgraph_msgs", "builtin_interfaces", "launch", "launch_ros"}


def test_import_does_not_pull_in_ros():
    code = ("import sys, ros2_stream4d, ros2_stream4d.model, ros2_stream4d.mapping; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r); print(bad); sys.exit(1 if bad else 0)"
            % (sorted(ROS_MODULES),))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_layers_never_import_ros():
    offenders = []
    for layer in ENGINE_LAYERS:
        for path in (ROOT / "ros2_stream4d" / layer).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
                    names = [("ros2_stream4d.ros" if node.module.split(".")[0] == "ros" and node.level == 2 else "")]
                for name in names:
                    top = name.split(".")[0]
                    if top in ROS_MODULES or name.startswith("ros2_stream4d.ros"):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_package_xml_declares_ros_dependencies():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "ros2_stream4d"
    assert root.find("export/build_type").text == "ament_python"
    declared = {e.text for e in root if e.tag in ("depend", "exec_depend")}
    for dep in ("rclpy", "sensor_msgs", "geometry_msgs", "nav_msgs", "std_msgs", "std_srvs", "tf2_msgs", "tf2_ros",
                "diagnostic_msgs", "launch_ros", "python3-numpy", "python3-opencv"):
        assert dep in declared, f"package.xml lacks exec_depend {dep}"


def test_rviz2_is_not_a_dependency():
    # rosdep installs every depend/exec_depend: rviz2 would pull Qt and OpenGL onto headless robots
    root = ET.parse(ROOT / "package.xml").getroot()
    runtime = {e.text for e in root if e.tag in ("depend", "exec_depend", "build_export_depend", "buildtool_export_depend")}
    assert "rviz2" not in runtime


def _requirement_names(path, prefix):
    """Package names in a requirements file, with the distribution prefix (ros-, ros-jazzy-) taken off."""
    names = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0].lower()
        pinned = "==" in line
        if name.startswith(prefix):
            name = name[len(prefix):]
        names[name] = pinned
    return names


def test_kilted_and_jazzy_requirements_name_the_same_ros_packages():
    # scripts/setup.sh installs requirements-ros.txt (Kilted, the default) or, with STREAM4D_ROS_DISTRO=jazzy,
    # requirements-ros-jazzy.txt: the two must not drift apart. Known differences are build-time only (tf2_msgs):
    # Kilted split ament_cmake_ros_core out of ament_cmake_ros; Jazzy's ament_cmake_ros needs the gmock/gtest/pytest
    # CMake modules and its rosidl_generator_py needs python_cmake_module.
    kilted_only = {"ament-cmake-ros-core"}
    jazzy_only = {"ament-cmake-ros", "ament-cmake-gmock", "ament-cmake-gtest", "ament-cmake-pytest", "python-cmake-module"}
    kilted = _requirement_names("requirements-ros.txt", "ros-")
    jazzy = _requirement_names("requirements-ros-jazzy.txt", "ros-jazzy-")
    assert set(kilted) - kilted_only == set(jazzy) - jazzy_only
    assert kilted_only <= set(kilted) and jazzy_only <= set(jazzy)
    jazzy_lines = [ln.strip() for ln in (ROOT / "requirements-ros-jazzy.txt").read_text().splitlines()
                   if ln.strip().startswith("ros-")]
    # the ros-jazzy-* meta wheels pin the Jazzy ros-* wheels; a bare ros-* line would pull a Kilted release
    assert jazzy_lines and all(ln.startswith("ros-jazzy-") and "==" in ln for ln in jazzy_lines), jazzy_lines
    assert all(pinned for name, pinned in kilted.items() if name != "catkin-pkg")


def test_setup_names_both_distributions_and_refuses_others():
    source = (ROOT / "scripts" / "setup.sh").read_text()
    assert "requirements-ros.txt" in source and "requirements-ros-jazzy.txt" in source
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "STREAM4D_ROS_DISTRO": "humble", "STREAM4D_VENV": str(ROOT / "no-venv")},
                            timeout=60)
    assert result.returncode == 2 and "expected kilted" in result.stderr, result.stdout + result.stderr
    assert not (ROOT / "no-venv").exists()


def test_bags_written_with_the_kilted_typestore_are_jazzy_bags():
    # the package writes bags with rosbags' ROS2_KILTED typestore on every distribution: every message type it
    # reads or writes has the same definition (and RIHS01 type hash) in Jazzy, so the bags replay there unchanged
    from rosbags.typesys import Stores, get_typestore
    kilted, jazzy = get_typestore(Stores.ROS2_KILTED), get_typestore(Stores.ROS2_JAZZY)
    used = ["sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/CameraInfo",
            "sensor_msgs/msg/PointCloud2", "tf2_msgs/msg/TFMessage", "nav_msgs/msg/Odometry", "nav_msgs/msg/Path",
            "geometry_msgs/msg/PoseStamped", "diagnostic_msgs/msg/DiagnosticArray", "rosgraph_msgs/msg/Clock",
            "std_msgs/msg/Header", "builtin_interfaces/msg/Time"]
    for msgtype in used:
        assert kilted.fielddefs[msgtype] == jazzy.fielddefs[msgtype], msgtype
        assert kilted.hash_rihs01(msgtype) == jazzy.hash_rihs01(msgtype), msgtype


def test_share_files_are_installed_by_setup_py():
    source = (ROOT / "setup.py").read_text()
    for folder in ("launch", "config", "model"):
        assert f"share/{{PACKAGE}}/{folder}" in source
    assert (ROOT / "resource" / "ros2_stream4d").exists()


def test_stream4d_cli_lists_its_commands():
    result = subprocess.run([sys.executable, "-m", "ros2_stream4d.cli", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "stream4d" in result.stdout
