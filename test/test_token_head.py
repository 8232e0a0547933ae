"""Token head: text decoded after each query, sampler state carried by the stream's capsule.

A restored stream (another stream ran in between), a rolled-back stream and a fresh build all
sample the same continuation; the node publishes it as a ``TextChunk`` on ``~/text``.
"""
from __future__ import annotations

import time
from types import SimpleNamespace as NS

import pytest
import torch

from capsule_ros.config import from_params
from capsule_ros.models.registry import tiny_config
from capsule_ros.runtime.build import build_pipeline
from capsule_ros.runtime.pipeline import Pipeline
from capsule_ros.runtime.decode import TextCodec
from capsule_ros.runtime.outcome import Answer, Failure, TextOutput

FAMILY = "lfm2"
MAX_NEW = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py




def params(head: dict, max_context: int = 128) -> dict:
    return {
        "model": {"config_file": str(tiny_config(FAMILY)), "seed": 0, "max_context": max_context,
                  "chunk_size": 16},
        "inputs": {"names": ["obs", "instr", "ping"],
                   "obs": {"topic": "/obs", "type": "std_msgs/msg/Float32MultiArray",
                           "encoder": "float_array", "length": 3, "tokens": 2},
                   "instr": {"topic": "/instr", "type": "std_msgs/msg/String", "encoder": "text"},
                   "ping": {"topic": "/ping", "type": "std_msgs/msg/String", "encoder": "text"}},
        "streams": {"names": ["talk", "other"],
                    "talk": {"trigger": "obs", "context": ["instr"], "head": head},
                    "other": {"trigger": "ping", "head": head}},
    }


SAMPLED = {"kind": "tokens", "temperature": 1.0, "top_p": 0.95, "max_new_tokens": MAX_NEW, "seed": 3}


def obs(i: int) -> NS:
    return NS(data=[0.1 * i, 0.5, -0.25])


def ask(pipe: Pipeline, input_name: str, msg) -> Answer:
    out = []
    pipe.on_message(input_name, msg, 0, out.append)
    answers = [o for o in out if isinstance(o, Answer)]
    assert len(answers) == 1, out
    return answers[0]


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(from_params(params(SAMPLED)))


def test_text_answer_shape(pipe):
    before = pipe.engine.boundary("talk").position
    a = ask(pipe, "obs", obs(0))
    assert isinstance(a.output, TextOutput) and a.actions is None
    n = len(a.output.token_ids)
    assert 1 <= n <= MAX_NEW
    assert a.output.stop in ("eos", "max_new_tokens")
    assert a.output.text == pipe.codec.decode(a.output.token_ids)
    # prefill (2 obs tokens) + every emitted token fed back: the boundary holds the whole answer
    assert a.position == before + 2 + n == pipe.engine.boundary("talk").position
    assert "rng" in pipe.engine.boundary("talk").meta_tensors
    assert a.act_ms > 0


def test_restored_stream_samples_the_same(pipe):
    """Interleaving another stream (a restore in between) changes nothing for 'talk'."""
    fresh = build_pipeline(from_params(params(SAMPLED)))
    straight = [ask(fresh, "obs", obs(i)).output.token_ids for i in range(3)]
    again = build_pipeline(from_params(params(SAMPLED)))
    interleaved = []
    for i in range(3):
        interleaved.append(ask(again, "obs", obs(i)).output.token_ids)
        ask(again, "ping", NS(data=f"noise {i}"))  # 'other' runs: the live state is not talk's
    assert again.engine.counters["restores"] >= 3
    assert interleaved == straight
    # and the samples really depend on the RNG state (not greedy in disguise)
    assert len({t for ids in straight for t in ids}) > 3


def test_rollback_then_requery_reproduces(pipe):
    first = ask(pipe, "obs", obs(5))
    pipe.engine.rollback("talk", 1)
    second = ask(pipe, "obs", obs(5))
    assert second.output.token_ids == first.output.token_ids
    assert second.position == first.position
    # the stream's state moved on: the next query samples something else from the same input
    third = ask(pipe, "obs", obs(5))
    assert third.output.token_ids != first.output.token_ids


