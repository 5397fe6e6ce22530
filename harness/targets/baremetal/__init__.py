"""Bare-metal hosts: a target assembled from small drivers chosen in YAML (power, console, boot,
lease), labgrid-style, one file per driver kind."""

from .target import BareMetalTarget

__all__ = ["BareMetalTarget"]
