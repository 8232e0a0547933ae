"""The ONNX Runtime backend under the same capsule engine (ONNX Runtime's CPU wheel, tiny configs).

Every exportable family's step is exported once per test session (a temp dir); the torch backend
(transformers' modules, eager) is the independent reference:
* greedy tokens over 16 steps from the same capsule equal the torch backend's;
* on the ONNX backend: restore after dirtying, then decode, equals the cold run bit for bit; a
  KV-only restore diverges; fork, rollback and rebase equal their cold runs; a capsule saved by one model
  instance and loaded by another is byte-identical and continues identically;
* a capsule from another execution path is refused (the part named), and accepted only when the
  node accepts other paths; mismatched export directories are refused with the part named;
* granitemoehybrid does not export, and is refused at load with the reason;
* the bundled bag through ``build_pipeline`` on ``backend: onnxruntime`` answers every trigger
  as the torch backend does.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

from capsule_ros.capsule.execution import accepting_other_execution  # noqa: E402
from capsule_ros.capsule.files import encode_capsule, load_capsule, save_capsule  # noqa: E402
from capsule_ros.export.manifest import FINGERPRINT, LAYOUT, NOT_EXPORTABLE  # noqa: E402
from capsule_ros.models import FAMILIES, HybridModel, ModelLoadError, ModelSpec  # noqa: E402
from capsule_ros.models.registry import tiny_config  # noqa: E402
from capsule_ros.runtime.engine import Engine  # noqa: E402
from capsule_ros.runtime.onnx_backend import OnnxModel, load_for_node  # noqa: E402
from capsule_ros.status_codes import CapsuleRosError  # noqa: E402

MAX_LEN, CHUNK, PROMPT, STEPS = 128, 8, 20, 16
EXPORTABLE = sorted(set(FAMILIES) - set(NOT_EXPORTABLE))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(family: str) -> ModelSpec:
    return ModelSpec(config_file=str(tiny_config(family)), seed=0, max_len=MAX_LEN)


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, Path]:
    """family -> its export directory, made once per session (the cached exports)."""
    from capsule_ros.export.onnx_export import export_model
    root = tmp_path_factory.mktemp("onnx_exports")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for family in EXPORTABLE:
            export_model(_spec(family), root / family)
    finally:
        torch.set_num_threads(before)
    return {f: root / f for f in EXPORTABLE}


def _onnx(exports: dict[str, Path], family: str) -> OnnxModel:
    return OnnxModel.load(exports[family], MAX_LEN, threads=1)


def _prompt(model, n: int = PROMPT, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed))
    return model.embed_tokens(ids)


def _greedy(engine: Engine, hidden: torch.Tensor, steps: int = STEPS) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode within the pending query (tokens fed back through ``engine.extend``)."""
    model, tokens, hiddens = engine.model, [], []
    for _ in range(steps):
        tok = int(model.logits(hidden).argmax())
        tokens.append(tok)
        hidden = engine.extend(model.embed_tokens([tok]))[-1]
        hiddens.append(hidden.clone())
    return tokens, hiddens


def _query_decode(engine: Engine, stream: str, embeds: torch.Tensor, steps: int = STEPS):
    result = engine.query(stream, embeds, act=lambda h: h.clone())
    out = _greedy(engine, result.output, steps)
    engine.commit()
    return result.output, out


# -- across backends -----------------------------------------------------------------------------
def _torch_capsule(family: str):
    """The torch backend's model, engine and the boundary of stream "s" after the prompt."""
    torch_model = HybridModel.load(_spec(family))
    te = Engine(torch_model, chunk_size=CHUNK)
    te.add_stream("s")
    te.query("s", _prompt(torch_model), act=lambda h: h)
    te.commit()
    return torch_model, te, te.boundary("s")


