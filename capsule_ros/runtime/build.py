"""Wiring: a ``Pipeline`` from a ``NodeConfig`` (model, engine, encoders, heads, capsule files).

Building lives apart from running (``pipeline.py``): this runs once, at configure.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..capsule.execution import accepting_other_execution
from ..capsule.files import clean_stale_temps
from ..capsule.persist import Persister
from ..capsule.places import CapsuleDirs
from ..capsule.tiers import TierFiles
from ..config import NodeConfig, resolve
from ..models.spec import ModelSpec
from ..policy.encoders import build_encoder
from ..policy.heads import build_head
from ..policy.weights import load_policy_weights, policy_weights_path
from .decode import Head
from .engine import Engine
from .pipeline import Pipeline
from .tier_policy import TierConfig


def build_pipeline(config: NodeConfig, node_name: str = "/capsule_node",
                   ros_home: str | None = None) -> Pipeline:
    """Everything from the config. ``node_name`` (fully qualified) names this node's own
    capsule directories; a relative ``capsules.directory`` resolves against ``ros_home``
    (default: $ROS_HOME, else ~/.ros)."""
    m = config.model
    set_threads(m.threads)
    persistent_compile_caches(ros_home)
    spec = ModelSpec(config_file=resolve(m.config_file) if not m.path else None,
                     path=m.path or None, seed=m.seed, dtype=m.dtype, device=m.device,
                     max_len=m.max_context)
    if m.backend == "onnxruntime":
        from .onnx_backend import load_for_node  # onnxruntime is imported only where selected
        model = load_for_node(spec, m.threads, ros_home)
    else:  # transformers is imported only where the torch backend is selected
        from ..models.hybrid import HybridModel
        model = HybridModel.load(spec)
    if model.live.device.type == "cuda" and m.cuda_graphs:
        # graph-bound execution (restores copy into captured buffers): the lean step where the
        # family has one and its kernels build, else transformers' modules captured
        from ..models.lean import compile_mode_of
        mode = compile_mode_of(m.cuda_step)
        max_chunk = 1 << (m.chunk_size - 1).bit_length()  # appends come in chunk_size pieces
        model.enable_graphs(max_chunk=max_chunk, lean=mode is not None, compile=mode or "none")
    if config.capsules.accept_other_execution:
        model.fingerprint = accepting_other_execution(model.fingerprint)
    caps = config.capsules
    engine = Engine(model, history_depth=caps.history_depth,
                    chunk_size=m.chunk_size, context_policy=caps.context_policy,
                    rebase_window=caps.rebase_window, verify_every=caps.verify_every)
    hidden = model.hidden_size
    encoders = {name: build_encoder(name, dict(spec.encoder), hidden, m.seed,
                                    token_embedding=model.token_embedding(),
                                    tokenizer=model.tokenizer)
                for name, spec in config.inputs.items()}
    heads: dict[str, Head] = {}
    for name, s in config.streams.items():
        head_spec = dict(s.head)
        head_spec["head"] = head_spec.pop("kind", "continuous")
        heads[name] = build_head(head_spec, hidden, m.seed, name=f"head.{name}")
    weights_file = m.policy_weights or (str(policy_weights_path(m.path)) if m.path else "")
    modules = {f"encoders.{k}": v for k, v in encoders.items()}
    # token samplers have no weights (they use the model's own LM head)
    modules.update({f"head.{k}": v for k, v in heads.items() if isinstance(v, torch.nn.Module)})
    loaded = load_policy_weights(modules, resolve(weights_file) if weights_file else None)
    for module in modules.values():
        # on the model's device: images are resized and projected there, not on the CPU
        module.to(model.live.device).eval()
    pipeline = Pipeline(config, engine, encoders, heads, loaded, tokenizer=model.tokenizer)
    open_files(pipeline, node_name, ros_home)
    return pipeline


def open_files(pipeline: Pipeline, node_name: str, ros_home: str | None = None) -> None:
    """Claim this node's capsule directories (refused while another live process owns them),
    set up tier budgets, persistence and reload."""
    caps, engine = pipeline.config.capsules, pipeline.engine
    layout = engine.live.layout
    if not caps.directory:
        if caps.persist_on_commit or caps.reload_at_start:
            raise ValueError("capsules.directory is required for persist_on_commit/reload_at_start")
        configure_tiers(engine, caps, None)
        return
    pipeline.dirs = CapsuleDirs.of(caps.directory, node_name, ros_home)
    pipeline.owner = pipeline.dirs.claim()
    clean_stale_temps(pipeline.dirs.saved)
    # both writers hold off while the worker has a query in hand (capsule.quiet)
    gate = pipeline.scheduler.gate
    configure_tiers(engine, caps, TierFiles(pipeline.dirs.tiers, layout, gate))
    if caps.persist_on_commit or caps.reload_at_start:
        pipeline.persister = Persister(pipeline.dirs.streams, layout, gate=gate)
    if caps.reload_at_start:
        pipeline.reload()


def configure_tiers(engine: Engine, caps: Any, files: TierFiles | None) -> None:
    """Byte budgets per tier, when any is set (0 = unlimited); the file tier is the node's own
    tier directory."""
    mb = lambda v: int(v * 2**20) if v else None  # noqa: E731
    if not (caps.device_budget_mb or caps.host_budget_mb or caps.file_budget_mb):
        return
    engine.configure_tiers(TierConfig(device_bytes=mb(caps.device_budget_mb),
                                      host_bytes=mb(caps.host_budget_mb),
                                      file_bytes=mb(caps.file_budget_mb)), files)


def set_threads(threads: int) -> int:
    """torch's intra-op threads: ``threads``, or (0) every core but one, which is left to the ROS
    executor and the I/O threads (on 2 cores the default of 2 competed with the executor)."""
    n = threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    return n


def persistent_compile_caches(ros_home: str | None = None) -> dict[str, str]:
    """Triton and inductor keep what they compile under ``$ROS_HOME/capsule_ros/`` (unless the
    environment names other places), so a restarted node does not compile again at configure:
    inductor's default lives in /tmp, which a robot's reboot empties."""
    root = Path(ros_home or os.environ.get("ROS_HOME") or Path.home() / ".ros") / "capsule_ros"
    chosen = {}
    for var, sub in (("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        chosen[var] = os.environ.setdefault(var, str(root / sub))
    # Triton's autotuned kernels (mamba-ssm's chunked scan) keep their choice there too: a
    # restarted node runs the configs it tuned before (the same summation order, so a capsule
    # verified after a restart recomputes to the same bits) and does not tune again. Read when
    # the kernels are defined, so before the model (and mamba-ssm) is imported.
    chosen["TRITON_CACHE_AUTOTUNING"] = os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    return chosen
