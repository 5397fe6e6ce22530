"""Build, run and observe a scenario on a target: the one path every caller uses."""

from __future__ import annotations

from pathlib import Path

from ..payload.image import Image, Scenario, build
from ..targets.base import Target
from .run import Run, observe


def image_for(target: Target, scenario: Scenario) -> Image:
    image = build(scenario)
    if target.IMAGE_FORMAT == "disk":
        image.disk()
    return image


def run_scenario(target: Target, scenario: Scenario, evidence: Path, timeout: float | None = None) -> Run:
    """Build ``scenario`` (cached), run it on ``target`` with evidence under ``evidence``, type it."""
    return observe(target.run(image_for(target, scenario), evidence, timeout))