@pytest.mark.parametrize("family", EXPORTABLE)
def test_greedy_tokens_equal_torch_backend_from_the_same_capsule(exports, family):
    torch_model, te, capsule = _torch_capsule(family)
    ref_hidden, (ref_tokens, _) = _query_decode(te, "s", torch_model.embed_tokens([7]))

    onnx_model = _onnx(exports, family)
    onnx_model.fingerprint = accepting_other_execution(onnx_model.fingerprint)
    oe = Engine(onnx_model, chunk_size=CHUNK)
    oe.install("s", capsule)
    hidden, (tokens, _) = _query_decode(oe, "s", onnx_model.embed_tokens([7]))
    assert tokens == ref_tokens
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
    # the capsule it commits carries what the torch backend would: same meta, same buffers
    assert oe.boundary("s").meta == te.boundary("s").meta


def test_capsule_from_another_execution_path_is_refused_unless_accepted(exports):
    family = "qwen3_5_text"
    _, te, capsule = _torch_capsule(family)
    assert capsule.fingerprint.execution == "eager"

    strict = Engine(_onnx(exports, family), chunk_size=CHUNK)
    with pytest.raises(CapsuleRosError, match=r"differs in execution$"):
        strict.install("s", capsule)
    assert "s" not in strict.store

    lenient_model = _onnx(exports, family)
    lenient_model.fingerprint = accepting_other_execution(lenient_model.fingerprint)
    lenient = Engine(lenient_model, chunk_size=CHUNK)
    lenient.install("s", capsule)
    assert lenient.restore("s")
    assert lenient_model.position == PROMPT
    # what it commits from there is stamped with its own path
    lenient.query("s", lenient_model.embed_tokens([5]), act=lambda h: h)
    lenient.commit()
    assert lenient.boundary("s").fingerprint.execution == "onnxruntime-cpu"
    # the other way round too: the torch backend refuses the ONNX capsule by default
    with pytest.raises(CapsuleRosError, match="execution"):
        te.install("t", lenient.boundary("s"))
    # a capsule of another model stays refused even when other paths are accepted
    other = Engine(_onnx(exports, "bamba"), chunk_size=CHUNK)
    with pytest.raises(CapsuleRosError, match="weights"):
        lenient.install("x", other.empty)


# -- on the ONNX backend ----------------------------------------------------------------------
@pytest.mark.parametrize("family", EXPORTABLE)
def test_restore_after_dirtying_equals_cold_run_bit_exact(exports, family):
    model = _onnx(exports, family)
    engine = Engine(model, chunk_size=CHUNK)
    engine.add_stream("cold")
    engine.add_stream("warm")
    prompt, more = _prompt(model), _prompt(model, 5, seed=2)
    # cold: one query of prompt + more, then decode
    _, (cold_tokens, cold_hidden) = _query_decode(engine, "cold", torch.cat([prompt, more]))
    # warm: prompt committed, the live buffers dirtied, then more restored onto and decoded
    engine.query("warm", prompt, act=lambda h: h)
    engine.commit()
    model.live.scrub()
    engine.invalidate()
    _, (warm_tokens, warm_hidden) = _query_decode(engine, "warm", more)
    assert warm_tokens == cold_tokens
    for a, b in zip(warm_hidden, cold_hidden):
        assert torch.equal(a, b)
    cold, warm = engine.boundary("cold"), engine.boundary("warm")
    for key in cold.state:
        assert torch.equal(cold.state[key], warm.state[key])


@pytest.mark.parametrize("family", ["qwen3_5_text", "bamba", "lfm2"])
def test_kv_only_restore_diverges(exports, family):
    model = _onnx(exports, family)
    engine = Engine(model, chunk_size=CHUNK)
    engine.add_stream("s")
    engine.query("s", _prompt(model), act=lambda h: h)
    engine.commit()
    capsule = engine.boundary("s")
    _, (_, ref_hidden) = _query_decode(engine, "s", _prompt(model, 3, seed=3), steps=4)
    # KV rows only: the conv/recurrent state keeps the scrubbed bytes
    model.live.scrub()
    for key, region in model.live.kv_regions().items():
        region[:capsule.position].copy_(capsule.kv_rows(key))
    model.write_meta(dict(capsule.meta))
    hidden = model.forward(_prompt(model, 3, seed=3))
    for _ in range(3):
        hidden = model.forward(model.embed_tokens([int(model.logits(hidden[-1]).argmax())]))
    assert not torch.equal(hidden[-1], ref_hidden[-1])


