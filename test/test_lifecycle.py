"""The managed node in-process on Jazzy's rclpy: best-effort sensors are heard, a bad parameter
fails configure and leaves the node up, structural parameters are guarded, live ones apply,
deactivate keeps capsules, cleanup frees the model and configure builds it again."""
from __future__ import annotations

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.exceptions import ParameterNotDeclaredException  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from capsule_ros.msg import ActionChunk, Status  # noqa: E402
from capsule_ros.ros.launch_args import node_arguments  # noqa: E402
from capsule_ros.ros.node import ANSWER_QOS, CapsuleNode  # noqa: E402
from rosutil import activate, make_executor, spin_until, wait_matched  # noqa: E402
from test_node import FRONT, JOINTS, image, joints  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class Rig:
    """A capsule node plus a client whose sensor publishers are best effort, like camera drivers."""

    def __init__(self, ctx, params_file, overrides=()):
        args = node_arguments(params_file=str(params_file))
        self.node = CapsuleNode(context=ctx, cli_args=args.cli_args(),
                                parameter_overrides=list(overrides))
        self.client = rclpy.create_node("sensors", context=ctx)
        self.ex = make_executor(ctx, self.node, self.client)
        self.actions: list[ActionChunk] = []
        self.statuses: list[Status] = []
        self.client.create_subscription(ActionChunk, "/capsule_node/actions", self.actions.append,
                                        ANSWER_QOS)
        self.client.create_subscription(Status, "/capsule_node/status", self.statuses.append,
                                        ANSWER_QOS)
        self.cam = self.client.create_publisher(Image, FRONT, qos_profile_sensor_data)
        self.joints = self.client.create_publisher(JointState, JOINTS, qos_profile_sensor_data)

    def subscribed(self) -> bool:
        return self.client.count_subscribers(FRONT) > 0

    def observe(self, k: int) -> None:
        """One joint state, then one frame; wait for the answer to the frame."""
        before = len(self.actions)
        self.joints.publish(joints(k))  # same stamp as the frame: the node pairs them by time
        self.cam.publish(image(64, 48, k))
        spin_until(self.ex, lambda: len(self.actions) > before, 30, "an answer")

    def close(self) -> None:
        self.ex.shutdown()
        self.node.destroy_node()
        self.client.destroy_node()


@pytest.fixture
def rig(ros, default_params, one_torch_thread):
    r = Rig(ros, default_params)
    yield r
    r.close()


def test_best_effort_camera_is_answered_and_answers_name_their_columns(rig):
    activate(rig.node)
    wait_matched(rig.ex, rig.client, publishers=[rig.cam, rig.joints])
    for k in range(3):
        rig.observe(k)
    assert [a.request_id for a in rig.actions] == [1, 2, 3]
    assert rig.statuses == []
    chunk = rig.actions[-1]
    assert chunk.stream == "front" and chunk.dof == 7 and len(chunk.names) == 7
    assert list(chunk.names) == [f"a{i}" for i in range(7)]


def test_deactivate_keeps_capsules_and_activate_serves_again(rig):
    activate(rig.node)
    wait_matched(rig.ex, rig.client, publishers=[rig.cam, rig.joints])
    rig.observe(0)
    store = rig.node.pipeline.engine.store
    position = store.position("front")
    assert position > 0
    assert rig.node.trigger_deactivate() == SUCCESS
    spin_until(rig.ex, lambda: not rig.subscribed(), 30, "the node to unsubscribe")
    assert store.position("front") == position  # state kept while inactive
    assert rig.node.trigger_activate() == SUCCESS
    wait_matched(rig.ex, rig.client, publishers=[rig.cam, rig.joints])
    rig.observe(1)
    assert store.position("front") > position
    assert rig.actions[-1].request_id == 2


def test_structural_parameters_are_refused_while_configured_and_live_ones_apply(rig):
    activate(rig.node)
    [result] = rig.node.set_parameters([Parameter("model.dtype", value="bfloat16")])
    assert not result.successful
    assert "structural" in result.reason and "unconfigured" in result.reason
    assert rig.node.get_parameter("model.dtype").value == "float32"
    [result] = rig.node.set_parameters([Parameter("capsules.verify_every", value=4)])
    assert result.successful
    assert rig.node.pipeline.engine.verify_every == 4
    [result] = rig.node.set_parameters([Parameter("capsules.verify_every", value=-1)])
    assert not result.successful  # the descriptor's range
    with pytest.raises(ParameterNotDeclaredException):
        rig.node.set_parameters([Parameter("no.such_parameter", value=1)])


def test_cleanup_frees_the_model_and_a_structural_change_applies_at_the_next_configure(rig):
    activate(rig.node)
    assert rig.node.trigger_deactivate() == SUCCESS
    assert rig.node.trigger_cleanup() == SUCCESS
    assert rig.node.pipeline is None
    [result] = rig.node.set_parameters([Parameter("model.max_context", value=2048)])
    assert result.successful, result.reason
    assert rig.node.trigger_configure() == SUCCESS
    assert rig.node.pipeline.engine.model.max_len == 2048


@pytest.mark.parametrize("override,needle", [
    (Parameter("model.dtype", value="float99"), "model.dtype"),
    (Parameter("model.max_context", value="big"), "model.max_context"),
    (Parameter("inputs.front_cam.expect_sise", value=[48, 64]), "expect_sise"),
])
def test_a_bad_parameter_fails_configure_names_it_and_the_node_stays_up(
        ros, default_params, one_torch_thread, override, needle):
    rig = Rig(ros, default_params, overrides=[override])
    try:
        errors = []
        rig.node.get_logger().error = errors.append  # what the node logs, without a log parser
        assert rig.node.trigger_configure() == FAILURE
        assert rig.node.pipeline is None and rig.node.state == "unconfigured"
        assert any(needle in e for e in errors), errors
        if override.name == "model.dtype":  # fixable while unconfigured, then configure works
            [result] = rig.node.set_parameters([Parameter("model.dtype", value="float32")])
            assert result.successful, result.reason
            assert rig.node.trigger_configure() == SUCCESS
    finally:
        rig.close()


def test_budgets_change_live_or_are_refused_with_the_old_ones_kept(rig):
    activate(rig.node)
    wait_matched(rig.ex, rig.client, publishers=[rig.cam, rig.joints])
    rig.observe(0)
    engine = rig.node.pipeline.engine
    [result] = rig.node.set_parameters([Parameter("capsules.host_budget_mb", value=64.0)])
    assert result.successful, result.reason
    assert engine.tiers.config.host_bytes == 64 * 2**20
    # a device budget nothing can meet (no file tier to move the boundaries to): refused, kept
    results = rig.node.set_parameters_atomically([
        Parameter("capsules.device_budget_mb", value=0.001),
        Parameter("capsules.host_budget_mb", value=0.001)])
    assert not results.successful and "budgets refused" in results.reason
    assert engine.tiers.config.host_bytes == 64 * 2**20 and engine.tiers.config.device_bytes is None
    [result] = rig.node.set_parameters([Parameter("capsules.file_budget_mb", value=8.0)])
    assert not result.successful and "capsules.directory" in result.reason  # none configured
    rig.observe(1)   # serving goes on under the budget that was accepted

