"""Observation encoders: one ROS message -> embeddings ``[n_tokens, hidden]`` (float32).

This is where a message is turned into tensors. The engine appends the result with
``inputs_embeds``. Nothing here imports ROS: messages are duck-typed by field name, so rclpy
objects (``data`` as ``bytes``/``array.array``) and rosbags-deserialized objects (``data`` as a
numpy array) both work, as does a ``types.SimpleNamespace`` in tests.

Contract of every encoder (``Encoder.encode``):
  1. validate the whole message first; a bad one raises ``CapsuleRosError`` with its code
     (``BAD_ENCODING``, ``BAD_SIZE``, ``NON_FINITE``, ``MISSING_JOINT``, ``BAD_INPUT``);
  2. featurize (numpy / CPU torch; nvjpeg on the encoder's CUDA device for a JPEG CompressedImage),
     then project with this module's own weights;
  3. never touch model or capsule state: the engine may call ``encode`` before restore, and a
     rejected message leaves everything as it was.

Weights are seeded from ``seed`` and the input's name with a local ``torch.Generator`` (two builds
are identical, the global RNG is untouched); ``weights.load_policy_weights`` replaces them with
trained ones. Configuration mistakes (unknown kind, patch not dividing the size) raise
``ValueError`` at build time, not coded errors: they are not a client's fault.

Kinds (``spec['encoder']``) and their spec keys:
  image        resize [H, W]=[32, 32], patch 8, encodings (subset of rgb8, bgr8, rgba8, mono8,
               16UC1), expect_size [H, W] (optional), depth_scale 0.001 (16UC1 units -> metres).
               Colour is scaled to [0, 1], depth to metres (unclipped; 0 stays "no return").
               Channels are fixed per encoder: 1 if every allowed encoding is single-channel
               (mono8, 16UC1), else 3, and then mono/depth are repeated to 3 channels so one
               projection serves every allowed encoding. Tokens: (H/patch)*(W/patch), row-major;
               each is Linear(patch*patch*channels -> hidden) + a learned per-patch position
               embedding (the backbone only sees 1-D order) + a learned input-type embedding.
               The same kind takes sensor_msgs/CompressedImage (set the input's ``type`` to
               sensor_msgs/msg/CompressedImage; no other key changes): ``format`` 'jpeg'/'png' or
               image_transport's '<enc>; jpeg compressed bgr8'. The decoded pixels count as the raw
               encoding they are (colour JPEG/PNG: rgb8, grey: mono8, PNG with alpha: rgba8,
               16-bit grey PNG: 16UC1) and must be in ``encodings``; ``expect_size`` applies to the
               decoded size, checked from the header before decoding. A JPEG embeds exactly like
               the rgb8 Image of its decoded pixels. Decoded by Pillow on CPU; on CUDA by nvjpeg
               when torchvision imports (pixels then differ from Pillow's by the decoders' rounding).
               Unsupported format or pixel mode, or data not of the named codec: BAD_ENCODING;
               empty, wrong size or over image_codecs.MAX_PIXELS: BAD_SIZE; corrupt: BAD_INPUT.
  joint_state  joints [names] (order), fields [position] (and/or velocity, effort). One token:
               Linear(len(joints)*len(fields) -> hidden) + type embedding; features joint-major
               ([j0.position, j0.velocity, j1.position, ...]).
  float_array  length N, tokens T=1. Linear(N -> T*hidden) reshaped to T tokens + type embedding.
               ``layout`` is ignored: the data is read flat.
  text         max_tokens 64, byte_offset 0. Through the checkpoint's tokenizer when given
               (no special tokens added), else a byte-level fallback: id = utf-8 byte +
               byte_offset, clipped to the last row of the embedding table (so a tiny vocabulary
               folds high bytes together). Embedded with the model's own input embedding table,
               not a copy, so text looks to the model exactly like prompt tokens. Empty -> BAD_INPUT;
               more than max_tokens -> BAD_SIZE (rejected, never silently truncated).
  point_cloud  tokens K=8. PointCloud2 with float32 x, y, z. Points are binned by azimuth
               atan2(y, x) into K equal sectors; each sector gives [mean x, mean y, mean z,
               min range, fraction of points] (zeros when empty) -> Linear(5 -> hidden) + per-sector
               embedding + type embedding. Deterministic, no sampling. NaN/Inf points are the ROS
               "no return" marker in non-dense clouds and are dropped there; in a cloud flagged
               ``is_dense`` they are NON_FINITE. A cloud with no valid point is BAD_INPUT.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from capsule_ros.policy.image_codecs import decode_compressed
from capsule_ros.policy.weights import SeededInit
from capsule_ros.status_codes import CapsuleRosError, Code

# bytes per pixel and channels of each supported image encoding
_IMAGE_ENCODINGS: dict[str, tuple[int, int]] = {
    "rgb8": (3, 3),
    "bgr8": (3, 3),
    "rgba8": (4, 3),  # alpha dropped
    "mono8": (1, 1),
    "16UC1": (2, 1),
}
_JOINT_FIELDS = ("position", "velocity", "effort")
_POINTFIELD_FLOAT32 = 7  # sensor_msgs/PointField.FLOAT32


# ---------------------------------------------------------------- shared validation helpers

def _field(msg: Any, name: str) -> Any:
    """A message field, or BAD_INPUT when the object is not the expected message type."""
    try:
        return getattr(msg, name)
    except AttributeError:
        raise CapsuleRosError(Code.BAD_INPUT, f"message has no field '{name}'") from None


def _bytes(data: Any) -> np.ndarray:
    """Any byte buffer (bytes, array.array('B'), numpy uint8, list of ints) as a flat uint8 array."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype.itemsize == 1 else data.astype(np.uint8).reshape(-1)
    try:
        return np.frombuffer(memoryview(data), np.uint8)
    except TypeError:  # a plain list of ints
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _floats(values: Any, what: str) -> np.ndarray:
    """A numeric sequence as flat float32, refusing non-numeric content with BAD_INPUT.

    float64 values beyond float32's range become Inf here, and so NON_FINITE at the check.
    """
    try:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CapsuleRosError(Code.BAD_INPUT, f"{what}: not a numeric array") from None
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def require_finite(values: np.ndarray | torch.Tensor, what: str,
                   names: Sequence[str] | None = None) -> None:
    """Raise NON_FINITE if any value is NaN or +-Inf, naming the first offending entry."""
    finite = torch.isfinite(values) if isinstance(values, torch.Tensor) else np.isfinite(values)
    if bool(finite.all()):
        return
    bad = np.flatnonzero(~np.asarray(finite).reshape(-1))
    where = f"'{names[bad[0]]}'" if names is not None else f"index {int(bad[0])}"
    raise CapsuleRosError(Code.NON_FINITE, f"{what}: {len(bad)} non-finite value(s), first at {where}")


