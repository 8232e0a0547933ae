"""What an ONNX export directory holds, and the checks that refuse a mismatched one.

An export directory (``python -m capsule_ros.export``)::

    capsule_onnx.json   this manifest: family, sizes, graphs, head scales, file hashes
    decode.onnx         the one-token step (``export/step.py``): state in, new KV row + state out
    append_<C>.onnx     optional: the C-token step (only where it exports, see the manifest)
    head.safetensors    token embedding table and LM head (logits stay a torch matmul)
    layout.json         the state layout (``StateLayout.describe()``) at the export's max_len
    fingerprint.json    the fingerprint capsules of this export carry (execution "onnxruntime-cpu")

The fingerprint, the layout and the graphs are a pair that must agree; ``read_export`` refuses a
directory where they do not and names the part (``layout``, ``weights``, ``dtype``), as a
capsule restore does. Imports neither transformers nor onnxruntime.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..capsule import BufferSpec, Fingerprint, Kind, StateLayout
from ..capsule.layout import dtype_from_name, dtype_name

MANIFEST = "capsule_onnx.json"
LAYOUT = "layout.json"
FINGERPRINT = "fingerprint.json"
HEAD = "head.safetensors"
DECODE = "decode.onnx"
FORMAT = "capsule_onnx"
VERSION = 1
EXECUTION = "onnxruntime-cpu"
# Families whose step does not export, with the reason measured (torch 2.13, transformers 5.24).
NOT_EXPORTABLE = {
    "granitemoehybrid": "its MoE feed-forward dispatches experts through the custom op "
                        "transformers::grouped_mm_fallback, which has no ONNX translation "
                        "(torch.onnx DispatchError)",
}


class ExportMismatch(ValueError):
    """An export directory whose parts do not agree; ``part`` names the fingerprint part."""

    def __init__(self, part: str, text: str) -> None:
        super().__init__(f"differs in {part}: {text}")
        self.part = part


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def layout_from_dict(d: dict) -> StateLayout:
    specs = tuple(BufferSpec(b["name"], Kind(b["kind"]), dtype_from_name(b["dtype"]),
                             tuple(b["shape"]), b["seq_axis"]) for b in d["buffers"])
    return StateLayout(specs, int(d["max_len"]))


def with_max_len(layout: StateLayout, max_len: int) -> StateLayout:
    """The same buffers at another context length (the graphs take any KV window)."""
    specs = tuple(BufferSpec(s.name, s.kind, s.dtype,
                             tuple(max_len if i == s.seq_axis else d for i, d in enumerate(s.shape)),
                             s.seq_axis) for s in layout.specs)
    return StateLayout(specs, max_len)


@dataclass(frozen=True)
class Export:
    root: Path
    manifest: dict[str, Any]
    layout: StateLayout          # at the export's max_len
    fingerprint: Fingerprint

    @property
    def model_type(self) -> str:
        return self.manifest["model_type"]

    def graph(self, kind: str) -> dict | None:
        return self.manifest["graphs"].get(kind)


def read_export(root: str | Path) -> Export:
    """Read and check an export directory; ``ExportMismatch`` names the part that disagrees,
    ``FileNotFoundError`` / ``ValueError`` a missing or unreadable file."""
    root = Path(root).expanduser()
    man_path = root / MANIFEST
    if not man_path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST} (not an ONNX export; see python -m capsule_ros.export)")
    manifest = json.loads(man_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{man_path}: format {manifest.get('format')!r} v{manifest.get('version')}, "
                         f"expected {FORMAT!r} v{VERSION}")
    for name in (LAYOUT, FINGERPRINT):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root}: missing {name}")
    layout = layout_from_dict(json.loads((root / LAYOUT).read_text()))
    fp = Fingerprint.from_dict(json.loads((root / FINGERPRINT).read_text()))
    if fp.layout != layout.digest():
        raise ExportMismatch("layout", f"{FINGERPRINT} names layout {fp.layout}, {LAYOUT} is "
                                       f"{layout.digest()}")
    if any(dtype_name(d) != fp.dtype for d in layout.dtypes(True)):
        raise ExportMismatch("dtype", f"{FINGERPRINT} says {fp.dtype}, the KV buffers are "
                                      f"{[dtype_name(d) for d in layout.dtypes(True)]}")
    if fp.execution != manifest.get("execution", EXECUTION):
        raise ExportMismatch("execution", f"{FINGERPRINT} names {fp.execution!r}, the manifest "
                                          f"{manifest.get('execution')!r}")
    for name, want in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{root}: missing {name} (listed in {MANIFEST})")
        if sha256_file(path) != want:
            # a graph or head file from another export: other weights than the fingerprint names
            raise ExportMismatch("weights", f"{name} is not the file this fingerprint was written "
                                            f"with (sha256 differs from {MANIFEST})")
    return Export(root, manifest, layout, fp)
