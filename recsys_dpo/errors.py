"""The one exception type for bad user input.

Every stage raises `DataError` for input it cannot accept; the CLIs print its message alone
(no traceback) and exit with status 2, so the message must name the file, column and rows at
fault and say what was expected.
"""


class DataError(ValueError):
    """Input the user must fix: bad path, missing column, unparsable value, empty data."""
