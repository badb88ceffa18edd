"""What every command shares around its body: one-line errors and exit codes
(``run_guarded``), output files written atomically into an existing directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import typer

from .errors import MinsharpError, first_line


def check_output_dir(path: Path) -> Path:
    """The directory an output file goes to; refuse early when it does not exist."""
    directory = Path(path).parent
    if not directory.is_dir():
        raise MinsharpError(f"{path}: directory {directory} does not exist")
    if Path(path).is_dir():
        raise MinsharpError(f"{path}: is a directory")
    return directory


def write_atomically(path: Path, data) -> None:
    """Write text or bytes to a temporary file beside ``path`` and rename it over ``path``:
    never a partial file."""
    directory = check_output_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_guarded(debug: bool, body: Callable[[], int]) -> None:
    """Run a command body; turn errors into one line on stderr and exit code 2."""
    import numpy as np

    try:
        with np.errstate(all="ignore"):  # overflow is reported as an error, not a warning
            code = body()
    except MinsharpError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(2)
    except Exception as exc:  # a bug or an unforeseen input: still one line, no traceback
        if debug:
            raise
        first = first_line(exc)
        typer.echo(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug "
                   "for the traceback)", err=True)
        raise typer.Exit(2)
    raise typer.Exit(code)


def npz_bytes(arrays: dict) -> bytes:
    """An uncompressed .npz (no pickles) of float64 arrays, as bytes."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
    return buf.getvalue()
