"""The `tandem` command: every subcommand, each group in its own module (main.py assembles them).
It ties every package together (it starts gateways and device agents); nothing imports it."""

from .main import app, main

__all__ = ["app", "main"]
