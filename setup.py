"""Install with ``pip install -e .``. The native extension is built by ``setup_native.py`` logic (see csrc/)."""

from setuptools import setup

setup()