def test_greedy_max_tokens_and_context_limit():
    greedy = {"kind": "tokens", "max_new_tokens": 4}
    pipe = build_pipeline(from_params(params(greedy, max_context=16)))
    a = ask(pipe, "obs", obs(1))
    b = build_pipeline(from_params(params(greedy, max_context=16)))
    assert ask(b, "obs", obs(1)).output.token_ids == a.output.token_ids  # greedy: no RNG involved
    assert "rng" not in pipe.engine.boundary("talk").meta_tensors
    # fill the context: decoding stops at the limit instead of wrapping or failing
    pipe.engine.context_policy = "refuse"
    outs = []
    for i in range(8):
        pipe.on_message("obs", obs(i), 0, outs.append)
        if isinstance(outs[-1], Failure):
            break
    answers = [o for o in outs if isinstance(o, Answer)]
    assert [o.output.stop for o in answers][-1] == "context"  # the limit stopped decoding
    assert answers[-1].position == 16
    assert isinstance(outs[-1], Failure) and outs[-1].code == 300  # then: CONTEXT_FULL, refused


def test_byte_fallback_codec():
    codec = TextCodec(None, byte_offset=3, eos_ids=frozenset({2}))
    ids = [b + 3 for b in "héllo".encode()] + [2]
    assert codec.decode(ids) == "héllo"
    assert codec.decode([3 + 0xC3]) == "\ufffd"  # a cut utf-8 sequence is replaced, not raised


# ---------------------------------------------------------------- through the node

rclpy = pytest.importorskip("rclpy")


def _overrides(doc: dict, prefix: str = "") -> list:
    from rclpy.parameter import Parameter
    out = []
    for k, v in doc.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _overrides(v, name + ".")
        else:
            out.append(Parameter(name, value=v))
    return out




def spin_until(executor, cond, timeout=20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        executor.spin_once(timeout_sec=0.05)
    return cond()


@pytest.mark.timeout(90)
def test_text_chunk_published_by_node(ros):
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import Float32MultiArray, String

    from capsule_ros.msg import TextChunk
    from capsule_ros.ros.node import ANSWER_QOS, CapsuleNode

    from rosutil import activate
    node = activate(CapsuleNode(context=ros, parameter_overrides=_overrides(params(SAMPLED))))
    client = rclpy.create_node("client", context=ros)
    executor = SingleThreadedExecutor(context=ros)
    executor.add_node(node)
    executor.add_node(client)
    try:
        texts = []
        client.create_subscription(TextChunk, "/capsule_node/text", texts.append, ANSWER_QOS)
        obs_pub = client.create_publisher(Float32MultiArray, "/obs", 10)
        instr_pub = client.create_publisher(String, "/instr", 10)
        assert spin_until(executor, lambda: obs_pub.get_subscription_count() > 0
                          and instr_pub.get_subscription_count() > 0
                          and node.text_pub.get_subscription_count() > 0)
        instr_pub.publish(String(data="hi"))  # context for 'talk'
        # headerless types pair by receive time: the instruction must be here before the trigger
        assert spin_until(executor, lambda: node.pipeline.context.held()["instr"])
        obs_pub.publish(Float32MultiArray(data=[0.0, 0.5, -0.25]))
        assert spin_until(executor, lambda: len(texts) >= 1)
        (msg,) = texts
        assert msg.stream == "talk"
        assert msg.request_id == 1 and 1 <= len(msg.token_ids) <= MAX_NEW
        assert msg.text == node.pipeline.codec.decode(list(msg.token_ids))
        assert msg.boundary == node.pipeline.engine.boundary("talk").position
        assert msg.append_ms > 0 and msg.act_ms > 0
        # the same query offline reproduces the node's sample (same seeds, same state)
        offline = build_pipeline(from_params(params(SAMPLED)))
        offline.on_message("instr", NS(data="hi"), 0, lambda o: None)
        assert ask(offline, "obs", obs(0)).output.token_ids == tuple(msg.token_ids)
    finally:
        executor.shutdown()
        client.destroy_node()
        node.destroy_node()
