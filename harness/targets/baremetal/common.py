"""What the bare-metal drivers share: argv commands run as tracked children, secrets from env."""

from __future__ import annotations

import os
import subprocess
from typing import Any, Mapping, Sequence

from ...errors import ConfigError, InfraError
from .. import proc
from ..config import ENV_NAME, HOST_NAME, USER_NAME, Field, command_name, duration, show, validate


class HostError(InfraError):
    """An infrastructure step on a bare-metal host failed; the message names host and stage."""


def driver_config(section: Any, schema: dict[str, Field], where: str, path: str) -> dict[str, Any]:
    """Validate one driver's mapping (its schema depends on the chosen driver)."""
    return validate(section, schema, where, path)


def argv_list(value: Any, where: str) -> Any:
    """A Field check for a command given as an argv list: a program first, then its arguments."""
    if not value:
        raise ConfigError(f"{where}: expected a program and its arguments, got an empty list")
    command_name(value[0], f"{where}[0]")
    return value


# A command run without a shell, as [program, argument, ...].
ARGV_FIELD = Field(list, required=True, items=Field(str), check=argv_list, doc="program and arguments (no shell)")


def secret(env_name: str | None, where: str) -> str | None:
    """The value of the environment variable ``env_name`` (the YAML holds only the name).

    An unset variable is found at run time, so it is an infrastructure error naming the variable
    (the test cannot run), not a ConfigError (a usage error) and never a test verdict; the value is
    never part of any message."""
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if value is None:
        raise HostError(f"{where}: environment variable {show(env_name)[1:-1]} is not set", stage="credentials")
    return value


def run_argv(argv: Sequence[str], *, label: str, stage: str, timeout: float,
             env: Mapping[str, str] | None = None, check: bool = True) -> tuple[int, str]:
    """Run ``argv`` (no shell) as a tracked child, bounded by ``timeout``; return (status, output)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        p = proc.spawn(list(argv), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        raise HostError(f"{label}: {stage}: cannot run {argv[0]}: {e.strerror}", stage=stage) from None
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.end(p)
        raise HostError(f"{label}: {stage}: {argv[0]} did not finish within {timeout:.0f} s", stage=stage) from None
    finally:
        proc.end(p)
    text = out.decode(errors="replace").strip() if out else ""
    if check and p.returncode != 0:
        raise HostError(f"{label}: {stage}: {' '.join(argv[:3])} ... failed with status {p.returncode}: "
                        f"{text[-300:] or '(no output)'}", stage=stage)
    return p.returncode, text


def ipmi_argv(cfg: Mapping[str, Any]) -> list[str]:
    """The common ipmitool arguments; the password travels in IPMI_PASSWORD (``-E``), never argv."""
    argv = [cfg["binary"], "-I", cfg["interface"], "-H", cfg["bmc"], "-p", str(cfg["port"]), "-U", cfg["user"]]
    if cfg["password_env"]:
        argv.append("-E")
    return argv


def ipmi_env(cfg: Mapping[str, Any], where: str) -> dict[str, str]:
    pw = secret(cfg["password_env"], f"{where}: password_env")
    return {"IPMI_PASSWORD": pw} if pw is not None else {}


IPMI_SCHEMA: dict[str, Field] = {
    "bmc": Field(str, required=True, check=HOST_NAME, doc="BMC host name or address"),
    "user": Field(str, required=True, check=USER_NAME, doc="BMC user"),
    "password_env": Field((str, type(None)), default=None, check=ENV_NAME,
                          doc="name of the environment variable holding the BMC password"),
    "interface": Field(str, default="lanplus", choices=("lanplus", "lan", "open")),
    "port": Field(int, default=623, low=1, high=65535),
    "binary": Field(str, default="ipmitool", check=command_name),
    "timeout_s": duration(30.0),
}
