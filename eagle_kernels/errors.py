"""Exceptions shared by the backend table and the op modules.

Kept apart from :mod:`eagle_kernels.backend` so that modules the backend imports (``tree_buffers``) can raise them
without importing the backend back.
"""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend (or the native extension) cannot run on this machine."""
