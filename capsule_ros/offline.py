"""Run a bag's messages through the pipeline with no ROS at all.

The reference for replay tests: the same config, the same engine, the same message order, and
the bag time as receive time. The node over ROS must publish exactly these answers.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .config import NodeConfig
from .ros.bag_io import bag_info, read_messages
from .runtime.build import build_pipeline
from .runtime.outcome import Outcome
from .runtime.pipeline import Pipeline

log = logging.getLogger(__name__)


def run_offline(config: NodeConfig, bag: str | Path, pipeline: Pipeline | None = None) -> list[Outcome]:
    """Feed every configured input's messages from ``bag`` in bag order; return the outcomes.

    A configured input whose topic the bag lacks is skipped with a warning (its streams get no
    messages from it), as the replayer does; an unreadable bag raises ``bag_io.BagError``.
    """
    present = bag_info(bag)   # first: an unfinished recording fails before the model is built
    by_topic = {spec.topic: name for name, spec in config.inputs.items() if spec.topic in present}
    for name, spec in config.inputs.items():
        if spec.topic not in present:
            log.warning("bag %s has no %s (input %r): replayed without it", bag, spec.topic, name)
    pipeline = pipeline or build_pipeline(config)
    outcomes: list[Outcome] = []
    if not by_topic:
        return outcomes
    for item in read_messages(bag, topics=list(by_topic)):
        pipeline.on_message(by_topic[item.topic], item.msg, item.timestamp_ns, outcomes.append)
    return outcomes
