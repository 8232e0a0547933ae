"""Helpers for in-process ROS tests: a context per test, spinning until a condition holds.

Tests never sleep for discovery: they spin the executor until the graph says the peers match.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import rclpy
from rclpy.executors import SingleThreadedExecutor


@contextmanager
def ros_context(domain_id: int | None = None) -> Iterator[rclpy.Context]:
    """A fresh rclpy context (on ``domain_id`` when given), shut down on exit."""
    ctx = rclpy.Context()
    if domain_id is None:
        rclpy.init(context=ctx)
    else:
        rclpy.init(context=ctx, domain_id=domain_id)
    try:
        yield ctx
    finally:
        ctx.try_shutdown()


def make_executor(ctx: rclpy.Context, *nodes) -> SingleThreadedExecutor:
    ex = SingleThreadedExecutor(context=ctx)
    for n in nodes:
        ex.add_node(n)
    return ex


def spin_until(executor, condition: Callable[[], bool], timeout: float = 20.0,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        executor.spin_once(timeout_sec=0.05)


def wait_matched(executor, node, publishers=(), subscribed_topics=(), timeout: float = 20.0) -> None:
    """Until every publisher has a subscriber and every topic in ``subscribed_topics`` a publisher.

    (``node.count_publishers`` rather than ``Subscription.get_publisher_count``: the latter is
    newer than Jazzy's rclpy.)
    """
    def matched() -> bool:
        return (all(p.get_subscription_count() > 0 for p in publishers)
                and all(node.count_publishers(t) > 0 for t in subscribed_topics))
    spin_until(executor, matched, timeout, "discovery")


class Inbox:
    """Every message received on ``topic`` by ``node``, in arrival order."""

    def __init__(self, node, msg_type, topic: str, qos=10) -> None:
        self.messages: list = []
        self.subscription = node.create_subscription(msg_type, topic, self.messages.append, qos)

    def last(self, predicate: Callable[[object], bool] = lambda m: True):
        """The latest message satisfying ``predicate``, or None."""
        return next((m for m in reversed(self.messages) if predicate(m)), None)


def activate(node):
    """Walk a capsule node (built in-process, where ``autostart`` has no main loop to act on it)
    through configure and activate, as autostart does; fail the test if either is refused."""
    from rclpy.lifecycle import TransitionCallbackReturn
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, "configure failed"
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS, "activate failed"
    return node
