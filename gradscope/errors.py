"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class GradscopeError(Exception):
    """An error caused by the user's input (file, row, field, model, option), not by a bug."""


class DataError(GradscopeError):
    """Bad preference data. The message names the file, the line or row and the field."""

    def __init__(self, source: str, message: str, *, where: str | None = None, field: str | None = None):
        parts = [str(source)]
        if where:
            parts.append(where)
        if field:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts + [message]))
        self.source, self.where, self.field = str(source), where, field


class ModelError(GradscopeError):
    """A model that cannot be found or loaded."""
