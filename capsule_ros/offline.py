"""Run a bag's messages through the pipeline with no ROS at all.

The reference for replay tests: the same config, the same engine, the same message order, and
the bag time as receive time. The node over ROS must publish exactly these answers.
"""
from __future__ import annotations

from pathlib import Path

from .config import NodeConfig
from .ros.bag_io import read_messages
from .runtime.pipeline import Outcome, Pipeline


def run_offline(config: NodeConfig, bag: str | Path, pipeline: Pipeline | None = None) -> list[Outcome]:
    """Feed every configured input's messages from ``bag`` in bag order; return the outcomes."""
    pipeline = pipeline or Pipeline.build(config)
    by_topic = {spec.topic: name for name, spec in config.inputs.items()}
    outcomes: list[Outcome] = []
    for item in read_messages(bag, topics=list(by_topic)):
        pipeline.on_message(by_topic[item.topic], item.msg, item.timestamp_ns, outcomes.append)
    return outcomes
