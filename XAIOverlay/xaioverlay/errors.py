"""Errors a user can act on.

Every exception raised for bad input derives from :class:`XAIOverlayError`; its message is one line
that names the problem and the fix. The CLI prints it and exits non-zero; the Slicer module shows it
in an error dialog.
"""


class XAIOverlayError(Exception):
    """Base class for user-facing errors (one-line message: problem and fix)."""


class InputError(XAIOverlayError):
    """A volume or argument given by the user cannot be used."""


class ModelError(XAIOverlayError):
    """A model cannot be loaded, or does not allow what was asked of it."""


class TargetError(XAIOverlayError):
    """The requested explanation target is invalid for this model or input."""


class Cancelled(XAIOverlayError):
    """The user stopped the run (Ctrl-C, Cancel button); nothing partial was written."""
