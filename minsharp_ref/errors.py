"""The one error type the project raises for bad input."""


class MinsharpError(Exception):
    """A problem with the user's input (model, data, options), reported as one line.

    The CLI prints ``error: <message>`` on stderr and exits with code 2; no traceback.
    Messages name the file and, where it applies, the node, key, shape or value at fault.
    """
