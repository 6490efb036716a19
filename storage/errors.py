"""Errors of the storage layer that callers report to operators (kept free of heavy imports,
so that commands that never open the database do not load its drivers)."""


class DatabaseError(RuntimeError):
    """The database cannot be used (unreachable, newer schema); the message says which."""
