"""The package layout a ROS 2 user relies on: importable without ROS, ament metadata complete, layers clean."""

import ast
import pathlib
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
                "diagnostic_msgs", "launch_ros", "rviz2", "python3-numpy", "python3-opencv"):
        assert dep in declared, f"package.xml lacks exec_depend {dep}"


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
