"""The file tier: one safetensors file per capsule, written atomically, verified on load.

File ``<name>.capsule.safetensors`` holds the tensors

* ``kv.<dtype>``      the valid KV rows ``[0, position)`` of each KV region, compacted
                      (absent when ``position == 0``);
* ``state.<dtype>``   each constant-size region (conv + recurrent state);
* ``meta.<name>``     each metadata tensor (e.g. a sampler's RNG state);
* ``journal.<i>``     the embeddings of journal entry ``i`` (rebase / verify after a restart);

and, in the safetensors metadata (str -> str), two entries:

* ``capsule_ros``         one JSON header: format name and version, fingerprint, layout
                          (``StateLayout.describe()``), position, meta, journal sources, and per
                          tensor its dtype, shape and sha256;
* ``capsule_ros.sha256``  the sha256 of that header text, so a flipped byte in the header is
                          caught as surely as one in the payload.

A save writes a temp file in the same directory (``.<name>.capsule.safetensors.<pid>.<n>.tmp``,
unique per writer, so two writers of one name never touch each other's temp file), flushes and
fsyncs it, renames it onto the final name (atomic) and fsyncs the directory: the steps in
``SAVE_STEPS``. A crash at any point leaves either the previous file or the new one, never a torn
one. A failed write (disk full) raises ``CapsuleWriteError`` and leaves the previous file as it
was. Temp files are ignored by ``load_capsule``; ``clean_stale_temps`` removes those whose writer
process is gone (the directory's owner calls it at start).

A load parses and checks everything before it builds the capsule: a refused load raises
``CapsuleFileError`` (a ``CapsuleError``) naming the problem, and has no effect.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch

from .capsule import Capsule, JournalEntry, KVSegment
from .errors import CapsuleError, CapsuleFileError, CapsuleNotFound, CapsuleWriteError
from .fingerprint import Fingerprint
from .layout import Kind, StateLayout, dtype_from_name, dtype_name, region_key
from .names import check_name
from .quiet import SLICE_BYTES

# Called by a writer between slices of its hashing and writing (a background writer's wait for a
# quiet query path, ``quiet.QuietGate``); None: go straight through.
Pause = Callable[[], None] | None

FORMAT = "capsule_ros.capsule"
FORMAT_VERSION = 1
SUFFIX = ".capsule.safetensors"
HEADER_KEY = "capsule_ros"
HEADER_SHA_KEY = "capsule_ros.sha256"
TMP_SUFFIX = ".tmp"
# The steps of a save, in order (crash tests stop a child process after each one).
SAVE_STEPS = ("_write_tmp", "_fsync_file", "_rename", "_fsync_dir")

_tmp_counter = itertools.count()


# -- names and paths -----------------------------------------------------------------------
def capsule_path(directory: str | os.PathLike, name: str) -> Path:
    """The file of capsule ``name`` in ``directory``; refuses names that could escape it."""
    try:
        check_name(name)
    except CapsuleError as e:
        raise CapsuleFileError(str(e)) from None
    root = Path(directory)
    path = root / f"{name}{SUFFIX}"
    if path.resolve().parent != root.resolve():
        raise CapsuleFileError(f"capsule name {name!r} resolves outside {str(root)!r}")
    return path


def _tmp_prefix(name: str) -> str:
    return f".{name}{SUFFIX}."


def stale_temps(directory: str | os.PathLike, name: str) -> list[Path]:
    """Temp files of saves of ``name`` (finished saves leave none)."""
    prefix = _tmp_prefix(name)
    return [p for p in _temps(directory) if p.name.startswith(prefix)]


def _temps(directory: str | os.PathLike) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.name.startswith(".") and SUFFIX in p.name and p.name.endswith(TMP_SUFFIX))


def _writer_pid(temp: Path) -> int | None:
    try:
        return int(temp.name[: -len(TMP_SUFFIX)].rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temp files whose writer process is gone (a crashed save); never a live writer's,
    this process's included. Returns what was removed."""
    removed = []
    for temp in _temps(directory):
        pid = _writer_pid(temp)
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        try:
            temp.unlink()
            removed.append(temp)
        except FileNotFoundError:  # another cleaner got there first
            pass
    return removed


