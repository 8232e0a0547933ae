"""The capsule mechanism: layout, live state, capsules (snapshot/restore), files (save/load/
verify), the store of per-stream slots, and tiers. Imports no ROS, no model, nothing of the node."""
from .capsule import Capsule, JournalEntry, KVSegment, restore, snapshot
from .errors import (CapsuleBudgetError, CapsuleError, CapsuleFileError, CapsuleNotFound,
                     CapsuleNotInMemory, CapsuleWriteError)
from .fingerprint import Fingerprint
from .layout import BufferSpec, Kind, LiveState, StateLayout
from .names import check_name
from .store import CapsuleStore

__all__ = ["BufferSpec", "Capsule", "CapsuleBudgetError", "CapsuleError", "CapsuleFileError",
           "CapsuleNotFound", "CapsuleNotInMemory", "CapsuleStore", "CapsuleWriteError",
           "Fingerprint", "JournalEntry", "KVSegment", "Kind", "LiveState", "StateLayout",
           "check_name", "restore", "snapshot"]
