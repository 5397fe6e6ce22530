"""Error types shared by every layer.

An ``InfraError`` means the harness could not obtain a trustworthy answer (the target did not boot,
the record stream is damaged, a wait expired).  It is never a test verdict: pytest reports it as an
error, not as a failure.
"""


class HarnessError(Exception):
    """Base class of the harness' own errors."""


class ConfigError(HarnessError):
    """Bad user input (a YAML file, a command-line argument); the message is one line."""


class BuildError(HarnessError):
    """The payload could not be built (assembler or linker failed)."""


class InfraError(HarnessError):
    """The run could not produce a trustworthy result; ``stage`` says where it broke."""

    def __init__(self, message: str, *, stage: str = "run", evidence: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.evidence = evidence


class RecordStreamError(InfraError):
    """The framed record stream is missing, reordered, corrupted or truncated."""

    def __init__(self, message: str, *, evidence: str | None = None):
        super().__init__(message, stage="records", evidence=evidence)


class RunTimeout(InfraError):
    """A bounded wait expired; the message says what was awaited and what was seen last."""

    def __init__(self, message: str, *, evidence: str | None = None):
        super().__init__(message, stage="timeout", evidence=evidence)
