"""The capsule mechanism: layout, live state, capsules, store, files. Imports no ROS, no model."""
from .capsule import Capsule, CapsuleError, JournalEntry, KVSegment, commit, restore
from .fingerprint import Fingerprint
from .layout import BufferSpec, Kind, LiveState, StateLayout
from .store import CapsuleStore, check_name

__all__ = ["BufferSpec", "Capsule", "CapsuleError", "CapsuleStore", "Fingerprint", "JournalEntry",
           "KVSegment", "Kind", "LiveState", "StateLayout", "check_name", "commit", "restore"]
