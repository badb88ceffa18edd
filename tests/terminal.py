"""Run a command under a pseudo-terminal and replay what a terminal would show."""

import os
import re
import subprocess

#: escape sequences rich's live display uses: colours/styles, cursor show/hide, erase line, up
CSI = re.compile(r"\x1b\[(\??[0-9;]*)([A-Za-z])")


def pty_available() -> bool:
    """Whether this machine can open a pseudo-terminal (POSIX with /dev/pts)."""
    try:
        import pty

        for fd in pty.openpty():
            os.close(fd)
        return True
    except (ImportError, OSError):
        return False


def run_in_pty(args, env=None, columns=120, cwd=None):
    """Run ``args`` with stdout and stderr on one pseudo-terminal (raw mode: no newline
    translation) of ``columns`` columns; return (exit code, everything written, as text)."""
    import fcntl
    import pty
    import struct
    import termios
    import tty

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    tty.setraw(slave)
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=cwd,
                         close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(), b"".join(chunks).decode()


def screens(stream: str):
    """Replay ``stream`` on a line buffer (\\r, \\n, erase line, cursor up; styles
    dropped) and yield the screen's lines after every carriage return, i.e. every frame of
    a live display, and at the end."""
    lines, row, col = [""], 0, 0
    pos = 0
    for m in list(CSI.finditer(stream)) + [None]:
        text = stream[pos:m.start() if m else len(stream)]
        for ch in text:
            if ch == "\r":
                col = 0
                yield list(lines)
            elif ch == "\n":
                row, col = row + 1, 0
                if row == len(lines):
                    lines.append("")
            else:
                line = lines[row].ljust(col)
                lines[row] = line[:col] + ch + line[col + 1:]
                col += 1
        if m is None:
            break
        pos = m.end()
        arg, op = m.groups()
        if op == "K":
            lines[row] = ""
        elif op == "A":
            row = max(0, row - int(arg or 1))
    yield list(lines)
