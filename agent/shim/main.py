"""``python -S -m agent.shim FD``: a shim for skiffd's pool (see :mod:`agent.shim.launch`)."""

from agent.shim.launch import main

__all__ = ["main"]
