"""Compressed images (``sensor_msgs/CompressedImage``, JPEG or PNG) -> validated pixels.

The image encoder calls ``decode_compressed`` when a message has ``format`` instead of
``encoding``. Order of work, so that a bad message costs little and is refused with its code:
  1. ``format`` names the codec: ``jpeg``/``jpg``/``png`` as camera drivers write it, or
     image_transport's ``"<encoding>; jpeg compressed bgr8"`` / ``"<encoding>; png compressed ..."``.
     Anything else (``compressedDepth``, ``tiff``, ``qoi``, empty) is BAD_ENCODING; so are bytes
     whose signature is not the named codec's.
  2. The header gives size and pixel mode without decoding: empty data, a size other than
     ``expect_size`` or more than ``MAX_PIXELS`` pixels is BAD_SIZE.
  3. Decode: Pillow (libjpeg-turbo, libpng) on CPU; on a CUDA device, JPEGs go through nvjpeg
     (``torchvision.io.decode_jpeg``) when torchvision imports there. Corrupt or truncated data
     is BAD_INPUT, and so is a JPEG without its end-of-image marker. (JPEG has no checksum: damage inside the entropy-coded data decodes to wrong
     pixels, as it does in every decoder.)
Colour: JPEG/PNG decoders return true RGB whatever order the publisher held in memory (the
``bgr8`` in image_transport's format is OpenCV's buffer order before encoding, not the file's),
so no channel swap is needed. The decoded pixels are given the raw encoding they correspond to
(rgb8, rgba8, mono8, 16UC1) and the encoder's ``encodings`` must allow it, as for raw images.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from capsule_ros.status_codes import CapsuleRosError, Code

MAX_PIXELS = 8192 * 8192  # a compressed payload is not bounded by its size: a 1 KB PNG can claim 1e10 px
_SIGNATURES = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
_JPEG_EOI = b"\xff\xd9"
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
# Pillow pixel mode -> (the raw encoding it stands for, the mode to convert to first, if any)
_MODES: dict[str, tuple[str, str | None]] = {
    "RGB": ("rgb8", None), "RGBA": ("rgba8", None), "L": ("mono8", None),
    "I;16": ("16UC1", None), "I;16B": ("16UC1", None), "I": ("16UC1", None),  # 16-bit grey PNG
    "1": ("mono8", "L"), "LA": ("mono8", "L"), "P": ("rgb8", "RGB"), "PA": ("rgb8", "RGB"),
    "CMYK": ("rgb8", "RGB"),  # Adobe JPEGs
}


def codec_of(fmt: str) -> str:
    """'jpeg' or 'png' from a CompressedImage ``format``; anything else is BAD_ENCODING."""
    text = str(fmt).strip().lower()
    if ";" in text:  # image_transport: "<raw encoding>; <codec> compressed <target>"
        words = text.split(";", 1)[1].split()
        codec = words[0] if len(words) >= 2 and words[1] == "compressed" else ""
    else:
        codec = text
    codec = {"jpg": "jpeg"}.get(codec, codec)
    if codec not in _SIGNATURES:
        raise CapsuleRosError(Code.BAD_ENCODING, f"compressed format '{fmt}' not supported "
                              "(jpeg or png, as 'jpeg' or image_transport's '<enc>; jpeg compressed <enc>')")
    return codec


@functools.lru_cache(maxsize=1)
def _nvjpeg() -> Any:
    """torchvision's decode_jpeg if torchvision imports with this torch, else None (CPU decode)."""
    try:
        from torchvision.io import decode_jpeg  # optional: a CUDA-only nicety, never a requirement
    except Exception:  # ImportError, or a torchvision built for another torch (operator errors)
        return None
    return decode_jpeg


