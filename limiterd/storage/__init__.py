from limiterd.storage.base import Journal, StartupError, StorageError
from limiterd.storage.factory import default_db_path, open_journal
from limiterd.storage.memory import MemoryJournal

__all__ = [
    "Journal", "MemoryJournal", "StartupError", "StorageError", "default_db_path", "open_journal",
]
