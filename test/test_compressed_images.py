"""sensor_msgs/CompressedImage through the ``image`` encoder: JPEG/PNG round trips against the raw
Image path, every rejection with its code, and one compressed frame answered by the node."""
from __future__ import annotations

import io
import struct
import zlib
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from capsule_ros.policy.encoders import build_encoder
from capsule_ros.status_codes import Code
from test_encoders import HIDDEN, image, rejects

H, W = 48, 64


def picture(h: int = H, w: int = W) -> np.ndarray:
    """A camera-like picture: smooth gradients and a block, so JPEG keeps it recognisable."""
    y, x = np.mgrid[0:h, 0:w]
    pic = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
    pic[h // 4: h // 2, w // 4: w // 2] = [200, 30, 60]
    return pic


def encoded(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def compressed(data: bytes, fmt: str) -> NS:
    """A duck-typed sensor_msgs/CompressedImage (rosbags style: data is a numpy uint8 array)."""
    return NS(format=fmt, data=np.frombuffer(data, np.uint8).copy())


def decoded_by_pillow(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data)))


@pytest.fixture
def enc():
    return build_encoder("cam", {"encoder": "image", "resize": [16, 24], "patch": 8}, HIDDEN, seed=3)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "JPEG", "rgb8; jpeg compressed bgr8",
                                 "bgr8; jpeg compressed bgr8"])
def test_jpeg_embeds_like_the_raw_image_of_its_decoded_pixels(enc, fmt):
    data = encoded(picture(), "JPEG", quality=90)
    reference = image(decoded_by_pillow(data), "rgb8")
    assert torch.equal(enc.encode(compressed(data, fmt)), enc.encode(reference))
    assert enc.encode(compressed(data, fmt)).shape == (6, HIDDEN)


def test_jpeg_with_zero_padding_after_its_end_marker_is_accepted(enc):
    data = encoded(picture(), "JPEG", quality=90)
    reference = image(decoded_by_pillow(data), "rgb8")
    assert torch.equal(enc.encode(compressed(data + bytes(7), "jpeg")), enc.encode(reference))


def test_jpeg_colour_order_is_rgb(enc):
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 255
    feats = enc.features(compressed(encoded(red, "JPEG", quality=95), "rgb8; jpeg compressed bgr8"))
    assert feats.shape == (3, H, W)
    assert feats[0].mean() > 0.95 and feats[1].mean() < 0.05 and feats[2].mean() < 0.05


def test_png_is_exact(enc):
    pic = picture()
    assert torch.equal(enc.encode(compressed(encoded(pic, "PNG"), "png")), enc.encode(image(pic, "rgb8")))
    # the same picture published as bgr8 raw: same embedding (the PNG holds true RGB)
    assert torch.equal(enc.encode(compressed(encoded(pic, "PNG"), "bgr8; png compressed bgr8")),
                       enc.encode(image(pic[..., ::-1].copy(), "bgr8")))
    grey = pic[..., 1].copy()
    assert torch.equal(enc.encode(compressed(encoded(grey, "PNG"), "png")), enc.encode(image(grey, "mono8")))
    rgba = np.dstack([pic, np.full((H, W), 9, np.uint8)])
    assert torch.equal(enc.encode(compressed(encoded(rgba, "PNG"), "png")), enc.encode(image(rgba, "rgba8")))


def test_sixteen_bit_png_is_depth():
    depth_enc = build_encoder("depth", {"encoder": "image", "encodings": ["16UC1"], "resize": [8, 8]},
                              HIDDEN, 0)
    depth = np.full((8, 8), 2000, np.uint16)
    depth[2:4, 3:6] = 0  # "no return" stays 0
    data = encoded(depth, "PNG")
    feats = depth_enc.features(compressed(data, "16UC1; png compressed "))
    assert torch.equal(feats, depth_enc.features(image(depth, "16UC1")))
    assert feats[0, 0, 0].item() == pytest.approx(2.0) and feats[0, 2, 3].item() == 0.0


def test_grey_jpeg_is_mono8():
    grey = picture()[..., 0].copy()
    data = encoded(grey, "JPEG", quality=90)
    mono_enc = build_encoder("ir", {"encoder": "image", "encodings": ["mono8"], "resize": [16, 24]},
                             HIDDEN, 0)
    assert mono_enc.channels == 1
    assert torch.equal(mono_enc.encode(compressed(data, "jpeg")),
                       mono_enc.encode(image(decoded_by_pillow(data), "mono8")))


def test_rclpy_compressed_image(enc):
    from sensor_msgs.msg import CompressedImage

    data = encoded(picture(), "JPEG", quality=80)
    msg = CompressedImage(format="rgb8; jpeg compressed bgr8", data=data)
    assert torch.equal(enc.encode(msg), enc.encode(image(decoded_by_pillow(data), "rgb8")))
    msg.data = data[: len(data) // 2]  # array.array from rclpy, truncated
    rejects(Code.BAD_INPUT, enc, msg)


# ---------------------------------------------------------------- rejections

def test_expect_size_applies_to_the_decoded_size():
    sized = build_encoder("cam", {"encoder": "image", "expect_size": [H, W], "resize": [16, 16]}, HIDDEN, 0)
    assert sized.encode(compressed(encoded(picture(), "JPEG"), "jpeg")).shape == (4, HIDDEN)
    rejects(Code.BAD_SIZE, sized, compressed(encoded(picture(W, H), "JPEG"), "jpeg"))  # transposed
    rejects(Code.BAD_SIZE, sized, compressed(encoded(picture(H, W + 8), "PNG"), "png"))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR) for a ``width`` x ``height`` RGB image, with 1 row of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(1 + 3 * 4)))


