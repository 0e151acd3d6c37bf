"""The command line (`python -m pti_ops`, `pti-ops`): one module per command, shared options in `options.py`."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