def list_capsules(directory: str | os.PathLike) -> list[str]:
    """Names of the capsule files in ``directory`` (temp files excluded)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.name.endswith(SUFFIX) and not p.name.startswith("."):
            out.append(p.name[: -len(SUFFIX)])
    return sorted(out)


# -- tensors and checksums -----------------------------------------------------------------
def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().data).hexdigest()


# torch dtype -> safetensors dtype code (the file format's own names)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (keeps the tensor alive)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a capsule file: dtype, shape and its bytes as CPU buffers in file order
    (a KV region is its segments one after another: no compacting copy)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def buffers(self) -> list[memoryview]:
        return [_buffer(c) for c in self.chunks]


    def tensor(self) -> torch.Tensor:
        """The tensor itself (one contiguous CPU tensor; a copy when it has several chunks)."""
        if len(self.chunks) == 1:
            return self.chunks[0].reshape(self.shape)
        return torch.cat([c.reshape(-1) for c in self.chunks]).reshape(self.shape)


def _slices(view: memoryview, pause: Pause) -> Iterator[memoryview]:
    """``view`` in pieces of ``SLICE_BYTES``, ``pause()`` before each (whole without a pause)."""
    if pause is None:
        yield view
        return
    for at in range(0, len(view), SLICE_BYTES):
        pause()
        yield view[at:at + SLICE_BYTES]


def _sha256(buffers: list[memoryview], pause: Pause = None) -> str:
    h = hashlib.sha256()
    for b in buffers:
        for piece in _slices(b, pause):
            h.update(piece)   # hashlib releases the GIL on buffers of 2 KiB and more
    return h.hexdigest()


def _to_host(tensors: list[torch.Tensor], ready: Any = None) -> list[torch.Tensor]:
    """Contiguous CPU versions of ``tensors``: CPU ones as they are (capsules are immutable, so
    no copy), device ones copied. With ``ready`` (a CUDA event recorded after the capsule was
    made) the copies run on a side stream that waits only for that event, so they never queue
    behind, or ahead of, the query path's kernels."""
    out = [t.detach().contiguous() if t.device.type == "cpu" else None for t in tensors]
    dev = [i for i, t in enumerate(tensors) if out[i] is None]
    if not dev:
        return out  # type: ignore[return-value]
    if ready is None:
        for i in dev:
            out[i] = tensors[i].detach().cpu().contiguous()
        return out  # type: ignore[return-value]
    stream = torch.cuda.Stream(device=tensors[dev[0]].device)
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        for i in dev:
            src = tensors[i].detach()
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            dst.copy_(src, non_blocking=True)
            out[i] = dst
    stream.synchronize()   # the writer waits here, not the worker
    return out  # type: ignore[return-value]


def capsule_file_tensors(capsule: Capsule, ready: Any = None) -> dict[str, FileTensor]:
    """Every tensor of a capsule as it goes into a file, by file key, as CPU buffers."""
    flat: list[torch.Tensor] = []
    plan: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []   # key, dtype, shape, #chunks
    if capsule.kv:
        segs = sorted(capsule.kv, key=lambda s: s.start)
        covered = sum(s.stop - s.start for s in segs)
        if segs[0].start != 0 or covered != capsule.position or any(
                a.stop != b.start for a, b in zip(segs, segs[1:])):
            raise CapsuleFileError(f"capsule KV segments do not cover [0, {capsule.position})")
        for key in segs[0].rows:
            first = segs[0].rows[key]
            plan.append((key, first.dtype, (capsule.position, *first.shape[1:]), len(segs)))
            flat += [s.rows[key] for s in segs]
    for key, t in capsule.state.items():
        plan.append((key, t.dtype, tuple(t.shape), 1))
        flat.append(t)
    for key, t in capsule.meta_tensors.items():
        plan.append((f"meta.{key}", t.dtype, tuple(t.shape), 1))
        flat.append(t)
    for i, entry in enumerate(capsule.journal):
        plan.append((f"journal.{i}", entry.embeds.dtype, tuple(entry.embeds.shape), 1))
        flat.append(entry.embeds)
    host = iter(_to_host(flat, ready))
    return {key: FileTensor(dtype, shape, tuple(next(host) for _ in range(n)))
            for key, dtype, shape, n in plan}


