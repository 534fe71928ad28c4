"""The SQLite journal, in parts: connection (its thread, the transaction helper), schema
(pragmas, migrations, row checks), plan (batches -> SQL), rows (SQL -> Snapshot), lock (one
daemon per database), errors (the operator's lines), errorstore (the error log's rows), and
journal, which puts them together."""

from limiterd.storage.sqlite.journal import SqliteJournal
from limiterd.storage.sqlite.schema import MIGRATIONS, Synchronous

__all__ = ["MIGRATIONS", "SqliteJournal", "Synchronous"]
