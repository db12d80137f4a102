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
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node (and its outputs)"),
        DeclareLaunchArgument("image", default_value="/camera/image_raw",
                              description="camera image topic (remaps the node's relative input 'image'); with "
                                          "image_transport compressed the node subscribes to IMAGE/compressed"),
        DeclareLaunchArgument("camera_info", default_value="/camera/camera_info", description="CameraInfo topic"),
        DeclareLaunchArgument("image_transport", default_value="raw", choices=["raw", "compressed"],
                              description="raw Image or CompressedImage input"),
        DeclareLaunchArgument("depth", default_value="/camera/depth/image_rect_raw",
                              description="metric depth image topic, used with scale_source:=depth"),
        DeclareLaunchArgument("base_frame", default_value="",
                              description="robot base frame (e.g. base_link); empty = camera-only set-up"),
        DeclareLaunchArgument("odom_frame", default_value="odom", description="odometry frame (REP-105)"),
        DeclareLaunchArgument("scale_source", default_value="none", choices=["none", "fixed", "depth", "odometry"],
                              description="where the metric scale comes from (none: depth on ~/depth_relative)"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "stream4d.yaml"]),
                              description="node parameters (every one documented in it; keyed /**/stream4d)"),
        DeclareLaunchArgument("model", default_value="streamvggt",
                              description="model card in share/ros2_stream4d/model, or a checkpoint path"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda, cuda:N"),
        DeclareLaunchArgument("window", default_value="16", description="rolling KV cache window [frames]"),
        DeclareLaunchArgument("use_sim_time", default_value="false", choices=["true", "false"],
                              description="follow /clock (bag replay)"),
        DeclareLaunchArgument("autostart", default_value="true", choices=["true", "false"],
                              description="configure and activate the managed node at start-up"),
        DeclareLaunchArgument("rviz", default_value="false", choices=["true", "false"],
                              description="start RViz (needs rviz2, not a dependency of this package)"),
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
                "window": LaunchConfiguration("window"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
                "autostart": LaunchConfiguration("autostart"),
                "process_every_frame": LaunchConfiguration("process_every_frame"),
                "input_qos": LaunchConfiguration("input_qos"),
                "image_transport": LaunchConfiguration("image_transport"),
                "base_frame": LaunchConfiguration("base_frame"),
                "odom_frame": LaunchConfiguration("odom_frame"),
                "scale_source": LaunchConfiguration("scale_source"),
            },
        ],
        # the node's relative inputs, remapped to the camera's topics
        remappings=[("image", LaunchConfiguration("image")), ("camera_info", LaunchConfiguration("camera_info")),
                    ("depth/image", LaunchConfiguration("depth"))],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        namespace=LaunchConfiguration("namespace"),
        arguments=["-d", PathJoinSubstitution([share, "config", "stream4d.rviz"])],
        parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
        # the RViz config names relative topics (stream4d/cloud, image ...): they follow the namespace and the
        # image remap
        remappings=[("image", LaunchConfiguration("image"))],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription(args + [node, rviz])
