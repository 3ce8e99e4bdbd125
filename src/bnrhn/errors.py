"""Errors that are the user's to act on: the command line prints their message without a traceback.

(A module of its own, without torch, so that the command line can catch them without importing it.)
"""

from __future__ import annotations


class UserFacingError(Exception):
    """Base of the errors whose message says what happened and what to do."""


class CheckpointWriteError(UserFacingError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous checkpoint is unchanged."""
