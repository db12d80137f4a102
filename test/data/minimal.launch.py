"""A launch file using every construct minilaunch resolves; test/test_launch_files.py checks the result."""

from launch.actions import DeclareLaunchArgument, ExecuteProcess, GroupAction, IncludeLaunchDescription
from launch.conditions import IfCondition, UnlessCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import (
    EnvironmentVariable,
    LaunchConfiguration,
    PathJoinSubstitution,
    PythonExpression,
    ThisLaunchFileDir,
)
from launch_ros.actions import Node, PushRosNamespace, SetParameter
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description():
    use_sim_time = LaunchConfiguration("use_sim_time")
    return LaunchDescription([
        DeclareLaunchArgument("use_sim_time", default_value="false", choices=["true", "false"]),
        DeclareLaunchArgument("namespace", default_value="robot1"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw"),
        DeclareLaunchArgument("rate", default_value="2"),
        DeclareLaunchArgument("rviz", default_value="false"),
        SetParameter(name="use_sim_time", value=use_sim_time),
        GroupAction([
            PushRosNamespace(LaunchConfiguration("namespace")),
            Node(package="ros2_stream4d", executable="stream4d", name="mapper", namespace="sub", output="screen",
                 arguments=["run"],
                 parameters=[PathJoinSubstitution([ThisLaunchFileDir(), "params.yaml"]),
                             {"window": 8, "model": {"name": "tiny", "device": EnvironmentVariable(
                                 "S4D_TEST_DEVICE", default_value="cpu")},
                              "rate_hz": PythonExpression([LaunchConfiguration("rate"), " * 5"])}],
                 remappings=[("image", LaunchConfiguration("image_topic"))]),
        ]),
        Node(package="rviz2", executable="rviz2", condition=IfCondition(LaunchConfiguration("rviz"))),
        ExecuteProcess(cmd=["ls", PathJoinSubstitution([FindPackageShare("ros2_stream4d"), "config"])],
                       name="list_config", condition=UnlessCondition(use_sim_time)),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(
            PathJoinSubstitution([ThisLaunchFileDir(), "included.launch.py"])),
            launch_arguments={"greeting": "hello"}.items()),
    ])
