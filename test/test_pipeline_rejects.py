"""Every rejected input, for every encoder kind, through ``Pipeline.on_message`` / ``query``:
a Failure with the right code, every capsule in the store byte-identical (sha256 of all tensors),
and the context the streams would pair with unchanged."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from capsule_ros.config import from_params
from capsule_ros.models.registry import tiny_config
from capsule_ros.runtime.build import build_pipeline
from capsule_ros.runtime.pipeline import Pipeline
from capsule_ros.runtime.outcome import Answer, Failure
from capsule_ros.status_codes import Code

JOINTS = ["j1", "j2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py




def params() -> dict:
    head = {"kind": "continuous", "horizon": 2, "dof": 2, "step_period": 0.1}
    return {
        "model": {"config_file": str(tiny_config("lfm2")), "seed": 0, "max_context": 256},
        "inputs": {
            "names": ["cam", "joints", "arr", "instr", "cloud"],
            "cam": {"topic": "/cam", "type": "sensor_msgs/msg/Image", "encoder": "image",
                    "resize": [16, 16], "patch": 8, "expect_size": [8, 8],
                    "encodings": ["rgb8", "mono8", "16UC1"]},
            "joints": {"topic": "/js", "type": "sensor_msgs/msg/JointState",
                       "encoder": "joint_state", "joints": JOINTS, "fields": ["position", "velocity"]},
            "arr": {"topic": "/arr", "type": "std_msgs/msg/Float32MultiArray",
                    "encoder": "float_array", "length": 3},
            "instr": {"topic": "/instr", "type": "std_msgs/msg/String", "encoder": "text",
                      "max_tokens": 8},
            "cloud": {"topic": "/cloud", "type": "sensor_msgs/msg/PointCloud2",
                      "encoder": "point_cloud", "tokens": 4},
        },
        "streams": {"names": ["vision", "state"],
                    "vision": {"trigger": "cam", "context": ["joints", "instr", "cloud"], "head": head},
                    "state": {"trigger": "arr", "context": ["joints"], "head": head}},
    }


# ---------------------------------------------------------------- messages

def image(h=8, w=8, encoding="rgb8", step=None, data_len=None):
    bpp = {"rgb8": 3, "mono8": 1, "16UC1": 2, "bgr8": 3}.get(encoding, 3)
    step = w * bpp if step is None else step
    n = step * h if data_len is None else data_len
    return NS(height=h, width=w, encoding=encoding, is_bigendian=0, step=step,
              data=bytes((i * 7) % 256 for i in range(n)))


def joints(names=JOINTS, position=(0.1, 0.2), velocity=(0.0, 0.1)):
    return NS(name=list(names), position=list(position), velocity=list(velocity), effort=[])


def cloud(points, dense=True, datatype=7, data_cut=0):
    fields = [NS(name=n, offset=4 * i, datatype=datatype, count=1) for i, n in enumerate("xyz")]
    data = np.asarray(points, "<f4").view(np.uint8).reshape(-1)
    data = data[:len(data) - data_cut]
    return NS(height=1, width=len(points), fields=fields, is_bigendian=False, point_step=12,
              row_step=12 * len(points), data=data, is_dense=dense)


GOOD_CLOUD = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5], [-1.0, -0.2, 0.1]]

REJECTS = [  # (input, message, code)
    ("cam", image(encoding="bgra8"), Code.BAD_ENCODING),
    ("cam", image(h=6, w=8), Code.BAD_SIZE),                       # not expect_size
    ("cam", image(step=20), Code.BAD_SIZE),                        # step < width * 3
    ("cam", image(data_len=100), Code.BAD_SIZE),                   # data != step * height
    ("cam", image(encoding="16UC1", data_len=127), Code.BAD_SIZE),
    ("joints", joints(names=["j1", "j3"]), Code.MISSING_JOINT),
    ("joints", joints(position=(float("nan"), 0.0)), Code.NON_FINITE),
    ("joints", joints(velocity=(0.0, float("inf"))), Code.NON_FINITE),
    ("joints", joints(position=(0.1,)), Code.BAD_SIZE),            # len(position) != len(name)
    ("arr", NS(data=[1.0, 2.0]), Code.BAD_SIZE),                   # wrong float array length
    ("arr", NS(data=[1.0, float("nan"), 2.0]), Code.NON_FINITE),
    ("arr", NS(data=[1.0, float("-inf"), 2.0]), Code.NON_FINITE),
    ("arr", NS(data=[1e39, 0.0, 0.0]), Code.NON_FINITE),           # beyond float32
    ("instr", NS(data=""), Code.BAD_INPUT),
    ("instr", NS(data="far too many tokens"), Code.BAD_SIZE),
    ("instr", NS(data=b"bytes"), Code.BAD_INPUT),
    ("cloud", cloud(GOOD_CLOUD, datatype=8), Code.BAD_ENCODING),   # float64 x, y, z
    ("cloud", cloud(GOOD_CLOUD, data_cut=4), Code.BAD_SIZE),
    ("cloud", cloud(GOOD_CLOUD + [[np.nan, 0, 0]], dense=True), Code.NON_FINITE),
    ("cloud", cloud([[np.nan, 0, 0]], dense=False), Code.BAD_INPUT),
]


def store_digest(pipe: Pipeline) -> str:
    """sha256 over every capsule of every slot: tensors, metadata, and which capsule is where."""
    h = hashlib.sha256()

    def tensor(t: torch.Tensor) -> None:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    store = pipe.engine.store
    for name in store.list():
        slot = store.slot(name)
        for c in (slot.current, slot.base, *slot.history):
            h.update(f"{name}:{None if c is None else c.id}".encode())
            if c is None:
                continue
            h.update(json.dumps({"pos": c.position, "meta": dict(c.meta)}, sort_keys=True,
                                default=str).encode())
            for seg in c.kv:
                for k in sorted(seg.rows):
                    tensor(seg.rows[k])
            for k in sorted(c.state):
                tensor(c.state[k])
            for k in sorted(c.meta_tensors):
                tensor(c.meta_tensors[k])
            for entry in c.journal:
                tensor(entry.embeds)
    return h.hexdigest()


def pending(pipe: Pipeline) -> dict:
    """The context messages the pipeline holds, per input (a rejected one must not be among them)."""
    return pipe.context.held()


def same_pending(a: dict, b: dict) -> bool:
    return a == b


@pytest.fixture(scope="module")
def pipe():
    p = build_pipeline(from_params(params()))
    out = []
    # boundaries on both streams, and pending context left on both
    for name, msg in (("joints", joints()), ("instr", NS(data="look")), ("cloud", cloud(GOOD_CLOUD)),
                      ("cam", image()), ("arr", NS(data=[1.0, 2.0, 3.0])),
                      ("cam", image(encoding="mono8")), ("arr", NS(data=[0.0, 0.5, 1.0])),
                      ("joints", joints(position=(0.3, 0.4))), ("instr", NS(data="grab it")),
                      ("cloud", cloud(GOOD_CLOUD[:2]))):
        p.on_message(name, msg, 0, out.append)
    assert all(isinstance(o, Answer) for o in out) and len(out) == 4, out
    assert all(p.engine.store.current(s) is not None for s in ("vision", "state"))
    held = p.context.held()
    assert all(len(held[name]) >= 1 for name in ("joints", "instr", "cloud"))
    return p


@pytest.mark.parametrize("input_name,msg,code", REJECTS,
                         ids=[f"{i}-{c.name}-{n}" for n, (i, _, c) in enumerate(REJECTS)])
def test_rejected_input_changes_nothing(pipe, input_name, msg, code):
    digest, before = store_digest(pipe), pending(pipe)
    counters = dict(pipe.engine.counters)
    out = []
    pipe.on_message(input_name, msg, 123, out.append)
    # one status per bad message, naming its input (and its stream when it triggers exactly one)
    assert len(out) == 1 and isinstance(out[0], Failure) and out[0].code == code, out
    assert out[0].input == input_name and out[0].request_id == 0
    triggered = [s.name for s, is_trigger in pipe.config.streams_fed_by(input_name) if is_trigger]
    assert out[0].stream == (triggered[0] if len(triggered) == 1 else "")
    assert store_digest(pipe) == digest
    assert same_pending(pending(pipe), before)
    assert pipe.engine.counters == counters  # no restore, append or commit ran


def test_unknown_stream_query_changes_nothing(pipe):
    digest, before = store_digest(pipe), pending(pipe)
    out = []
    pipe.query("nope", 9, publish=out.append)
    assert [(o.stream, o.request_id, o.code) for o in out] == [("nope", 9, Code.UNKNOWN_STREAM)]
    assert store_digest(pipe) == digest and same_pending(pending(pipe), before)


def test_good_input_after_rejections_still_answers(pipe):
    digest = store_digest(pipe)
    out = []
    pipe.on_message("arr", NS(data=[0.1, 0.2, 0.3]), 0, out.append)
    assert len(out) == 1 and isinstance(out[0], Answer) and out[0].request_id > 2
    assert store_digest(pipe) != digest  # the digest does see a commit


def test_a_query_instruction_goes_through_the_text_input_and_is_appended():
    p = build_pipeline(from_params(params()))
    out = []
    p.on_message("arr", NS(data=[0.1, 0.2, 0.3]), 0, out.append)   # a first boundary on "state"
    before = p.engine.store.position("state")
    p.query("state", 5, instruction="grab", receive_ns=1, publish=out.append)
    answer = out[-1]
    assert isinstance(answer, Answer) and answer.request_id == 5
    # "grab" is 4 bytes: the byte-level fallback makes 4 tokens, and nothing else was new
    assert p.engine.store.position("state") == before + 4
    p.query("state", 6, instruction="far too many tokens", receive_ns=2, publish=out.append)
    assert (out[-1].request_id, out[-1].code) == (6, Code.BAD_SIZE)


def test_a_forked_stream_is_queried_with_an_input_and_unknown_names_are_cut_short():
    p = build_pipeline(from_params(params()))
    out = []
    p.on_message("arr", NS(data=[0.1, 0.2, 0.3]), 10, out.append)
    p.fork("state", "what_if")
    p.query("what_if", publish=out.append, receive_ns=20)
    assert out[-1].code == Code.NO_OBSERVATION     # no trigger, no context: name an input
    p.query("what_if", input_name="arr", receive_ns=20, publish=out.append)
    assert isinstance(out[-1], Answer) and out[-1].stream == "what_if"
    assert out[-1].position == p.engine.store.position("state") + 1  # the newest "arr" message
    name = "x" * 5000
    p.query(name, publish=out.append)
    assert out[-1].code == Code.UNKNOWN_STREAM and len(out[-1].text) < 300


def test_a_trigger_frame_is_checked_on_arrival_and_encoded_only_when_answered():
    """A trigger-only image: its header is checked in the callback (a bad one is refused there,
    one status), the pixels are encoded when the worker takes the job, so frames superseded
    while they waited are never encoded."""
    p = build_pipeline(from_params(params()))
    encoder = p.encoders["cam"]
    encoded, real = [], encoder.encode
    encoder.encode = lambda msg: encoded.append(msg) or real(msg)
    out: list = []
    p.on_message("cam", image(encoding="bgr8"), 1, publish=out.append)   # not an allowed encoding
    assert [(o.code, o.input) for o in out] == [(Code.BAD_ENCODING, "cam")] and encoded == []
    p.on_message("cam", image(), 10)          # queued (nothing drains without a publish)
    p.on_message("cam", image(), 11)          # supersedes the one at 10
    last = image()
    p.on_message("cam", last, 12, publish=out.append)   # supersedes 11, then the queue drains
    answers = [o for o in out if isinstance(o, Answer)]
    assert [a.stamp_ns for a in answers] == [12] and answers[0].dropped == 2
    assert encoded == [last]                  # the superseded frames were never encoded
    acc = p.scheduler.accounting()["vision"]
    assert (acc["received"], acc["rejected"], acc["superseded"], acc["answered"]) == (4, 1, 2, 1)
    p.close()
