from limiterd.storage.base import Journal, StartupError, StorageError
from limiterd.storage.memory import MemoryJournal

__all__ = ["Journal", "MemoryJournal", "StartupError", "StorageError"]