def capsule_tensors(capsule: Capsule) -> dict[str, torch.Tensor]:
    """Every tensor of a capsule as it goes into a file (CPU, contiguous)."""
    return {k: ft.tensor() for k, ft in capsule_file_tensors(capsule).items()}


def _header(capsule: Capsule, layout: StateLayout, tensors: Mapping[str, FileTensor],
            buffers: Mapping[str, list[memoryview]], pause: Pause = None) -> str:
    try:
        meta = json.loads(json.dumps(dict(capsule.meta)))
    except (TypeError, ValueError) as e:
        raise CapsuleFileError(f"capsule meta is not JSON-able: {e}") from None
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": capsule.fingerprint.to_dict(),
        "layout": layout.describe(),
        "position": capsule.position,
        "meta": meta,
        "meta_tensors": sorted(capsule.meta_tensors),
        "journal": [{"source": e.source} for e in capsule.journal],
        "tensors": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "sha256": _sha256(buffers[k], pause)} for k, t in sorted(tensors.items())},
    }
    return json.dumps(header)  # key order kept: meta round-trips in its own order


class Payload:
    """A file's bytes as buffers written one after another (the tensors' own memory: no joined
    copy). ``len`` and slicing behave like ``bytes``."""

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = [p for p in parts if len(p)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, s: slice) -> "Payload":
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("a Payload is sliced by a contiguous range only")
        start, stop, _ = s.indices(len(self))
        out, at = [], 0
        for p in self.parts:
            lo, hi = max(start - at, 0), min(stop - at, len(p))
            if lo < hi:
                out.append(p[lo:hi])
            at += len(p)
        return Payload(out)

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


