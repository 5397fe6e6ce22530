"""VT-x / VT-d test harness: Python builds the payload, targets run it, observations are asserted."""

__version__ = "0.1.0"
