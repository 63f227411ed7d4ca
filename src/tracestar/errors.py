"""Errors that are the user's doing: bad input files, mismatched models, corrupted indexes.

The CLI prints them as one line and exits non-zero; the Python API raises them.
"""


class UserError(Exception):
    """Something the user can fix; its message is one line naming the file, line and field."""


class InputError(UserError):
    """A malformed corpus or query file: `path:line: field 'x': what is wrong`."""

    def __init__(self, path: object, line: int | None, field: str | None, problem: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field, self.problem = path, line, field, problem


class IndexStoreError(UserError):
    """An index that is incomplete, corrupted or does not belong to the given model."""
