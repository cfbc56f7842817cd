"""Exceptions shown to users as one clear message (no traceback) by the CLI."""


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
