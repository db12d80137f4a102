"""Included by minimal.launch.py: receives `greeting` and sees the parent's launch configurations."""

from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("greeting", default_value="unset"),
        ExecuteProcess(cmd=["echo", LaunchConfiguration("greeting"), LaunchConfiguration("namespace")], name="echo"),
    ])
