"""ros2 launch capsule_ros capsule_ros.launch.py [params_file:=...] [namespace:=...]
[log_level:=info] [use_sim_time:=false]

A thin wrapper: capsule_ros.ros.launch_args.node_arguments builds the node's arguments, and the
tests start the node with exactly those (launch itself is not installable on the CI machine).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from capsule_ros.ros.launch_args import default_params_file, node_arguments


def _node(context):
    args = node_arguments(
        params_file=LaunchConfiguration("params_file").perform(context),
        namespace=LaunchConfiguration("namespace").perform(context),
        log_level=LaunchConfiguration("log_level").perform(context),
        use_sim_time=LaunchConfiguration("use_sim_time").perform(context),
    )
    return [Node(package=args.package, executable=args.executable, name=args.name,
                 namespace=args.namespace, parameters=args.parameters,
                 ros_arguments=args.ros_arguments, output="screen", emulate_tty=True)]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params_file(),
                              description="node parameters (inputs, streams, model)"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="debug, info, warn, error or fatal"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="follow /clock (bag replay)"),
        OpaqueFunction(function=_node),
    ])