def require_size(actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise CapsuleRosError(Code.BAD_SIZE, f"{what}: got {actual}, expected {expected}")


# ---------------------------------------------------------------- encoders

class Encoder(nn.Module):
    """Base: ``encode(msg)`` = ``features(msg)`` (validates) then ``project`` (weights)."""

    kind: str = ""

    def __init__(self, name: str, hidden_size: int) -> None:
        super().__init__()
        self.name = name
        self.hidden_size = hidden_size
        self.num_tokens: int | None = None

    def features(self, msg: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def project(self, feats: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def check(self, msg: Any) -> bool:
        """Validate what can be validated cheaply (raising the coded error ``encode`` would
        raise); True when that was everything ``encode`` checks but the pixel values' own (so its
        heavy part may run later, on the worker, and only for a message that gets answered).
        Default: False (encode on arrival)."""
        return False

    @torch.no_grad()
    def encode(self, msg: Any) -> torch.Tensor:
        """Validate and embed one message: float32 ``[n_tokens, hidden]`` on this module's device."""
        feats = self.features(msg)
        require_finite(feats, f"{self.name}: features")  # backstop for any kind's featurization
        return self.project(feats.to(self._device(), torch.float32)).float()


class ImageEncoder(Encoder):
    kind = "image"

    def __init__(self, name: str, spec: dict, hidden_size: int, seed: int) -> None:
        super().__init__(name, hidden_size)
        self.encodings = tuple(spec.get("encodings", tuple(_IMAGE_ENCODINGS)))
        unknown = [e for e in self.encodings if e not in _IMAGE_ENCODINGS]
        if unknown or not self.encodings:
            raise ValueError(f"{name}: unsupported image encodings {unknown}; "
                             f"choose from {list(_IMAGE_ENCODINGS)}")
        self.resize = tuple(int(v) for v in spec.get("resize", (32, 32)))
        self.patch = int(spec.get("patch", 8))
        if len(self.resize) != 2 or any(v % self.patch for v in self.resize):
            raise ValueError(f"{name}: resize {list(self.resize)} must be 2 sizes divisible by patch {self.patch}")
        expect = spec.get("expect_size")
        self.expect_size = tuple(int(v) for v in expect) if expect is not None else None
        self.depth_scale = float(spec.get("depth_scale", 0.001))
        self.channels = max(_IMAGE_ENCODINGS[e][1] for e in self.encodings)
        self.num_tokens = (self.resize[0] // self.patch) * (self.resize[1] // self.patch)
        init = SeededInit(seed, name)
        self.proj = init.linear(self.patch * self.patch * self.channels, hidden_size)
        self.pos = init.normal(self.num_tokens, hidden_size, std=0.02)
        self.type_embedding = init.normal(hidden_size, std=0.02)

    def features(self, msg: Any) -> torch.Tensor:
        """Validated pixels, float32 ``[C, H, W]``: rgb order, colour in [0, 1], depth in metres.

        On CPU, except a JPEG that nvjpeg decoded on this encoder's CUDA device. Resizing and
        patchifying happen in ``project``, on the weights' device (a GPU when there).
        """
        if not hasattr(msg, "encoding") and hasattr(msg, "format"):  # sensor_msgs/CompressedImage
            return self._compressed_features(msg)
        encoding, bpp, height, width, step, data = self._raw_header(msg)
        rows = data.reshape(height, step)[:, : width * bpp]  # a view without the row padding
        if encoding == "16UC1":
            order = ">" if _field(msg, "is_bigendian") else "<"
            depth = np.ascontiguousarray(rows).view(f"{order}u2").astype(np.float32) * self.depth_scale
            return torch.from_numpy(depth).reshape(1, height, width)
        pixels = rows.reshape(height, width, bpp)
        if encoding == "bgr8":
            pixels = pixels[..., ::-1]
        elif encoding == "rgba8":
            pixels = pixels[..., :3]
        # to [C, H, W] while still uint8 (a quarter of float32's bytes); the copy is also writable
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        return torch.from_numpy(chw).float().div_(255.0)

    def _raw_header(self, msg: Any) -> tuple:
        """sensor_msgs/Image's header fields, checked: (encoding, bytes per pixel, height, width,
        step, data as a uint8 array of step * height bytes)."""
        encoding = _field(msg, "encoding")
        if encoding not in self.encodings:
            raise CapsuleRosError(Code.BAD_ENCODING,
                                  f"{self.name}: encoding '{encoding}' not in {list(self.encodings)}")
        bpp, _ = _IMAGE_ENCODINGS[encoding]
        height, width, step = int(_field(msg, "height")), int(_field(msg, "width")), int(_field(msg, "step"))
        if height <= 0 or width <= 0:
            raise CapsuleRosError(Code.BAD_SIZE, f"{self.name}: empty image {height}x{width}")
        if self.expect_size is not None and (height, width) != self.expect_size:
            raise CapsuleRosError(Code.BAD_SIZE, f"{self.name}: image {height}x{width}, "
                                  f"expected {self.expect_size[0]}x{self.expect_size[1]}")
        if step < width * bpp:
            raise CapsuleRosError(Code.BAD_SIZE, f"{self.name}: step {step} < width {width} * {bpp} bytes")
        data = _bytes(_field(msg, "data"))
        require_size(data.size, step * height, f"{self.name}: data length (step*height)")
        return encoding, bpp, height, width, step, data

    def check(self, msg: Any) -> bool:
        """A raw image's encoding, size, step and data length (microseconds); a compressed one
        is checked by decoding it, so it is encoded on arrival."""
        if not hasattr(msg, "encoding") and hasattr(msg, "format"):
            return False
        self._raw_header(msg)
        return True

    def _compressed_features(self, msg: Any) -> torch.Tensor:
        encoding, pixels = decode_compressed(_field(msg, "format"), _bytes(_field(msg, "data")),
                                             self.encodings, self.expect_size, self._device(), self.name)
        if encoding == "16UC1":  # raw 16-bit units, as the 16UC1 path reads them
            return pixels.mul_(self.depth_scale)
        return pixels.float().div_(255.0)

    def project(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != self.channels:  # mono/depth into a 3-channel encoder
            img = img.expand(self.channels, -1, -1)
        if tuple(img.shape[1:]) != self.resize:
            img = F.interpolate(img[None], size=self.resize, mode="bilinear",
                                align_corners=False, antialias=True)[0]
        c, p = self.channels, self.patch
        gh, gw = self.resize[0] // p, self.resize[1] // p
        # [C, gh*p, gw*p] -> [gh*gw, C*p*p], patches in row-major order
        patches = img.reshape(c, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p)
        return self.proj(patches) + self.pos + self.type_embedding


class JointStateEncoder(Encoder):
    kind = "joint_state"

    def __init__(self, name: str, spec: dict, hidden_size: int, seed: int) -> None:
        super().__init__(name, hidden_size)
        self.joints = [str(j) for j in spec.get("joints", [])]
        self.fields = [str(f) for f in spec.get("fields", ["position"])]
        if not self.joints or len(set(self.joints)) != len(self.joints):
            raise ValueError(f"{name}: 'joints' must be a non-empty list of distinct names")
        if not self.fields or any(f not in _JOINT_FIELDS for f in self.fields):
            raise ValueError(f"{name}: 'fields' must be a subset of {list(_JOINT_FIELDS)}")
        self.num_tokens = 1
        init = SeededInit(seed, name)
        self.proj = init.linear(len(self.joints) * len(self.fields), hidden_size)
        self.type_embedding = init.normal(hidden_size, std=0.02)

    def features(self, msg: Any) -> torch.Tensor:
        names = [str(n) for n in _field(msg, "name")]
        index = {n: i for i, n in enumerate(names)}
        if len(index) != len(names):
            raise CapsuleRosError(Code.BAD_INPUT, f"{self.name}: duplicate joint names in message")
        missing = [j for j in self.joints if j not in index]
        if missing:
            raise CapsuleRosError(Code.MISSING_JOINT, f"{self.name}: missing joint(s) {missing}")
        rows = [index[j] for j in self.joints]
        columns = []
        for f in self.fields:
            values = _floats(_field(msg, f), f"{self.name}.{f}")
            require_size(values.size, len(names), f"{self.name}: len({f}) vs len(name)")
            picked = values[rows]
            require_finite(picked, f"{self.name}.{f}", self.joints)
            columns.append(picked)
        return torch.from_numpy(np.stack(columns, axis=1).reshape(1, -1))

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats) + self.type_embedding


class FloatArrayEncoder(Encoder):
    kind = "float_array"

    def __init__(self, name: str, spec: dict, hidden_size: int, seed: int) -> None:
        super().__init__(name, hidden_size)
        if "length" not in spec or int(spec["length"]) <= 0:
            raise ValueError(f"{name}: float_array needs a positive 'length'")
        self.length = int(spec["length"])
        self.num_tokens = int(spec.get("tokens", 1))
        init = SeededInit(seed, name)
        self.proj = init.linear(self.length, self.num_tokens * hidden_size)
        self.type_embedding = init.normal(hidden_size, std=0.02)

    def features(self, msg: Any) -> torch.Tensor:
        values = _floats(_field(msg, "data"), f"{self.name}.data")
        require_size(values.size, self.length, f"{self.name}: array length")
        require_finite(values, f"{self.name}.data")
        return torch.from_numpy(values).reshape(1, -1)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats).reshape(self.num_tokens, self.hidden_size) + self.type_embedding


class TextEncoder(Encoder):
    kind = "text"

    def __init__(self, name: str, spec: dict, hidden_size: int,
                 token_embedding: nn.Embedding, tokenizer: Any = None) -> None:
        super().__init__(name, hidden_size)
        if token_embedding is None:
            raise ValueError(f"{name}: text encoder needs the model's token_embedding")
        if token_embedding.embedding_dim != hidden_size:
            raise ValueError(f"{name}: token_embedding dim {token_embedding.embedding_dim} != hidden {hidden_size}")
        # held outside the module tree on purpose: the table belongs to the model, so it must not
        # be saved into policy weights nor moved by this encoder's .to()
        self.__dict__["token_embedding"] = token_embedding
        self.tokenizer = tokenizer
        self.max_tokens = int(spec.get("max_tokens", 64))
        self.byte_offset = int(spec.get("byte_offset", 0))

    def token_ids(self, msg: Any) -> list[int]:
        """Validated token ids of a std_msgs/String (what ``encode`` embeds)."""
        text = _field(msg, "data")
        if not isinstance(text, str):
            raise CapsuleRosError(Code.BAD_INPUT, f"{self.name}: data is {type(text).__name__}, not str")
        if not text:
            raise CapsuleRosError(Code.BAD_INPUT, f"{self.name}: empty text")
        vocab = self.token_embedding.num_embeddings
        if self.tokenizer is not None:
            ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            if not ids:
                raise CapsuleRosError(Code.BAD_INPUT, f"{self.name}: text tokenizes to nothing")
            if max(ids) >= vocab or min(ids) < 0:
                raise CapsuleRosError(Code.INTERNAL, f"{self.name}: tokenizer id outside the "
                                      f"embedding table ({vocab} rows): tokenizer/model mismatch")
        else:
            ids = [min(b + self.byte_offset, vocab - 1) for b in text.encode("utf-8")]
        if len(ids) > self.max_tokens:
            raise CapsuleRosError(Code.BAD_SIZE, f"{self.name}: {len(ids)} tokens > max_tokens {self.max_tokens}")
        return ids

    def features(self, msg: Any) -> torch.Tensor:
        return torch.tensor(self.token_ids(msg), dtype=torch.long)

    @torch.no_grad()
    def encode(self, msg: Any) -> torch.Tensor:
        ids = self.features(msg).to(self.token_embedding.weight.device)
        return self.token_embedding(ids).float()


class PointCloudEncoder(Encoder):
    kind = "point_cloud"
    _NUM_FEATURES = 5  # mean x, mean y, mean z, min range, fraction of points

    def __init__(self, name: str, spec: dict, hidden_size: int, seed: int) -> None:
        super().__init__(name, hidden_size)
        self.num_tokens = int(spec.get("tokens", 8))
        if self.num_tokens <= 0:
            raise ValueError(f"{name}: 'tokens' must be positive")
        init = SeededInit(seed, name)
        self.proj = init.linear(self._NUM_FEATURES, hidden_size)
        self.pos = init.normal(self.num_tokens, hidden_size, std=0.02)
        self.type_embedding = init.normal(hidden_size, std=0.02)

    def _xyz(self, msg: Any) -> np.ndarray:
        """Validated points as float64 ``[n, 3]`` (non-finite points dropped if not dense)."""
        offsets = {}
        for f in _field(msg, "fields"):
            if f.name in ("x", "y", "z"):
                if int(f.datatype) != _POINTFIELD_FLOAT32 or int(f.count) != 1:
                    raise CapsuleRosError(Code.BAD_ENCODING, f"{self.name}: field {f.name} is not one float32")
                offsets[f.name] = int(f.offset)
        if len(offsets) != 3:
            raise CapsuleRosError(Code.BAD_ENCODING,
                                  f"{self.name}: needs float32 fields x, y, z; got {sorted(offsets)}")
        height, width = int(_field(msg, "height")), int(_field(msg, "width"))
        point_step, row_step = int(_field(msg, "point_step")), int(_field(msg, "row_step"))
        if max(offsets.values()) + 4 > point_step or width * point_step > row_step:
            raise CapsuleRosError(Code.BAD_SIZE, f"{self.name}: point_step {point_step} / row_step "
                                  f"{row_step} too small for the fields and width {width}")
        data = _bytes(_field(msg, "data"))
        require_size(data.size, row_step * height, f"{self.name}: data length (row_step*height)")
        if height * width == 0:
            raise CapsuleRosError(Code.BAD_INPUT, f"{self.name}: empty point cloud")
        rows = data.reshape(height, row_step)[:, : width * point_step].reshape(height * width, point_step)
        order = ">" if _field(msg, "is_bigendian") else "<"
        xyz = np.stack([np.ascontiguousarray(rows[:, offsets[k]: offsets[k] + 4]).view(f"{order}f4")[:, 0]
                        for k in ("x", "y", "z")], axis=1).astype(np.float64)
        if _field(msg, "is_dense"):
            require_finite(xyz, f"{self.name}: dense cloud")
        else:
            xyz = xyz[np.isfinite(xyz).all(axis=1)]
            if xyz.shape[0] == 0:
                raise CapsuleRosError(Code.BAD_INPUT, f"{self.name}: no finite point in cloud")
        return xyz

    def features(self, msg: Any) -> torch.Tensor:
        xyz = self._xyz(msg)
        k = self.num_tokens
        azimuth = np.arctan2(xyz[:, 1], xyz[:, 0])  # [-pi, pi]
        sector = np.minimum(((azimuth + np.pi) / (2 * np.pi) * k).astype(np.int64), k - 1)
        count = np.bincount(sector, minlength=k).astype(np.float64)
        feats = np.zeros((k, self._NUM_FEATURES))
        for axis in range(3):
            feats[:, axis] = np.bincount(sector, weights=xyz[:, axis], minlength=k) / np.maximum(count, 1)
        min_range = np.full(k, np.inf)
        np.minimum.at(min_range, sector, np.linalg.norm(xyz, axis=1))
        feats[:, 3] = np.where(count > 0, min_range, 0.0)
        feats[:, 4] = count / xyz.shape[0]
        return torch.from_numpy(feats.astype(np.float32))

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats) + self.pos + self.type_embedding


ENCODER_KINDS = ("image", "joint_state", "float_array", "text", "point_cloud")


def build_encoder(name: str, spec: dict, hidden_size: int, seed: int,
                  token_embedding: nn.Embedding | None = None, tokenizer: Any = None) -> Encoder:
    """Build the encoder of one input from its config ``spec`` (``spec['encoder']`` is the kind)."""
    kind = spec.get("encoder")
    if kind == "image":
        return ImageEncoder(name, spec, hidden_size, seed)
    if kind == "joint_state":
        return JointStateEncoder(name, spec, hidden_size, seed)
    if kind == "float_array":
        return FloatArrayEncoder(name, spec, hidden_size, seed)
    if kind == "text":
        return TextEncoder(name, spec, hidden_size, token_embedding, tokenizer)
    if kind == "point_cloud":
        return PointCloudEncoder(name, spec, hidden_size, seed)
    raise ValueError(f"{name}: unknown encoder '{kind}'; choose from {list(ENCODER_KINDS)}")
