"""Layer 3: understanding.  Raw runs become typed observations that tests assert on."""

from .probe import DmarUnit, Probe, capabilities
from .run import ExceptionInfo, Run, observe

__all__ = ["DmarUnit", "ExceptionInfo", "Probe", "Run", "capabilities", "observe"]