def _open(data: np.ndarray, codec: str, what: str) -> Image.Image:
    """The image with its header read (size, mode) and its pixels not yet decoded."""
    if data.size == 0:
        raise CapsuleRosError(Code.BAD_SIZE, f"{what}: empty {codec} payload")
    if not data[: len(_SIGNATURES[codec])].tobytes() == _SIGNATURES[codec]:
        raise CapsuleRosError(Code.BAD_ENCODING, f"{what}: format says {codec} but the data is not {codec}")
    # nvjpeg decodes a truncated JPEG without a word (measured, torchvision 0.26): require the
    # end-of-image marker on every device. FF D9 cannot occur inside entropy-coded data (an FF
    # there is always followed by 00 or a restart marker), so this finds truncation exactly.
    if codec == "jpeg" and not data.tobytes().rstrip(b"\x00").endswith(_JPEG_EOI):
        raise CapsuleRosError(Code.BAD_INPUT, f"{what}: truncated jpeg (no end-of-image marker)")
    try:
        with warnings.catch_warnings():  # our MAX_PIXELS check replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data.tobytes()), formats=[_PIL_FORMATS[codec]])
    except Image.DecompressionBombError as e:
        raise CapsuleRosError(Code.BAD_SIZE, f"{what}: {e}") from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError, OSError from a broken header
        raise CapsuleRosError(Code.BAD_INPUT, f"{what}: unreadable {codec} header ({e})") from None


def decode_compressed(msg_format: str, data: np.ndarray, allowed: tuple[str, ...],
                      expect_size: tuple[int, int] | None, device: torch.device,
                      what: str) -> tuple[str, torch.Tensor]:
    """Validate and decode one payload -> (raw encoding, pixels ``[C, H, W]``).

    Pixels are uint8 (rgb8 as 3 channels, mono8 as 1, rgba8's alpha dropped) or float32 raw
    16-bit units (16UC1), on ``device`` when nvjpeg decoded them there, else on CPU.
    """
    codec = codec_of(msg_format)
    img = _open(data, codec, what)
    width, height = img.size
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        raise CapsuleRosError(Code.BAD_SIZE, f"{what}: {codec} of {height}x{width} "
                              f"(at most {MAX_PIXELS} pixels)")
    if expect_size is not None and (height, width) != expect_size:
        raise CapsuleRosError(Code.BAD_SIZE, f"{what}: image {height}x{width}, "
                              f"expected {expect_size[0]}x{expect_size[1]}")
    if img.mode not in _MODES:
        raise CapsuleRosError(Code.BAD_ENCODING, f"{what}: {codec} pixel mode '{img.mode}' not supported")
    encoding, convert_to = _MODES[img.mode]
    if encoding not in allowed:
        raise CapsuleRosError(Code.BAD_ENCODING, f"{what}: {codec} decodes as {encoding}, "
                              f"not in {list(allowed)}")
    nvjpeg = _nvjpeg() if device.type == "cuda" and codec == "jpeg" and img.mode in ("RGB", "L") else None
    try:
        if nvjpeg is not None:
            return encoding, _decode_on_gpu(nvjpeg, data, img.mode, device)
        img.load()
    except torch.cuda.OutOfMemoryError:  # the device's fault, not the message's: not BAD_INPUT
        raise
    except Exception as e:  # truncated / corrupt entropy-coded data
        raise CapsuleRosError(Code.BAD_INPUT, f"{what}: corrupt {codec} data ({e})") from None
    if convert_to is not None:
        img = img.convert(convert_to)
    pixels = np.asarray(img)
    if encoding == "16UC1":
        return encoding, torch.from_numpy(pixels.astype(np.float32))[None]
    if encoding == "rgba8":
        pixels = pixels[..., :3]
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    # one copy at most: Pillow's array is read-only, the transpose is not contiguous
    return encoding, torch.from_numpy(np.require(chw, requirements=["C", "W"]))


def _decode_on_gpu(decode_jpeg: Any, data: np.ndarray, mode: str, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode

    read = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY
    # decode_jpeg wants a CPU uint8 tensor; the copy makes it writable (frombuffer warns otherwise)
    return decode_jpeg(torch.from_numpy(data.copy()), mode=read, device=device)
