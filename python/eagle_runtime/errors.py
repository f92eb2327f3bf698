"""How the command lines report bad input: one line on stderr and exit status 2, never a traceback.

Shared by ``python -m eagle_runtime`` (:mod:`.cli`) and the trainers' commands (:mod:`.train`), so that neither
imports the other.
"""

from __future__ import annotations

import argparse
import sys

from eagle_kernels import BackendUnavailable

from .config import ConfigError
from .loading import CheckpointError

# The errors the library raises for bad input; each becomes one line and exit status 2.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ConfigError, CheckpointError, BackendUnavailable, ValueError)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: ...``) with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str) -> int:
    """Print ``error: message`` on stderr; returns the exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


__all__ = ["OneLineParser", "USER_ERRORS", "fail"]
