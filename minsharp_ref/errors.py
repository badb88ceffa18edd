"""The one error type the project raises for bad input."""


class MinsharpError(Exception):
    """A problem with the user's input (model, data, options), reported as one line.

    The CLI prints ``error: <message>`` on stderr and exits with code 2; no traceback.
    Messages name the file and, where it applies, the node, key, shape or value at fault.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty),
    for one-line errors that wrap a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
