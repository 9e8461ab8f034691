"""Files written whole or not at all: a temporary file beside the target, renamed over it once complete.

A run interrupted while writing (Ctrl-C, SIGTERM, an error, a full disk) leaves the previous file as it was and
no partial file behind; a rename within one folder is atomic, so a reader sees the old file or the new one.
SIGTERM's default action ends the process without unwinding, so the command line turns it into an exception
(`terminate_on_sigterm`) for this cleanup to run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
PARTIAL_MARK = ".partial"


class Terminated(BaseException):
    """The process received SIGTERM (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def terminate_on_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in the main thread, so `atomic_output` blocks remove their partial files."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def temporary_name(target: PathLike) -> Path:
    """A hidden name beside `target` that keeps its suffix (FFmpeg picks the container from it) and says what it
    is: `.out.mp4.ab12cd.partial.mp4` for `out.mp4`."""
    target = Path(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_MARK + target.suffix,
                                    dir=target.parent)
    os.close(handle)
    return Path(name)


def _default_mode() -> int:
    # mkstemp makes the file private (0600); a finished output gets the mode a plain open() would have given it.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(target: PathLike) -> Iterator[Path]:
    """`with atomic_output("out.mp4") as partial:` write `partial` completely; on leaving the block normally it
    replaces `out.mp4`, on any exception (KeyboardInterrupt and `Terminated` included) it is deleted and
    `out.mp4` is left untouched. The target's folder must exist."""
    target = Path(target)
    partial = temporary_name(target)
    try:
        yield partial
        os.chmod(partial, _default_mode())
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
