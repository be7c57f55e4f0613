"""The `unipeft` command line (train, eval, generate, merge, info, methods, demo). Needs the `cli` extra."""

from .main import main

__all__ = ["main"]
