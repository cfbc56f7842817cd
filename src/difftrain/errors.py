"""Exceptions shown to users as one clear message (no traceback) by the CLI."""


class HubUploadError(RuntimeError):
    """Uploading to the Hugging Face hub failed; the local export is complete."""
