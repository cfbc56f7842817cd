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
