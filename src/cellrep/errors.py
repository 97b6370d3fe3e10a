"""The one exception type users see: a problem and the fix, in one message."""


class CellrepError(Exception):
    """Bad input or configuration. The message names the problem and the fix.

    Entry points catch it and print only the message (no traceback), so raise
    it with text a user can act on: ``CellrepError("metadata.csv lacks column
    'plate'", fix="add it or map it with data.columns")``.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
