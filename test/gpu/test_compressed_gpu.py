"""CompressedImage on CUDA: JPEGs decode on the GPU through nvjpeg when torchvision imports, PNGs
(and machines without torchvision) through Pillow on CPU; the validation contract is the same."""
from __future__ import annotations

import io
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from capsule_ros.policy import image_codecs
from capsule_ros.policy.encoders import build_encoder
from capsule_ros.status_codes import CapsuleRosError, Code

CUDA = torch.device("cuda")
SPEC = {"encoder": "image", "resize": [32, 32], "patch": 8, "expect_size": [480, 640]}


def camera_picture() -> np.ndarray:
    y, x = np.mgrid[0:480, 0:640]
    pic = np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], -1).astype(np.uint8)
    pic[100:300, 200:400] = [200, 30, 60]
    return pic


def payload(pixels: np.ndarray, fmt: str) -> NS:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return NS(format=fmt, data=np.frombuffer(buf.getvalue(), np.uint8).copy())


def rejected(enc, msg) -> Code:
    with pytest.raises(CapsuleRosError) as err:
        enc.encode(msg)
    return err.value.code


@pytest.fixture
def encoders():
    cpu = build_encoder("cam", SPEC, 64, seed=1)
    return cpu, build_encoder("cam", SPEC, 64, seed=1).to(CUDA)


def test_jpeg_decodes_on_the_gpu_close_to_pillow(encoders):
    pytest.importorskip("torchvision", reason="nvjpeg path needs torchvision")
    assert image_codecs._nvjpeg() is not None, "torchvision is installed but decode_jpeg did not import"
    cpu, gpu = encoders
    msg = payload(camera_picture(), "jpeg")
    on_gpu, on_cpu = gpu.features(msg), cpu.features(msg)
    assert on_gpu.device.type == "cuda" and on_cpu.device.type == "cpu"
    assert on_gpu.shape == on_cpu.shape == (3, 480, 640)
    # two JPEG decoders differ by IDCT / chroma-upsampling rounding (largest at sharp colour
    # edges, so no bound on the max): on average well under a few levels
    diff = (on_gpu.cpu() - on_cpu).abs() * 255
    emb_gpu, emb_cpu = gpu.encode(msg), cpu.encode(msg)
    emb_diff = (emb_gpu.cpu() - emb_cpu).abs().max().item()
    numbers = (f"nvjpeg vs Pillow: max {diff.max().item():.1f} mean {diff.mean().item():.3f} levels; "
               f"embedding max diff {emb_diff:.2e} of {emb_cpu.abs().max().item():.2f}")
    assert diff.mean().item() < 2.0, numbers
    assert emb_gpu.device.type == "cuda"
    assert emb_diff < 0.05 * emb_cpu.abs().max().item(), numbers


def test_png_decodes_on_cpu_and_matches_exactly(encoders):
    cpu, gpu = encoders
    pic = camera_picture()
    msg = payload(pic, "png")
    assert gpu.features(msg).device.type == "cpu"
    assert torch.equal(gpu.features(msg), cpu.features(msg))
    assert torch.equal(cpu.features(msg), torch.from_numpy(pic).permute(2, 0, 1).float() / 255)


def test_gpu_rejections_keep_their_codes(encoders):
    _, gpu = encoders
    good = payload(camera_picture(), "jpeg")
    truncated = NS(format="jpeg", data=good.data[: good.data.size // 2].copy())
    assert rejected(gpu, truncated) == Code.BAD_INPUT
    assert rejected(gpu, NS(format="jpeg", data=good.data[:3].copy())) == Code.BAD_INPUT
    assert rejected(gpu, NS(format="png", data=good.data)) == Code.BAD_ENCODING
    assert rejected(gpu, payload(camera_picture()[:240], "jpeg")) == Code.BAD_SIZE
    # and the device still serves the next frame
    assert gpu.encode(good).shape == (16, 64)
