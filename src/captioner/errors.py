"""Errors the user can act on. The CLI prints them as one line, never a traceback."""

from __future__ import annotations


class CaptionerError(Exception):
    """A failure with a message meant for the user (bad input, missing file, no network...)."""


class BadImageError(CaptionerError):
    """An image that cannot be used. Names the file and the reason."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        """Picklable with its two arguments: it crosses from DataLoader workers (and Ray
        actors) back to the process that reports it."""
        return (type(self), (self.path, self.reason))
