# Sample, NOT BUILT OR RUN HERE: the development machine is x86_64 with no Thor, no GPU runtime
# and no access to nvcr.io. It shows the shape: NGC PyTorch (Thor support from 25.08; Ubuntu 24.04,
# Python 3.12, CUDA 13) + ROS 2 Jazzy from apt + this package, set up by the same script as a
# bare Thor, with the node as the entry point. Check on a Thor before relying on it (docs/THOR.md).
#
#   docker build -f docker/Dockerfile.thor -t capsule_ros:thor .
#   docker run --rm -it --runtime nvidia --network host -v /path/params.yaml:/params.yaml \
#       capsule_ros:thor params_file:=/params.yaml
ARG BASE=nvcr.io/nvidia/pytorch:25.08-py3
FROM ${BASE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8

# ROS 2 Jazzy (ros-base: rclpy, the message packages, launch, ros2 CLI) from the ROS apt repository.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl gnupg ca-certificates software-properties-common \
 && add-apt-repository -y universe \
 && curl -sSL https://raw.githubusercontent.com/ros/rosdistro/master/ros.key \
      -o /usr/share/keyrings/ros-archive-keyring.gpg \
 && echo "deb [arch=$(dpkg --print-architecture) signed-by=/usr/share/keyrings/ros-archive-keyring.gpg] http://packages.ros.org/ros2/ubuntu noble main" \
      > /etc/apt/sources.list.d/ros2.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends ros-jazzy-ros-base python3-venv python3-pip \
      python3-rosdep python3-colcon-common-extensions build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

COPY . /opt/capsule_ros
WORKDIR /opt/capsule_ros
# Keep the container's own CUDA torch (built for its CUDA and Thor); the venv sees it through
# --system-site-packages. No GPU during `docker build`, so the doctor runs at start instead.
ENV CAPSULE_VENV=/opt/capsule_venv CAPSULE_KEEP_TORCH=1
RUN bash scripts/thor_setup.sh --no-doctor

# The node: ROS underlay, then the venv (its python3 runs capsule_node), then this package.
ENTRYPOINT ["/bin/bash", "-c", "set +u; source /opt/ros/jazzy/setup.bash && source /opt/capsule_venv/bin/activate && source /opt/capsule_ros/install/setup.bash && python -P -m capsule_ros.doctor --device cuda; exec ros2 launch capsule_ros capsule_ros.launch.py \"$@\"", "--"]