def test_fork_and_rollback_equal_their_cold_runs(exports):
    model = _onnx(exports, "qwen3_5_text")
    engine = Engine(model, chunk_size=CHUNK)
    a, b, c = _prompt(model, 9, 1), _prompt(model, 7, 2), _prompt(model, 5, 3)
    engine.add_stream("cold_ab")
    _, (cold_ab, _) = _query_decode(engine, "cold_ab", torch.cat([a, b]), steps=6)
    engine.add_stream("cold_ac")
    _, (cold_ac, _) = _query_decode(engine, "cold_ac", torch.cat([a, c]), steps=6)

    engine.add_stream("s")
    engine.query("s", a, act=lambda h: h)
    engine.commit()
    engine.fork("s", "f")
    _, (fork_b, _) = _query_decode(engine, "f", b, steps=6)
    assert fork_b == cold_ab
    _, (first_c, _) = _query_decode(engine, "s", c, steps=6)
    assert first_c == cold_ac
    engine.rollback("s", 1)
    _, (again_c, _) = _query_decode(engine, "s", c, steps=6)
    assert again_c == first_c == cold_ac


def test_rebase_equals_its_cold_run(exports):
    from capsule_ros.status_codes import Code
    model = _onnx(exports, "lfm2")
    engine = Engine(model, chunk_size=CHUNK, context_policy="rebase", rebase_window=2)
    q = [_prompt(model, 40, seed) for seed in range(4)]
    engine.add_stream("s")
    for emb in q[:3]:
        engine.query("s", emb, act=lambda h: h)
        engine.commit()
    result = engine.query("s", q[3], act=lambda h: h.clone())  # 120 + 40 > 128: rebase
    engine.commit()
    assert [code for code, _ in result.events] == [Code.CONTEXT_REBASED]
    engine.add_stream("cold")  # the base (empty) + the last two observations + the new one
    for emb in q[1:3]:
        engine.query("cold", emb, act=lambda h: h)
        engine.commit()
    cold = engine.query("cold", q[3], act=lambda h: h.clone())
    engine.commit()
    assert result.position == cold.position == 120
    assert torch.equal(result.output, cold.output)
    a, b = engine.boundary("s"), engine.boundary("cold")
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_saved_capsule_loads_byte_identical_on_another_instance(exports, tmp_path):
    family = "bamba"
    first = _onnx(exports, family)
    e1 = Engine(first, chunk_size=CHUNK)
    e1.add_stream("s")
    e1.query("s", _prompt(first), act=lambda h: h)
    e1.commit()
    capsule = e1.boundary("s")
    path = save_capsule(capsule, tmp_path, "s", first.live.layout)

    second = _onnx(exports, family)  # another "node": its own session and live buffers
    loaded = load_capsule(path, second.fingerprint, second.live.layout)
    assert encode_capsule(loaded, second.live.layout) == path.read_bytes()
    e2 = Engine(second, chunk_size=CHUNK)
    e2.install("s", loaded)
    _, (t1, h1) = _query_decode(e1, "s", _prompt(first, 4, 5), steps=5)
    _, (t2, h2) = _query_decode(e2, "s", _prompt(second, 4, 5), steps=5)
    assert t1 == t2 and all(torch.equal(x, y) for x, y in zip(h1, h2))


