"""Export a model's step to ONNX with its state as explicit inputs and outputs.

``export_model(spec, out)`` builds the model exactly as the torch backend does (same seed or
checkpoint, same layout), exports ``StepModule`` for one token (``decode.onnx``) and, when asked,
for a fixed chunk of tokens (``append_<C>.onnx``), and writes the head weights, layout and
fingerprint beside them (``manifest.py``). The fingerprint is the torch backend's with the
execution path ``onnxruntime-cpu``: same weights, dtype, layout and versions, so a capsule crosses
between the two backends only where the node accepts another execution path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..models.hybrid import HybridModel, ModelLoadError, ModelSpec
from .manifest import (DECODE, EXECUTION, FINGERPRINT, FORMAT, HEAD, LAYOUT, MANIFEST,
                       NOT_EXPORTABLE, VERSION, sha256_file)
from .step import StepModule, region_widths

log = logging.getLogger("capsule_ros")
INPUTS = ("embeds", "position", "kv", "state")
OUTPUTS = ("hidden", "kv_new", "state_new")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json")


class ExportError(ModelLoadError):
    """The model's step could not be exported; the message says why."""


def refusal(model_type: str) -> str | None:
    """Why a family does not export (None when it does)."""
    return NOT_EXPORTABLE.get(model_type)


def _export_graph(step: StepModule, tokens: int, path: Path, window: int) -> None:
    layout = step.layout
    kv_w, st_w = region_widths(layout)
    dtype = layout.dtypes(True)[0]
    st_dtype = (layout.dtypes(False) or [dtype])[0]
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(tokens, step.model.config.hidden_size, generator=gen),
            torch.tensor([min(window // 2, layout.max_len - tokens)], dtype=torch.int64),
            torch.randn(window, kv_w, generator=gen).to(dtype),
            (torch.randn(st_w, generator=gen) * 0.1).to(st_dtype))
    # the KV window is the one dynamic axis: one graph for every context length
    shapes = {"embeds": None, "position": None,
              "kv": {0: torch.export.Dim("window", min=2, max=1 << 22)}, "state": None}
    # torch.onnx prints its progress on stdout: keep stdout for the CLI's JSON lines
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        torch.onnx.export(step, args, str(path), input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False)


def _head(bound: HybridModel, path: Path) -> dict[str, Any]:
    """Embedding table and LM head as safetensors; the family's scales as numbers."""
    from safetensors.torch import save_file
    model, family = bound.model, bound.family
    embed = model.get_input_embeddings().weight.detach()
    lm = model.lm_head.weight.detach()
    tied = lm.data_ptr() == embed.data_ptr()
    tensors = {"embed": embed.contiguous().clone()}
    if not tied:
        tensors["lm_head"] = lm.contiguous().clone()
    save_file(tensors, str(path))
    cfg = model.config
    return {"tied": tied, "embedding_scale": family.embedding_scale(cfg),
            "logits_mul": getattr(cfg, family.logits_mul) if family.logits_mul else None,
            "logits_div": getattr(cfg, family.logits_div) if family.logits_div else None,
            "float_logits": family.float_logits}


def export_model(spec: ModelSpec, out: str | Path, append_chunk: int = 0,
                 window_floor: int = 256) -> dict[str, Any]:
    """Export ``spec``'s model into ``out``; returns the manifest. ``append_chunk`` > 0 also
    tries the ``append_chunk``-token step; if that does not export, appends run as repeated
    decode steps and the manifest says so."""
    out = Path(out).expanduser()
    t0 = time.perf_counter()
    bound = HybridModel.load(spec)
    model_type = bound.model.config.model_type
    if (why := refusal(model_type)) is not None:
        raise ExportError(f"{model_type} does not export to ONNX: {why}")
    if spec.dtype != "float32":
        raise ExportError(f"ONNX export is float32 only (ONNX Runtime's CPU provider lacks "
                          f"{spec.dtype} kernels for these models), not {spec.dtype}")
    out.mkdir(parents=True, exist_ok=True)
    step = StepModule(bound).eval()
    window = min(max(window_floor, 4), bound.max_len)
    graphs: dict[str, Any] = {}
    try:
        _export_graph(step, 1, out / DECODE, window)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; report the reason
        raise ExportError(f"{model_type}: the decode step does not export: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    graphs["decode"] = {"file": DECODE, "tokens": 1}
    append_note = "appends run as repeated decode steps (one session run per token)"
    if append_chunk > 1:
        name = f"append_{append_chunk}.onnx"
        ta = time.perf_counter()
        try:
            _export_graph(step, append_chunk, out / name, window)
            graphs["append"] = {"file": name, "tokens": append_chunk}
            append_note = (f"full {append_chunk}-token chunks run as one session run each "
                           f"(exported in {time.perf_counter() - ta:.0f} s); the rest as decode steps")
        except Exception as e:  # noqa: BLE001
            (out / name).unlink(missing_ok=True)
            append_note += (f"; the {append_chunk}-token step did not export: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    head = _head(bound, out / HEAD)
    fp = dataclasses.replace(bound.fingerprint, execution=EXECUTION, device="cpu")
    (out / LAYOUT).write_text(json.dumps(bound.live.layout.describe(), indent=1))
    (out / FINGERPRINT).write_text(json.dumps(fp.to_dict(), indent=1))
    if spec.path:
        for f in TOKENIZER_FILES:
            src = Path(spec.path).expanduser() / f
            if src.is_file():
                (out / f).write_bytes(src.read_bytes())
    import onnx
    import onnxscript
    import transformers
    files = [g["file"] for g in graphs.values()] + [HEAD]
    manifest = {
        "format": FORMAT, "version": VERSION, "execution": EXECUTION,
        "model_type": model_type, "family": bound.family.describe(),
        "hidden_size": bound.hidden_size, "vocab_size": int(bound.model.config.vocab_size),
        "num_flags": bound.num_flags, "eos_token_ids": sorted(bound.eos_token_ids),
        "params": sum(p.numel() for p in bound.model.parameters()),
        "export_max_len": bound.max_len, "window_floor": window_floor,
        "graphs": graphs, "append": append_note, "head": head,
        "inputs": list(INPUTS), "outputs": list(OUTPUTS),
        "source": spec.describe(), "seed": spec.seed,
        "exporter": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
        "export_seconds": round(time.perf_counter() - t0, 1),
        "files": {f: sha256_file(out / f) for f in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
