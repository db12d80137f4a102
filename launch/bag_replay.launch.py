"""Replay a rosbag2 into stream4d_node with simulated time:
`ros2 launch ros2_stream4d bag_replay.launch.py bag:=/path/to/bag`.

Uses `ros2 bag play --clock` where rosbag2 exists; here (no rosbag2) the package's own player `stream4d play`
publishes the same topics and /clock (player:=stream4d).
"""

from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description():
    share = FindPackageShare("ros2_stream4d")
    args = [
        DeclareLaunchArgument("bag", description="rosbag2 folder (mcap or sqlite3)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("player", default_value="ros2bag", choices=["ros2bag", "stream4d"],
                              description="ros2bag (ros2 bag play) or stream4d (the package's player)"),
        DeclareLaunchArgument("image", default_value="/camera/image_raw", description="camera image topic"),
        DeclareLaunchArgument("camera_info", default_value="/camera/camera_info", description="CameraInfo topic"),
        DeclareLaunchArgument("model", default_value="streamvggt", description="model card or checkpoint"),
        DeclareLaunchArgument("rviz", default_value="false", choices=["true", "false"], description="start RViz"),
    ]
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch", "stream4d.launch.py"])),
        launch_arguments={
            "use_sim_time": "true",
            "process_every_frame": "true",
            "input_qos": "reliable",
            "image": LaunchConfiguration("image"),
            "camera_info": LaunchConfiguration("camera_info"),
            "model": LaunchConfiguration("model"),
            "rviz": LaunchConfiguration("rviz"),
        }.items(),
    )
    ros2bag = ExecuteProcess(
        cmd=["ros2", "bag", "play", LaunchConfiguration("bag"), "--clock", "--rate", LaunchConfiguration("rate")],
        output="screen",
        condition=IfCondition(PythonExpression(["'", LaunchConfiguration("player"), "' == 'ros2bag'"])),
    )
    own_player = ExecuteProcess(
        cmd=["stream4d", "play", LaunchConfiguration("bag"), "--rate", LaunchConfiguration("rate"),
             "--wait-for-subscribers", LaunchConfiguration("image")],
        output="screen",
        condition=IfCondition(PythonExpression(["'", LaunchConfiguration("player"), "' == 'stream4d'"])),
    )
    return LaunchDescription(args + [node, ros2bag, own_player])
