"""Fingerprints: what a capsule binds to, so a wrong restore is refused, never silently wrong."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

# Parts, in the order errors name them.
PARTS = ("weights", "dtype", "layout", "device", "versions", "execution")
# A header written before ``execution`` existed came from the transformers modules (eager or
# captured as graphs, bit-identical to each other): read it as that path.
_DEFAULTS = {"execution": "eager"}


@dataclass(frozen=True)
class Fingerprint:
    weights: str    # hash of checkpoint files, or of config + seed for a seeded model
    dtype: str
    layout: str     # StateLayout.digest()
    device: str     # device kind: "cpu", "cuda:sm90", ...
    versions: str   # library and format versions that change numerics or layout
    # The code path that computes the state ("eager", "graph", "lean-cuda"): paths with different
    # kernels give different numerics, so a capsule never crosses from one to another silently.
    execution: str = "eager"

    def diff(self, other: "Fingerprint") -> list[str]:
        """Names of the parts that differ (empty when equal)."""
        return [p for p in PARTS if getattr(self, p) != getattr(other, p)]

    def to_dict(self) -> dict[str, str]:
        return {p: getattr(self, p) for p in PARTS}

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> "Fingerprint":
        missing = [p for p in PARTS if p not in d and p not in _DEFAULTS]
        if missing:
            raise ValueError(f"fingerprint lacks {missing}")
        return cls(**{p: str(d.get(p, _DEFAULTS.get(p))) for p in PARTS})

    def digest(self) -> str:
        return hash_text(json.dumps(self.to_dict(), sort_keys=True))


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_file_hash_cache: dict[tuple[str, int, int], str] = {}


def hash_file(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so a large checkpoint is read once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _file_hash_cache[key] = h.hexdigest()
    return _file_hash_cache[key]


def hash_files(paths: Iterable[Path]) -> str:
    """One hash over several files (names and contents), order-independent."""
    parts = sorted((Path(p).name, hash_file(Path(p))) for p in paths)
    return hash_text(json.dumps(parts))
