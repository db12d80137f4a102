"""Start stream4d_node on a camera: `ros2 launch ros2_stream4d stream4d.launch.py image:=/camera/image_raw`."""

from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description():
    share = FindPackageShare("ros2_stream4d")
    args = [
        DeclareLaunchArgument("image", default_value="/camera/image_raw", description="camera image topic"),
        DeclareLaunchArgument("camera_info", default_value="/camera/camera_info", description="CameraInfo topic"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "stream4d.yaml"]),
                              description="node parameters (every one documented in it)"),
        DeclareLaunchArgument("model", default_value="streamvggt",
                              description="model card in share/ros2_stream4d/model, or a checkpoint path"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda, cuda:N"),
        DeclareLaunchArgument("use_sim_time", default_value="false", choices=["true", "false"],
                              description="follow /clock (bag replay)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("rviz", default_value="false", choices=["true", "false"], description="start RViz"),
        DeclareLaunchArgument("process_every_frame", default_value="false", choices=["true", "false"],
                              description="true: never drop frames (bag replay); false: latest frame wins (live)"),
        DeclareLaunchArgument("input_qos", default_value="sensor_data", choices=["sensor_data", "reliable"],
                              description="image subscription QoS"),
        DeclareLaunchArgument("log_level", default_value="info", description="ROS log level"),
    ]
    node = Node(
        package="ros2_stream4d",
        executable="stream4d_node",
        name="stream4d",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "model": LaunchConfiguration("model"),
                "device": LaunchConfiguration("device"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
                "process_every_frame": LaunchConfiguration("process_every_frame"),
                "input_qos": LaunchConfiguration("input_qos"),
            },
        ],
        # the node's default input topics, remapped to the camera's
        remappings=[("/camera/image_raw", LaunchConfiguration("image")),
                    ("/camera/camera_info", LaunchConfiguration("camera_info"))],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "config", "stream4d.rviz"])],
        parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription(args + [node, rviz])
