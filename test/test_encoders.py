"""Observation encoders: golden shapes, every rejection with its code, determinism, message kinds."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from capsule_ros.policy.encoders import build_encoder
from capsule_ros.status_codes import CapsuleRosError, Code

HIDDEN = 16
ROOT = Path(__file__).resolve().parents[1]
JOINTS = ["shoulder", "elbow", "wrist"]


def image(pixels: np.ndarray, encoding: str, step_pad: int = 0, bigendian: bool = False) -> NS:
    """A duck-typed sensor_msgs/Image (rosbags style: data is a numpy uint8 array)."""
    h, w = pixels.shape[:2]
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(">u2" if bigendian else "<u2")
    rows = pixels.reshape(h, -1).view(np.uint8)
    rows = np.concatenate([rows, np.zeros((h, step_pad), np.uint8)], axis=1)
    return NS(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian),
              step=rows.shape[1], data=rows.reshape(-1).copy())


def joint_state(names=JOINTS, position=(0.1, 0.2, 0.3), velocity=(), effort=()) -> NS:
    return NS(name=list(names), position=np.asarray(position, float),
              velocity=np.asarray(velocity, float), effort=np.asarray(effort, float))


def rgb_picture(h=24, w=40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def rejects(code: Code, enc, msg) -> None:
    with pytest.raises(CapsuleRosError) as err:
        enc.encode(msg)
    assert err.value.code == code, err.value


@pytest.fixture
def img_enc():
    return build_encoder("cam", {"encoder": "image", "resize": [16, 24], "patch": 8}, HIDDEN, seed=3)


@pytest.fixture
def table():
    torch.manual_seed(0)
    return torch.nn.Embedding(300, HIDDEN)


# ---------------------------------------------------------------- status codes

def test_codes_match_status_msg():
    text = (ROOT / "msg" / "Status.msg").read_text()
    declared = {m[0]: int(m[1]) for m in re.findall(r"^\s*uint\d+\s+([A-Z_]+)\s*=\s*(\d+)", text, re.M)}
    assert declared == {c.name: int(c) for c in Code}
    err = CapsuleRosError(Code.BAD_SIZE, "x")
    assert err.code is Code.BAD_SIZE and err.text == "x" and "BAD_SIZE" in str(err)


# ---------------------------------------------------------------- golden shapes

def test_image_shapes_all_encodings(img_enc):
    pic = rgb_picture()
    msgs = {
        "rgb8": image(pic, "rgb8"),
        "bgr8": image(pic[..., ::-1].copy(), "bgr8"),
        "rgba8": image(np.dstack([pic, np.full(pic.shape[:2], 7, np.uint8)]), "rgba8"),
        "mono8": image(pic[..., 0].copy(), "mono8"),
        "16UC1": image(np.full((24, 40), 1500, np.uint16), "16UC1"),
    }
    assert img_enc.num_tokens == (16 // 8) * (24 // 8) and img_enc.kind == "image"
    for enc_name, msg in msgs.items():
        out = img_enc.encode(msg)
        assert out.shape == (6, HIDDEN) and out.dtype == torch.float32, enc_name
    # colour conversions: same picture, same embedding
    assert torch.equal(img_enc.encode(msgs["rgb8"]), img_enc.encode(msgs["bgr8"]))
    assert torch.equal(img_enc.encode(msgs["rgb8"]), img_enc.encode(msgs["rgba8"]))


def test_mono_only_encoder_has_one_channel_and_depth_scale():
    enc = build_encoder("depth", {"encoder": "image", "encodings": ["16UC1"], "resize": [8, 8]}, HIDDEN, 0)
    assert enc.channels == 1 and enc.num_tokens == 1
    depth = np.full((8, 8), 2000, np.uint16)
    feats = enc.features(image(depth, "16UC1"))
    assert feats.shape == (1, 8, 8) and torch.allclose(feats, torch.full((1, 8, 8), 2.0))
    # big-endian data decodes to the same metres; row padding (step > width*2) is skipped
    assert torch.equal(feats, enc.features(image(depth, "16UC1", step_pad=6, bigendian=True)))


def test_joint_float_text_shapes(table):
    js = build_encoder("joints", {"encoder": "joint_state", "joints": JOINTS,
                                  "fields": ["position", "velocity"]}, HIDDEN, 0)
    out = js.encode(joint_state(names=["elbow", "shoulder", "wrist"], velocity=(1, 2, 3)))
    assert out.shape == (1, HIDDEN) and js.num_tokens == 1
    # matched by name, joint-major features
    assert js.features(joint_state(names=["elbow", "shoulder", "wrist"], velocity=(1, 2, 3))).tolist() == \
        [[pytest.approx(0.2), 2, pytest.approx(0.1), 1, pytest.approx(0.3), 3]]
    fa = build_encoder("ft", {"encoder": "float_array", "length": 6, "tokens": 2}, HIDDEN, 0)
    assert fa.encode(NS(data=np.arange(6, dtype=np.float32))).shape == (2, HIDDEN)
    tx = build_encoder("instr", {"encoder": "text"}, HIDDEN, 0, token_embedding=table)
    assert tx.num_tokens is None
    assert tx.encode(NS(data="pick up the cup")).shape == (15, HIDDEN)
    # byte fallback embeds exactly the model's table rows; bytes beyond the vocab are clipped
    small = torch.nn.Embedding(100, HIDDEN)
    tx2 = build_encoder("instr", {"encoder": "text", "byte_offset": 3}, HIDDEN, 0, token_embedding=small)
    assert tx2.token_ids(NS(data="A\u00e9")) == [65 + 3, 99, 99]
    assert torch.equal(tx2.encode(NS(data="A")), small.weight[[68]].detach())


def test_text_with_tokenizer(table):
    class Tok:  # the HF call convention: tokenizer(text, add_special_tokens=False)["input_ids"]
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [len(w) for w in text.split()]}

    tx = build_encoder("instr", {"encoder": "text"}, HIDDEN, 0, token_embedding=table, tokenizer=Tok())
    assert tx.token_ids(NS(data="go to bed")) == [2, 2, 3]
    assert tx.encode(NS(data="go to bed")).shape == (3, HIDDEN)


def test_text_with_real_hf_tokenizer(table):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "pick": 1, "up": 2, "cup": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tx = build_encoder("instr", {"encoder": "text"}, HIDDEN, 0, token_embedding=table, tokenizer=tok)
    assert tx.token_ids(NS(data="pick up the cup")) == [1, 2, 0, 3]
    assert torch.equal(tx.encode(NS(data="pick up cup")), table.weight[[1, 2, 3]].detach())
    small = torch.nn.Embedding(3, HIDDEN)  # tokenizer ids beyond the model's table: a mismatch
    rejects(Code.INTERNAL, build_encoder("i", {"encoder": "text"}, HIDDEN, 0, small, tok), NS(data="cup"))


def _cloud(points: np.ndarray, dense: bool = True, pad: int = 4) -> NS:
    fields = [NS(name=n, offset=4 * i, datatype=7, count=1) for i, n in enumerate("xyz")]
    step = 12 + pad
    rows = np.zeros((len(points), step), np.uint8)
    rows[:, :12] = points.astype("<f4").view(np.uint8).reshape(len(points), 12)
    return NS(height=1, width=len(points), fields=fields, is_bigendian=False, point_step=step,
              row_step=step * len(points), data=rows.reshape(-1), is_dense=dense)


def test_point_cloud_pooling():
    enc = build_encoder("lidar", {"encoder": "point_cloud", "tokens": 4}, HIDDEN, 0)
    pts = np.array([[1, 0.1, 0], [3, -0.1, 1], [-2, 0.1, 0], [np.nan, 0, 0]], np.float32)
    assert enc.encode(_cloud(pts, dense=False)).shape == (4, HIDDEN)
    feats = enc.features(_cloud(pts, dense=False))
    # sectors of 90 degrees from -pi: x>0 near 0 rad -> sectors 1 (just below 0) and 2; x<0 -> 3
    assert feats[:, 4].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert feats[2, 0].item() == pytest.approx(1.0) and feats[0].abs().sum() == 0
    rejects(Code.NON_FINITE, enc, _cloud(pts, dense=True))
    rejects(Code.BAD_INPUT, enc, _cloud(pts[3:], dense=False))
    bad = _cloud(pts[:3])
    bad.data = bad.data[:-1]
    rejects(Code.BAD_SIZE, enc, bad)


# ---------------------------------------------------------------- rejections

def test_image_rejections(img_enc):
    pic = rgb_picture()
    rejects(Code.BAD_ENCODING, img_enc, image(pic, "yuv422"))
    only_rgb = build_encoder("cam", {"encoder": "image", "encodings": ["rgb8"], "resize": [8, 8]}, HIDDEN, 0)
    rejects(Code.BAD_ENCODING, only_rgb, image(pic[..., 0].copy(), "mono8"))
    msg = image(pic, "rgb8")
    msg.step = 40 * 3 - 1
    rejects(Code.BAD_SIZE, img_enc, msg)                  # step < width * 3
    msg = image(pic, "rgb8")
    msg.data = msg.data[:-1]
    rejects(Code.BAD_SIZE, img_enc, msg)                  # data length != step * height
    msg = image(pic, "rgb8")
    msg.height = 0
    rejects(Code.BAD_SIZE, img_enc, msg)
    sized = build_encoder("cam", {"encoder": "image", "expect_size": [48, 64]}, HIDDEN, 0)
    rejects(Code.BAD_SIZE, sized, image(pic, "rgb8"))     # expect_size mismatch
    rejects(Code.BAD_INPUT, img_enc, NS(data="not an image"))


def test_joint_rejections():
    enc = build_encoder("joints", {"encoder": "joint_state", "joints": JOINTS}, HIDDEN, 0)
    rejects(Code.MISSING_JOINT, enc, joint_state(names=["shoulder", "elbow", "gripper"]))
    rejects(Code.BAD_SIZE, enc, joint_state(position=(0.1, 0.2)))
    rejects(Code.NON_FINITE, enc, joint_state(position=(0.1, np.nan, 0.3)))
    rejects(Code.NON_FINITE, enc, joint_state(position=(0.1, 0.2, np.inf)))
    with_vel = build_encoder("joints", {"encoder": "joint_state", "joints": JOINTS,
                                        "fields": ["position", "velocity"]}, HIDDEN, 0)
    rejects(Code.BAD_SIZE, with_vel, joint_state())       # velocity configured but empty
    # NaN on a joint the encoder does not use is not its business
    assert enc.encode(joint_state(names=JOINTS + ["other"], position=(0, 0, 0, np.nan))).shape == (1, HIDDEN)


def test_float_and_text_rejections(table):
    fa = build_encoder("ft", {"encoder": "float_array", "length": 3}, HIDDEN, 0)
    rejects(Code.BAD_SIZE, fa, NS(data=np.zeros(4, np.float32)))
    rejects(Code.NON_FINITE, fa, NS(data=np.array([0, np.nan, 0], np.float32)))
    rejects(Code.NON_FINITE, fa, NS(data=np.array([0, -np.inf, 0], np.float32)))
    rejects(Code.NON_FINITE, fa, NS(data=[0.0, 1e300, 0.0]))  # overflows float32
    tx = build_encoder("instr", {"encoder": "text", "max_tokens": 4}, HIDDEN, 0, token_embedding=table)
    rejects(Code.BAD_INPUT, tx, NS(data=""))
    rejects(Code.BAD_SIZE, tx, NS(data="too long"))


def test_bad_config_is_value_error(table):
    with pytest.raises(ValueError):
        build_encoder("x", {"encoder": "sonar"}, HIDDEN, 0)
    with pytest.raises(ValueError):
        build_encoder("x", {"encoder": "image", "resize": [30, 30], "patch": 8}, HIDDEN, 0)
    with pytest.raises(ValueError):
        build_encoder("x", {"encoder": "text"}, HIDDEN, 0)


# ---------------------------------------------------------------- determinism and side effects

def test_same_seed_same_weights_and_global_rng_untouched():
    spec = {"encoder": "image", "resize": [16, 16]}
    before = torch.get_rng_state()
    a, b = build_encoder("cam", spec, HIDDEN, 5), build_encoder("cam", spec, HIDDEN, 5)
    assert torch.equal(torch.get_rng_state(), before)
    msg = image(rgb_picture(), "rgb8")
    assert torch.equal(a.encode(msg), b.encode(msg))
    assert not torch.equal(a.encode(msg), build_encoder("cam", spec, HIDDEN, 6).encode(msg))
    assert not torch.equal(a.encode(msg), build_encoder("cam2", spec, HIDDEN, 5).encode(msg))


# ---------------------------------------------------------------- real rclpy messages

def test_rclpy_messages_match_duck_typed(img_enc, table):
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float32MultiArray, String

    pic = rgb_picture()
    ref = image(pic, "bgr8")
    ros_img = Image(height=ref.height, width=ref.width, encoding="bgr8", step=ref.step,
                    data=ref.data.tobytes())
    assert torch.equal(img_enc.encode(ros_img), img_enc.encode(ref))
    ros_img.data = ros_img.data[:-3]  # array.array from rclpy
    rejects(Code.BAD_SIZE, img_enc, ros_img)

    js = build_encoder("joints", {"encoder": "joint_state", "joints": JOINTS}, HIDDEN, 0)
    ros_js = JointState(name=JOINTS, position=[0.1, 0.2, 0.3])
    assert torch.equal(js.encode(ros_js), js.encode(joint_state()))
    ros_js.name = ["shoulder", "elbow"]
    ros_js.position = [0.1, 0.2]
    rejects(Code.MISSING_JOINT, js, ros_js)

    fa = build_encoder("ft", {"encoder": "float_array", "length": 3}, HIDDEN, 0)
    assert fa.encode(Float32MultiArray(data=[1.0, 2.0, 3.0])).shape == (1, HIDDEN)
    rejects(Code.NON_FINITE, fa, Float32MultiArray(data=[1.0, float("nan"), 3.0]))
    tx = build_encoder("instr", {"encoder": "text"}, HIDDEN, 0, token_embedding=table)
    assert torch.equal(tx.encode(String(data="hi")), tx.encode(NS(data="hi")))


def test_rclpy_point_cloud():
    from sensor_msgs.msg import PointCloud2, PointField

    pts = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0]], np.float32)
    ref = _cloud(pts, pad=0)
    msg = PointCloud2(height=1, width=3, is_bigendian=False, point_step=12, row_step=36,
                      is_dense=True, data=ref.data.tobytes(),
                      fields=[PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                              for i, n in enumerate("xyz")])
    enc = build_encoder("lidar", {"encoder": "point_cloud", "tokens": 4}, HIDDEN, 0)
    assert torch.equal(enc.encode(msg), enc.encode(ref))
