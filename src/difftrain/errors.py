"""Exceptions shown to users as one clear message (no traceback) by the CLI."""

from __future__ import annotations


class HubUploadError(RuntimeError):
    """Uploading to the Hugging Face hub failed; the local export is complete."""


class WriteError(OSError, ValueError):
    """A file could not be written (read-only folder, no permission, disk full); the message names the path.

    An OSError like the failure it reports or predicts, and a ValueError like every other user error
    (DiskSpaceError, below, was a ValueError before it joined this family, and callers may catch that).
    """


class DiskSpaceError(WriteError):
    """Not enough free space for a write; raised before anything is written."""


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, and so on."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequested(BaseException):
    """A stop signal (SIGTERM, Ctrl-C) during training; see training/stop.py.

    A BaseException, like KeyboardInterrupt, so `except Exception` does not swallow it. The CLI prints its
    message and exits with 128 + the signal number.
    """

    def __init__(self, signum: int, message: str = "", logged: bool = False):
        self.signum = int(signum)
        self.logged = logged  # the training loop logged what it kept; other stops are logged by train()
        super().__init__(message or f"stopped by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def describe_error(exc: BaseException) -> str:
    """The one-line text of a user-facing error (the CLI's and the UI's); a library's I/O error gets its kind named."""
    if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)) or type(exc).__module__.startswith("difftrain"):
        return str(exc)
    # e.g. "PermissionError: [Errno 13] Permission denied: 'runs/x/train.log'", "SafetensorError: Error while ..."
    return f"{type(exc).__name__}: {exc}"


def override_words_problem(words: list[str]) -> str | None:
    """"expected key=value, got 'foo'" for command-line words that are not overrides; None when all are."""
    bad = [word for word in words if "=" not in word]
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"expected key=value, got {bad[0]!r}{more}"
