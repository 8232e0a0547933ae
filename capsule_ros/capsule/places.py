"""Where capsule files live, and who owns them.

Under one root directory (``capsules.directory``):

* ``saved/``               user ``save``/``load`` names; persistence never writes or reads here;
* ``streams/<node>/``      what persist-on-commit writes and ``reload_at_start`` reads, per node;
* ``tiers/<node>/``        the file tier's scratch files, per node;
* ``owners/<node>.lock``   held (``flock``) by the live process that owns ``<node>``'s directories:
                           a second live owner is refused; a restart of the node takes it over.

``<node>`` is the node's fully qualified name with its slashes turned into ``__`` (ROS names never
hold ``__``, so two names never share a directory). A relative root resolves against ``ROS_HOME``
(default ``~/.ros``), never against the current or the install directory.
"""
from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CapsuleError


def resolve_root(directory: str | os.PathLike, ros_home: str | os.PathLike | None = None) -> Path:
    """An absolute ``directory`` as is; a relative one under ``ros_home`` (default: the
    ``ROS_HOME`` environment variable, else ``~/.ros``)."""
    p = Path(os.path.expanduser(str(directory)))
    if not str(directory):
        raise CapsuleError("no capsule directory configured")
    if p.is_absolute():
        return p
    home = ros_home if ros_home is not None else os.environ.get("ROS_HOME") or "~/.ros"
    return Path(os.path.expanduser(str(home))).resolve() / p


def node_dir_name(fully_qualified_name: str) -> str:
    """``/robot1/capsule_node`` -> ``robot1__capsule_node``."""
    parts = [p for p in fully_qualified_name.split("/") if p]
    if not parts or any(p in (".", "..") or "__" in p for p in parts):
        raise CapsuleError(f"not a fully qualified node name: {fully_qualified_name!r}")
    return "__".join(parts)


class OwnerLock:
    """An exclusive, non-blocking ``flock`` on a file, held until ``release`` or process exit
    (the kernel drops it when the process dies, so a crashed owner never blocks a restart)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CapsuleError(f"{str(self.path)!r} is held by another live process (pid {holder}): "
                               "two nodes of one name cannot share a capsule directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


@dataclass(frozen=True)
class CapsuleDirs:
    """The directories of one node under one root (made on ``claim``)."""

    root: Path
    node: str   # node_dir_name(...)

    @classmethod
    def of(cls, directory: str | os.PathLike, fully_qualified_name: str,
           ros_home: str | os.PathLike | None = None) -> "CapsuleDirs":
        return cls(resolve_root(directory, ros_home), node_dir_name(fully_qualified_name))

    @property
    def saved(self) -> Path:
        return self.root / "saved"

    @property
    def streams(self) -> Path:
        return self.root / "streams" / self.node

    @property
    def tiers(self) -> Path:
        return self.root / "tiers" / self.node

    @property
    def lock_path(self) -> Path:
        return self.root / "owners" / f"{self.node}.lock"

    def claim(self) -> OwnerLock:
        """Take ownership of this node's directories (refused while another process holds them)
        and create them."""
        lock = OwnerLock(self.lock_path)
        for d in (self.saved, self.streams, self.tiers):
            d.mkdir(parents=True, exist_ok=True)
        return lock
