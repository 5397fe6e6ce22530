"""Build, run and observe a scenario on a target: the one path every caller uses."""

from __future__ import annotations

from pathlib import Path

from ..errors import RunTimeout
from ..payload.image import Image, Scenario, build
from ..payload.records import Kind, Record
from ..payload.steps import Op, Step
from ..targets.base import Target, parse_serial_log
from .run import STEP_KINDS, Run, observe

# Steps that emit a record carrying their index when they finish (unless quiet).
_REPORTING = {Op.MMIO_READ, Op.IO_READ, Op.POLL, Op.CPUID, Op.MEM_READ, Op.MEM_COMPARE, Op.CALL,
              Op.MARK, Op.WAIT_IRQ, Op.SYNC}
_ARG_NAMES = {Op.MMIO_WRITE: ("addr", "value"), Op.MMIO_READ: ("addr",), Op.IO_WRITE: ("port", "value"),
              Op.IO_READ: ("port",), Op.POLL: ("addr", "mask", "expected", "max_iterations"),
              Op.RDMSR: ("msr",), Op.WRMSR: ("msr", "value"), Op.CPUID: ("leaf", "subleaf"),
              Op.MEM_READ: ("addr", "qwords"), Op.MEM_FILL: ("addr", "bytes", "pattern"),
              Op.MEM_COMPARE: ("addr", "bytes", "pattern"), Op.MEM_COPY: ("dst", "src", "bytes"),
              Op.CALL: ("routine", "rdi", "rsi", "rdx"), Op.MARK: ("tag",),
              Op.WAIT_IRQ: ("vector", "max_iterations"), Op.DELAY: ("iterations",), Op.SET_VAR: ("value",),
              Op.SYNC: ("max_polls",)}


def image_for(target: Target, scenario: Scenario) -> Image:
    image = build(scenario)
    if target.IMAGE_FORMAT == "disk":
        image.disk()
    return image


def run_scenario(target: Target, scenario: Scenario, evidence: Path, timeout: float | None = None) -> Run:
    """Build ``scenario`` (cached), run it on ``target`` with evidence under ``evidence``, type it."""
    image = image_for(target, scenario)
    try:
        raw = target.run(image, evidence, timeout)
    except RunTimeout as e:
        # Name what the payload was doing: the step it had not finished, with its arguments.
        raise RunTimeout(f"{e}\n  pending: {pending_step(scenario, parse_serial_log(evidence).records)}",
                         evidence=e.evidence) from None
    return observe(raw, steps=len(scenario.steps.steps))


def describe_step(index: int, step: Step) -> str:
    """``step 3 POLL addr=0xfed9001c (+ var 1) mask=0x1 expected=0x1 max_iterations=0x186a0``."""
    names = _ARG_NAMES.get(step.op, ())
    args = " ".join(f"{n}={a:#x}" if isinstance(a, int) else f"{n}={a}" for n, a in zip(names, step.args))
    base = f" (+ var {step.base})" if step.base is not None else ""
    note = f" [{step.comment}]" if step.comment else ""
    return f"step {index} {step.op.name} {args}{base}{note}".rstrip()


def pending_step(scenario: Scenario, records: list[Record]) -> str:
    """What the payload had not finished when the wait expired, judged from the records seen."""
    if not records or records[0].kind != Kind.HELLO:
        return "boot (no HELLO record: the payload never reached its first record)"
    if scenario.probe and not any(r.kind == Kind.PROBE_DONE for r in records):
        return f"the boot probe (last record: {records[-1]})"
    steps = scenario.steps.steps
    done = [r.fields[0] for r in records if r.kind in STEP_KINDS and r.fields and r.fields[0] < len(steps)]
    first = max(done) + 1 if done else 0
    if first >= len(steps):
        return f"the end of the walk (all {len(steps)} steps reported; no terminal record)"
    # Steps without a record of their own may have finished; the first reporting step had not.
    last = next((i for i in range(first, len(steps)) if steps[i].op in _REPORTING and not steps[i].quiet),
                len(steps) - 1)
    span = [describe_step(i, steps[i]) for i in range(first, last + 1)]
    if len(span) == 1:
        return span[0]
    return f"one of steps {first}..{last} (no record after step {first - 1}): " + "; ".join(span[-4:])
