"""ros2 launch capsule_ros capsule_ros.launch.py [params_file:=...] [namespace:=...]
[log_level:=info] [use_sim_time:=false] [autostart:=true] [respawn:=false] [respawn_delay:=2.0]
[launch_prefix:=...]

A thin wrapper: capsule_ros.ros.launch_args.node_arguments validates the arguments and builds the
node's start, which in-process tests use too. The node is a managed (lifecycle) node; with
autostart (a node parameter, so it also holds under `ros2 run` and after a respawn) it configures
and activates itself, otherwise drive it with `ros2 lifecycle set <node> configure|activate`.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

from capsule_ros.ros.launch_args import default_params_file, node_arguments


def _node(context):
    args = node_arguments(
        params_file=LaunchConfiguration("params_file").perform(context),
        namespace=LaunchConfiguration("namespace").perform(context),
        log_level=LaunchConfiguration("log_level").perform(context),
        use_sim_time=LaunchConfiguration("use_sim_time").perform(context),
        autostart=LaunchConfiguration("autostart").perform(context),
        respawn=LaunchConfiguration("respawn").perform(context),
        respawn_delay=LaunchConfiguration("respawn_delay").perform(context),
        launch_prefix=LaunchConfiguration("launch_prefix").perform(context),
    )
    # LifecycleNode (launch_ros 0.26.6 on Jazzy) needs name and namespace; it has no autostart
    # argument there, which is why autostart is the node's own parameter.
    return [LifecycleNode(package=args.package, executable=args.executable, name=args.name,
                          namespace=args.namespace, parameters=args.parameters,
                          ros_arguments=args.ros_arguments, respawn=args.respawn,
                          respawn_delay=args.respawn_delay, prefix=args.prefix,
                          output="screen", emulate_tty=True)]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params_file(),
                              description="node parameters (inputs, streams, model)"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="debug, info, warn, error or fatal"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="follow /clock (bag replay)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="the node configures and activates itself; false: "
                                          "drive it with ros2 lifecycle set"),
        DeclareLaunchArgument("respawn", default_value="false",
                              description="restart the node process when it exits"),
        DeclareLaunchArgument("respawn_delay", default_value="2.0",
                              description="seconds before a respawn"),
        DeclareLaunchArgument("launch_prefix", default_value="",
                              description="command prefix, e.g. a venv's python: "
                                          "/opt/capsule/venv/bin/python3"),
        OpaqueFunction(function=_node),
    ])