def encode_parts(capsule: Capsule, layout: StateLayout, ready: Any = None,
                 pause: Pause = None) -> Payload:
    """The bytes of a capsule file: a safetensors file (8-byte header length, JSON header with
    the capsule header in ``__metadata__``, tensor data) built over the tensors' own buffers.
    The heavy work (device copies, sha256, later the writes) runs outside the interpreter lock."""
    if capsule.fingerprint.layout != layout.digest():
        raise CapsuleFileError(f"capsule was made for another layout "
                               f"({capsule.fingerprint.layout} != {layout.digest()})")
    tensors = capsule_file_tensors(capsule, ready)
    buffers = {k: t.buffers() for k, t in tensors.items()}   # made once: hashed, then written
    header = _header(capsule, layout, tensors, buffers, pause)
    entries: dict[str, Any] = {"__metadata__": {
        HEADER_KEY: header, HEADER_SHA_KEY: hashlib.sha256(header.encode()).hexdigest()}}
    # as safetensors orders them: wider dtypes first, so every tensor is aligned in the file
    order = sorted(tensors, key=lambda k: (-tensors[k].chunks[0].element_size(), k))
    offset, parts = 0, []
    for key in order:
        t = tensors[key]
        code = _ST_DTYPES.get(t.dtype)
        if code is None:
            raise CapsuleFileError(f"tensor {key!r} has dtype {t.dtype}, which a capsule file cannot hold")
        entries[key] = {"dtype": code, "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
        parts += buffers[key]
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # payload 8-byte aligned, as safetensors writes it
    return Payload([memoryview(struct.pack("<Q", len(text)) + text), *parts])


def encode_capsule(capsule: Capsule, layout: StateLayout) -> bytes:
    """The bytes of a capsule file (safetensors with the capsule header)."""
    return bytes(encode_parts(capsule, layout))


# -- save ----------------------------------------------------------------------------------
def _write_tmp(tmp: Path, data: Payload | bytes, pause: Pause = None) -> None:
    # O_EXCL: a temp name is one writer's; never truncate someone else's file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for part in (data.parts if isinstance(data, Payload) else [memoryview(data)]):
            for view in _slices(part, pause):
                while view:
                    view = view[os.write(fd, view):]   # releases the GIL for the copy into the kernel
    finally:
        os.close(fd)


def _fsync_file(tmp: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_capsule(capsule: Capsule, directory: str | os.PathLike, name: str,
                 layout: StateLayout, *, ready: Any = None, pause: Pause = None) -> Path:
    """Write ``capsule`` as ``directory/<name>.capsule.safetensors`` atomically; return the path.
    ``ready``: a CUDA event recorded once the capsule's device tensors were written (the
    persister's), letting the device-to-host copies run on a side stream. ``pause``: called
    between slices of the hashing and the writing (a background writer waits there for a quiet
    query path).

    A failure raises ``CapsuleWriteError`` (a full disk) or ``CapsuleFileError`` and leaves any
    previous file of that name intact."""
    root = Path(directory)
    path = capsule_path(root, name)
    data = encode_parts(capsule, layout, ready, pause)
    tmp = root / f"{_tmp_prefix(name)}{os.getpid()}.{next(_tmp_counter)}{TMP_SUFFIX}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_tmp(tmp, data, pause)
        if pause is not None:
            pause()   # the flush to disk begins between queries too
        _fsync_file(tmp)
        _rename(tmp, path)
        _fsync_dir(root)
    except OSError as e:
        _discard(tmp)
        raise CapsuleWriteError(f"saving capsule {name!r} to {str(root)!r} failed: {e.strerror or e}; "
                                "the previous file is intact") from e
    except BaseException:
        _discard(tmp)
        raise
    return path


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


# -- load ----------------------------------------------------------------------------------
def _read_file(path: Path) -> tuple[dict, bytes]:
    """The safetensors header (parsed) and the raw payload; refuses short or malformed files."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CapsuleNotFound(f"capsule file {str(path)!r} not found") from None
    except OSError as e:
        raise CapsuleFileError(f"capsule file {str(path)!r} unreadable: {e}") from None
    if len(data) < 8:
        raise CapsuleFileError(f"capsule file {str(path)!r} is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise CapsuleFileError(f"capsule file {str(path)!r} is truncated (header of {n} bytes, "
                               f"file of {len(data)})")
    try:
        st_header = json.loads(data[8:8 + n])
        assert isinstance(st_header, dict)
    except Exception:
        raise CapsuleFileError(f"capsule file {str(path)!r}: corrupted safetensors header") from None
    payload = 8 + n
    end = max((v["data_offsets"][1] for k, v in st_header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if payload + end > len(data):
        raise CapsuleFileError(f"capsule file {str(path)!r} is truncated (payload needs "
                               f"{payload + end} bytes, file has {len(data)})")
    if payload + end < len(data):
        raise CapsuleFileError(f"capsule file {str(path)!r} has {len(data) - payload - end} "
                               "trailing bytes (corrupted)")
    return st_header, data


def _check_header(path: Path, st_header: dict) -> dict:
    meta = st_header.get("__metadata__") or {}
    text = meta.get(HEADER_KEY)
    if not isinstance(text, str):
        raise CapsuleFileError(f"{str(path)!r} is not a capsule_ros capsule file (no header)")
    if hashlib.sha256(text.encode()).hexdigest() != meta.get(HEADER_SHA_KEY):
        raise CapsuleFileError(f"{str(path)!r}: header checksum mismatch (corrupted)")
    try:
        header = json.loads(text)
    except ValueError:
        raise CapsuleFileError(f"{str(path)!r}: header is not JSON (corrupted)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CapsuleFileError(f"{str(path)!r} is not a capsule_ros capsule file")
    if header.get("version") != FORMAT_VERSION:
        raise CapsuleFileError(f"{str(path)!r}: format version {header.get('version')!r} "
                               f"not supported (this build reads version {FORMAT_VERSION})")
    return header


def read_header(path: str | os.PathLike) -> dict:
    """The verified JSON header of a capsule file (no tensors read beyond the file itself)."""
    path = Path(path)
    st_header, _ = _read_file(path)
    return _check_header(path, st_header)


def _resolve(path_or_dir_and_name: Any) -> Path:
    if isinstance(path_or_dir_and_name, tuple):
        directory, name = path_or_dir_and_name
        return capsule_path(directory, name)
    path = Path(path_or_dir_and_name)
    if not path.name.endswith(SUFFIX):
        raise CapsuleFileError(f"{str(path)!r} is not a capsule file name (*{SUFFIX})")
    return capsule_path(path.parent, path.name[: -len(SUFFIX)])


def load_capsule(path_or_dir_and_name: Any, expected: Fingerprint, layout: StateLayout,
                 device: torch.device | str = "cpu") -> Capsule:
    """Read and verify a capsule file: ``path`` or ``(directory, name)``.

    Checks, in order: the file is whole, the header checksum, format and version, the
    fingerprint (the error names the differing parts, e.g. ``weights``), the layout, every
    tensor's dtype, shape and sha256 against the header and the layout. Only then is a capsule
    built (tensors moved to ``device``). Any failure raises ``CapsuleFileError``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = _resolve(path_or_dir_and_name)
    st_header, data = _read_file(path)
    header = _check_header(path, st_header)
    try:
        fp = Fingerprint.from_dict(header["fingerprint"])
    except (KeyError, ValueError, TypeError) as e:
        raise CapsuleFileError(f"{str(path)!r}: bad fingerprint in header ({e})") from None
    diff = expected.diff(fp)
    if diff:
        raise CapsuleFileError(f"{str(path)!r}: capsule does not match this model: differs in "
                               + ", ".join(diff))
    if header.get("layout") != layout.describe():
        raise CapsuleFileError(f"{str(path)!r}: capsule layout differs from this model's layout")
    try:
        tensors = st_load(data)
    except (SafetensorError, Exception) as e:  # noqa: B014 - any parse failure is a refusal
        raise CapsuleFileError(f"{str(path)!r}: corrupted payload ({e})") from None
    declared = header.get("tensors", {})
    if set(declared) != set(tensors):
        raise CapsuleFileError(f"{str(path)!r}: tensors {sorted(set(declared) ^ set(tensors))} "
                               "do not match the header")
    for key, t in tensors.items():
        d = declared[key]
        if d.get("dtype") != dtype_name(t.dtype) or d.get("shape") != list(t.shape):
            raise CapsuleFileError(f"{str(path)!r}: tensor {key!r} dtype/shape differs from the header")
        if tensor_sha256(t) != d.get("sha256"):
            raise CapsuleFileError(f"{str(path)!r}: checksum mismatch in tensor {key!r} (corrupted)")
    return _build(path, header, tensors, fp, layout, torch.device(device))


def _build(path: Path, header: dict, tensors: dict[str, torch.Tensor], fp: Fingerprint,
           layout: StateLayout, device: torch.device) -> Capsule:
    where = str(path)
    position = header.get("position")
    if not isinstance(position, int) or not 0 <= position <= layout.max_len:
        raise CapsuleFileError(f"{where!r}: position {position!r} outside [0, {layout.max_len}]")
    expected_shapes: dict[str, list[int]] = {}
    for kv in (True, False):
        for dtype in layout.dtypes(kv):
            members = [s for s in layout.specs if (s.kind is Kind.KV) == kv and s.dtype == dtype]
            width = sum(s.row_elems for s in members)
            key = region_key(kv, dtype)
            if kv and position == 0:
                continue
            expected_shapes[key] = [position, width] if kv else [width]
    for key, shape in expected_shapes.items():
        t = tensors.get(key)
        if t is None or list(t.shape) != shape:
            raise CapsuleFileError(f"{where!r}: region {key!r} missing or of the wrong shape")
        dtype = dtype_from_name(key.split(".", 1)[1])
        if t.dtype != dtype:
            raise CapsuleFileError(f"{where!r}: region {key!r} has dtype {t.dtype}")
    sources = header.get("journal", [])
    meta_names = header.get("meta_tensors", [])
    known = set(expected_shapes) | {f"meta.{m}" for m in meta_names} | {
        f"journal.{i}" for i in range(len(sources))}
    if known != set(tensors):
        raise CapsuleFileError(f"{where!r}: unexpected or missing tensors "
                               f"{sorted(known ^ set(tensors))}")

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device) if device.type != "cpu" else t

    kv_keys = [k for k in expected_shapes if k.startswith("kv.")]
    segs = (KVSegment(0, MappingProxyType({k: dev(tensors[k]) for k in kv_keys})),) if kv_keys else ()
    state = MappingProxyType({k: dev(tensors[k]) for k in expected_shapes if k.startswith("state.")})
    meta_tensors = MappingProxyType({m: tensors[f"meta.{m}"] for m in meta_names})
    journal = tuple(JournalEntry(tensors[f"journal.{i}"], str(s.get("source", "")))
                    for i, s in enumerate(sources))
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise CapsuleFileError(f"{where!r}: meta is not an object")
    return Capsule(fingerprint=fp, position=position, kv=segs, state=state,
                   meta=MappingProxyType(meta), meta_tensors=meta_tensors, journal=journal)