# -- refusals -----------------------------------------------------------------------------------
def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_mismatched_export_pair_refused_with_the_part_named(exports, tmp_path):
    src = exports["qwen3_5_text"]
    # fingerprint.json naming another layout than layout.json
    d = _copy(src, tmp_path / "layout")
    fp = json.loads((d / FINGERPRINT).read_text())
    fp["layout"] = "0" * 16
    (d / FINGERPRINT).write_text(json.dumps(fp))
    with pytest.raises(ModelLoadError, match="differs in layout"):
        OnnxModel.load(d, MAX_LEN)
    # the graph of another model under this fingerprint
    d = _copy(src, tmp_path / "weights")
    shutil.copy(exports["lfm2"] / "decode.onnx", d / "decode.onnx")
    with pytest.raises(ModelLoadError, match="differs in weights"):
        OnnxModel.load(d, MAX_LEN)
    # layout and fingerprint rewritten together to other widths: the graph's inputs disagree
    d = _copy(src, tmp_path / "graph")
    lay = json.loads((d / LAYOUT).read_text())
    lay["buffers"] = [b for b in lay["buffers"] if b["kind"] != "recurrent"]
    (d / LAYOUT).write_text(json.dumps(lay))
    from capsule_ros.export.manifest import layout_from_dict
    fp = json.loads((d / FINGERPRINT).read_text())
    fp["layout"] = layout_from_dict(lay).digest()
    (d / FINGERPRINT).write_text(json.dumps(fp))
    with pytest.raises(ModelLoadError, match="differ in layout"):
        OnnxModel.load(d, MAX_LEN)


def test_configured_model_against_another_export_is_refused(exports, tmp_path):
    """The node's export cache holding another model's export (e.g. weights changed): refused."""
    from capsule_ros.runtime.onnx_backend import _weights_id, default_export_dir
    spec = _spec("qwen3_5_text")
    root = default_export_dir(_weights_id(spec), spec.dtype, str(tmp_path))
    shutil.copytree(exports["bamba"], root)
    with pytest.raises(ModelLoadError, match="differs in weights"):
        load_for_node(spec, threads=1, ros_home=str(tmp_path))


def test_family_that_does_not_export_is_refused_with_the_reason(tmp_path):
    from capsule_ros.export.onnx_export import StepModule, _export_graph
    family = "granitemoehybrid"
    with pytest.raises(ModelLoadError, match=f"{family} does not export to ONNX: .*grouped_mm"):
        load_for_node(_spec(family), threads=1, ros_home=str(tmp_path))
    # the refusal is what the exporter really does with it, not a guess
    step = StepModule(HybridModel.load(_spec(family))).eval()
    with pytest.raises(Exception, match="grouped_mm_fallback"):
        _export_graph(step, 1, tmp_path / "g.onnx", 64)


# -- the node's query path on the bundled bag ---------------------------------------------------
def test_bundled_bag_answers_on_onnxruntime_as_on_torch(default_params, demo_bag, tmp_path):
    from capsule_ros.config import load_yaml
    from capsule_ros.offline import run_offline
    from capsule_ros.runtime.build import build_pipeline
    from capsule_ros.runtime.outcome import Answer

    config = load_yaml(default_params)
    ref_pipeline = build_pipeline(config)
    ref = run_offline(config, demo_bag, ref_pipeline)
    onnx_config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, backend="onnxruntime"),
        capsules=dataclasses.replace(config.capsules, accept_other_execution=True))
    pipeline = build_pipeline(onnx_config, ros_home=str(tmp_path))  # exports the default model once
    assert pipeline.engine.model.execution == "onnxruntime-cpu"
    got = run_offline(onnx_config, demo_bag, pipeline)
    assert ref and all(isinstance(o, Answer) for o in ref)
    assert [type(o) for o in got] == [type(o) for o in ref]
    for a, b in zip(got, ref):
        assert (a.stream, a.position, a.seq) == (b.stream, b.position, b.seq)
        torch.testing.assert_close(torch.as_tensor(a.actions), torch.as_tensor(b.actions),
                                   atol=1e-4, rtol=1e-4)
    # capsules.accept_other_execution, as build_pipeline wires it: this node takes the torch
    # node's boundary; the torch node (default: refuse) does not take this one's
    stream = ref[-1].stream
    pipeline.engine.install("from_torch", ref_pipeline.engine.boundary(stream))
    assert pipeline.engine.restore("from_torch") and pipeline.engine.model.position == ref[-1].position
    with pytest.raises(CapsuleRosError, match="differs in execution"):
        ref_pipeline.engine.install("from_onnx", pipeline.engine.boundary(stream))