def test_size_is_checked_from_the_header_before_decoding(enc):
    # 100000 x 100000 px claimed by ~60 bytes: refused as a size, never decoded (no 30 GB buffer)
    rejects(Code.BAD_SIZE, enc, compressed(_png_header_claiming(100_000, 100_000), "png"))
    sized = build_encoder("cam", {"encoder": "image", "expect_size": [H, W]}, HIDDEN, 0)
    rejects(Code.BAD_SIZE, sized, compressed(_png_header_claiming(W + 1, H), "png"))


@pytest.mark.parametrize("fmt", ["", "tiff", "qoi", "16UC1; compressedDepth png", "rgb8; jpeg",
                                 "mono8; tiff compressed mono8"])
def test_unsupported_format_strings(enc, fmt):
    rejects(Code.BAD_ENCODING, enc, compressed(encoded(picture(), "PNG"), fmt))


def test_data_not_of_the_named_codec(enc):
    rejects(Code.BAD_ENCODING, enc, compressed(encoded(picture(), "JPEG"), "png"))
    rejects(Code.BAD_ENCODING, enc, compressed(encoded(picture(), "PNG"), "jpeg"))
    rejects(Code.BAD_ENCODING, enc, compressed(b"definitely not an image", "jpeg"))


def test_corrupt_payloads(enc):
    jpeg, png = encoded(picture(), "JPEG"), encoded(picture(), "PNG")
    rejects(Code.BAD_SIZE, enc, compressed(b"", "jpeg"))
    rejects(Code.BAD_INPUT, enc, compressed(jpeg[: len(jpeg) // 2], "jpeg"))   # truncated scan
    rejects(Code.BAD_INPUT, enc, compressed(jpeg[:40], "jpeg"))                # truncated header
    rejects(Code.BAD_INPUT, enc, compressed(png[: len(png) // 2], "png"))
    rejects(Code.BAD_INPUT, enc, compressed(jpeg[:3] + bytes(200), "jpeg"))    # signature, then zeros
    # no end-of-image marker: refused on every device (nvjpeg would decode it silently)
    rejects(Code.BAD_INPUT, enc, compressed(jpeg[:-2], "jpeg"))
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF                                                       # IHDR checksum
    rejects(Code.BAD_INPUT, enc, compressed(bytes(bad_crc), "png"))


def test_decoded_encoding_must_be_allowed():
    only_rgb = build_encoder("cam", {"encoder": "image", "encodings": ["rgb8"], "resize": [8, 8]}, HIDDEN, 0)
    rejects(Code.BAD_ENCODING, only_rgb, compressed(encoded(picture()[..., 0].copy(), "JPEG"), "jpeg"))
    depth_only = build_encoder("d", {"encoder": "image", "encodings": ["16UC1"], "resize": [8, 8]}, HIDDEN, 0)
    rejects(Code.BAD_ENCODING, depth_only, compressed(encoded(picture(), "PNG"), "png"))
    assert only_rgb.encode(compressed(encoded(picture(), "PNG"), "png")).shape == (1, HIDDEN)


def test_a_bare_signature_is_bad_input_not_a_library_error(enc):
    rejects(Code.BAD_INPUT, enc, compressed(b"\xff\xd8\xff" + bytes(50), "jpeg"))
    rejects(Code.BAD_INPUT, enc, compressed(b"\x89PNG\r\n\x1a\n", "png"))
    # a header promising more rows than the data holds: decoded, found short, refused
    rejects(Code.BAD_INPUT, enc, compressed(_png_header_claiming(W, H), "png"))


# ---------------------------------------------------------------- through the node

@pytest.mark.ros
@pytest.mark.timeout(240)
def test_node_answers_a_compressed_camera(ros, default_params, one_torch_thread):
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage

    from capsule_ros.msg import ActionChunk, Status
    from capsule_ros.ros.launch_args import node_arguments
    from capsule_ros.ros.node import ANSWER_QOS, CapsuleNode
    from rosutil import activate, make_executor, spin_until, wait_matched

    topic = "/front_cam/image_raw/compressed"
    node = CapsuleNode(context=ros, cli_args=node_arguments(params_file=str(default_params)).cli_args(),
                       parameter_overrides=[
                           Parameter("inputs.front_cam.topic", value=topic),
                           Parameter("inputs.front_cam.type", value="sensor_msgs/msg/CompressedImage")])
    client = rclpy.create_node("camera", context=ros)
    ex = make_executor(ros, node, client)
    try:
        actions: list = []
        statuses: list = []
        client.create_subscription(ActionChunk, "/capsule_node/actions", actions.append, ANSWER_QOS)
        client.create_subscription(Status, "/capsule_node/status", statuses.append, ANSWER_QOS)
        cam = client.create_publisher(CompressedImage, topic, qos_profile_sensor_data)
        activate(node)
        wait_matched(ex, client, publishers=[cam])
        data = encoded(picture(), "JPEG", quality=85)
        cam.publish(CompressedImage(format="rgb8; jpeg compressed bgr8", data=data[:200]))
        spin_until(ex, lambda: statuses, 30, "the status of a truncated frame")
        assert statuses[0].code == Code.BAD_INPUT and not actions
        cam.publish(CompressedImage(format="rgb8; jpeg compressed bgr8", data=data))
        spin_until(ex, lambda: actions, 30, "the answer to a good frame")
        assert actions[0].stream == "front" and len(statuses) == 1
    finally:
        ex.shutdown()
        node.destroy_node()
        client.destroy_node()