# -- the append step (bamba: its chunked scan exports quickly) ------------------------------------
@pytest.fixture(scope="session")
def bamba_append(tmp_path_factory) -> Path:
    from capsule_ros.export.onnx_export import export_model
    root = tmp_path_factory.mktemp("onnx_append") / "bamba"
    manifest = export_model(_spec("bamba"), root, append_chunk=CHUNK)
    assert manifest["graphs"]["append"]["tokens"] == CHUNK, manifest["append"]
    return root


def test_append_step_matches_torch_and_cold_runs_on_chunk_aligned_boundaries(bamba_append):
    model = OnnxModel.load(bamba_append, MAX_LEN, threads=1)
    assert model.append_tokens == CHUNK
    torch_model = HybridModel.load(_spec("bamba"))
    prompt, more = _prompt(model, 2 * CHUNK, 1), _prompt(model, CHUNK, 2)
    te = Engine(torch_model, chunk_size=CHUNK)
    te.add_stream("s")
    ref_hidden, (ref_tokens, _) = _query_decode(te, "s", torch.cat([prompt, more]))

    engine = Engine(model, chunk_size=CHUNK)
    engine.add_stream("cold")
    cold_hidden, (cold_tokens, cold_steps) = _query_decode(engine, "cold", torch.cat([prompt, more]))
    assert cold_tokens == ref_tokens
    torch.testing.assert_close(cold_hidden, ref_hidden, atol=1e-4, rtol=1e-4)
    engine.add_stream("warm")
    engine.query("warm", prompt, act=lambda h: h)
    engine.commit()
    model.live.scrub()
    engine.invalidate()
    warm_hidden, (warm_tokens, warm_steps) = _query_decode(engine, "warm", more)
    assert torch.equal(warm_hidden, cold_hidden) and warm_tokens == cold_tokens
    assert all(torch.equal(a, b) for a, b in zip(warm_steps, cold_steps))


NO_TRANSFORMERS = r"""
import sys
sys.modules["transformers"] = None   # any import of transformers raises ImportError
from types import SimpleNamespace as NS
from capsule_ros.config import from_params
from capsule_ros.runtime.build import build_pipeline
params = {"model": {"backend": "onnxruntime", "path": sys.argv[1], "max_context": 64},
          "inputs": {"names": ["arr"], "arr": {"topic": "/arr", "type": "std_msgs/msg/Float32MultiArray",
                                               "encoder": "float_array", "length": 3}},
          "streams": {"names": ["s"], "s": {"trigger": "arr",
                      "head": {"kind": "continuous", "horizon": 2, "dof": 2, "step_period": 0.1}}}}
pipeline = build_pipeline(from_params(params))
out = []
for k in range(3):
    pipeline.on_message("arr", NS(data=[0.1 * k, 0.2, 0.3]), k, out.append)
print(" ".join(type(o).__name__ for o in out), pipeline.engine.model.execution)
"""


def test_an_exported_model_runs_with_no_transformers_at_all(exports):
    """Exported once, run without transformers: the child cannot import it and still answers."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-P", "-c", NO_TRANSFORMERS, str(exports["bamba"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Answer", "Answer", "Answer", "onnxruntime-cpu"]


@pytest.mark.ros
def test_the_managed_node_answers_on_the_onnx_backend(exports, ros, default_params):
    """The node as a robot runs it (lifecycle, best-effort camera and joint states), with
    ``model.backend: onnxruntime`` and ``model.path`` naming an export."""
    from rclpy.parameter import Parameter

    from rosutil import activate, wait_matched
    from test_lifecycle import Rig
    rig = Rig(ros, default_params, overrides=[
        Parameter("model.backend", value="onnxruntime"),
        Parameter("model.path", value=str(exports["bamba"]))])
    try:
        activate(rig.node)
        assert rig.node.pipeline.engine.model.execution == "onnxruntime-cpu"
        wait_matched(rig.ex, rig.client, publishers=[rig.cam, rig.joints])
        for k in range(2):
            rig.observe(k)
        assert [a.request_id for a in rig.actions] == [1, 2] and rig.statuses == []
        assert rig.actions[1].boundary > rig.actions[0].boundary
    finally:
        rig.close()
