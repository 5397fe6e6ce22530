"""Labs on labgrid: a lease that reserves and acquires a place from a labgrid coordinator.

A bare-metal target whose ``lease`` says ``backend: labgrid`` names a coordinator and either a
place or a tag filter (``vmx=1 vtd=1``).  Acquiring creates a labgrid reservation (the
coordinator's scheduler gives each waiting reservation a different free place, by priority and
age, so N xdist workers share N places), waits for its allocation (bounded, logged), and acquires
the allocated place.  The place's exported resources then drive the host:

=========================================  ===============================================
place resource                             used as
=========================================  ===============================================
NetworkService named ``ssh`` (or the only  SSH address and login of the host's own OS
one not named ``bmc``)                     (kexec and GRUB boot methods, restore check)
NetworkSerialPort (raw or rfc2217)         console, through labgrid's SerialDriver
NetworkPowerPort, PDUDaemonPort            power, through labgrid's power drivers
NetworkService named ``bmc``               IPMI power (ipmitool) and SOL console when the
                                           place has no power resource / serial port
=========================================  ===============================================

What the place lacks, the target's own ``power``/``console`` sections provide.  Every console
read and power action first checks that the place is still ours: a place taken away mid-run (or a
coordinator that went away) ends the run with an infrastructure error, never a verdict, and the
host is then not touched (no restore cycle on a place someone else holds).  Release happens on
every path: the reservation is cancelled and the place released, so nothing stays behind.

The coordinator is reached through labgrid's own client API (``labgrid.remote.client``): its
ClientSession runs on a private event-loop thread, so place updates keep arriving while the run
reads its console, and every call is bounded by a timeout naming the coordinator.  labgrid is an
optional extra (``pip install 'vtx-harness[labgrid]'``); it is imported only when a lease is taken.
"""

from __future__ import annotations

import asyncio
import copy
import getpass
import logging
import os
import re
import socket
import threading
import time
from typing import Any, Callable

from ...errors import ConfigError, InfraError
from ..config import Field, duration, show, validate
from ..ssh import SSH_SCHEMA, SshSettings
from .common import IPMI_SCHEMA, HostError
from .console import ConsoleDriver, ConsoleLost, SolConsole
from .lease import Lease, LeaseNotObtained
from .power import IpmiPower, PowerDriver

log = logging.getLogger("vtx.lease")

# labgrid's tag rules (labgrid.remote.common.TAG_KEY; values kept to one safe word so they can be
# shown in every message as they are).
TAG_KEY = re.compile(r"[a-z][a-z0-9_]+")
TAG_VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}")
PLACE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,99}")
COORDINATOR = re.compile(r"(?:[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
DEFAULT_PORT = 20408             # labgrid's coordinator port
# labgrid's client keepalive settings (labgrid.remote.client.ClientSession), kept as they are.
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 7500), ("grpc.keepalive_timeout_ms", 10000),
                    ("grpc.http2.ping_timeout_ms", 10000), ("grpc.http2.max_pings_without_data", 0)]
POLL_S = 0.5                     # how often a waiting reservation is polled (also keeps it alive)


def parse_tags(value: Any, where: str) -> dict[str, str]:
    """A tag filter: ``"vmx=1 vtd=1"`` or a mapping; labgrid's key rule, one-word values."""
    if isinstance(value, str):
        pairs: dict[str, str] = {}
        for word in value.split():
            key, sep, val = word.partition("=")
            if not sep:
                raise ConfigError(f"{where}: expected key=value words such as 'vmx=1 vtd=1', got {show(word)}")
            if key in pairs:
                raise ConfigError(f"{where}: tag {show(key)} given twice")
            pairs[key] = val
    elif isinstance(value, dict):
        pairs = {k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in value.items()}
    else:
        raise ConfigError(f"{where}: expected a string of key=value words or a mapping, got {show(value)}")
    if not pairs:
        raise ConfigError(f"{where}: expected at least one tag, e.g. 'vmx=1 vtd=1'")
    for key, val in pairs.items():
        if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
            raise ConfigError(f"{where}: tag key {show(key)}: expected a labgrid tag key "
                              "(a lower-case letter, then lower-case letters, digits or '_')")
        if not isinstance(val, str) or not TAG_VALUE.fullmatch(val):
            raise ConfigError(f"{where}: tag {key}: expected one word (letters, digits, '_', '.', ':', "
                              f"'+', '-'), got {show(val)}")
    return pairs


def _coordinator(value: Any, where: str) -> Any:
    """HOST[:PORT] as labgrid takes it (port 20408 when left out); normalised to HOST:PORT."""
    if value is None:
        return None
    if not COORDINATOR.fullmatch(value):
        raise ConfigError(f"{where}: expected HOST[:PORT] of a labgrid coordinator (e.g. lab.example:20408), "
                          f"got {show(value)}")
    if not re.search(r":[0-9]+$", value) or value.endswith("]"):
        value = f"{value}:{DEFAULT_PORT}"
    if not 1 <= int(value.rsplit(":", 1)[1]) <= 65535:
        raise ConfigError(f"{where}: port: expected 1..65535, got {show(value)}")
    return value


def _place_name(value: Any, where: str) -> Any:
    if value is not None and not PLACE_NAME.fullmatch(value):
        raise ConfigError(f"{where}: expected a labgrid place name (letters, digits, '_', '.', ':', '+', "
                          f"'-'), got {show(value)}")
    return value


def _tags_field(value: Any, where: str) -> Any:
    return None if value is None else parse_tags(value, where)


# The SSH keys of the target file that stay local (credentials, host-key policy); address, port
# and login come from the place's NetworkService.
PLACE_SSH_SCHEMA: dict[str, Field] = {k: f for k, f in SSH_SCHEMA.items() if k not in ("host", "port", "user")}
# IPMI through a NetworkService named "bmc": its address and username are the BMC's, the rest is here.
PLACE_BMC_SCHEMA: dict[str, Field] = {k: f for k, f in IPMI_SCHEMA.items() if k not in ("bmc", "user")}


class LabgridLease(Lease):
    """A place from a labgrid coordinator, by name or by tags; see the module docstring."""

    SUPPLIES = frozenset({"power", "console", "ssh"})
    SCHEMA = {
        "backend": Field(str, default="labgrid", choices=("labgrid",)),
        "coordinator": Field((str, type(None)), default=None, check=_coordinator,
                             doc="HOST[:PORT] of the labgrid coordinator (default: $LG_COORDINATOR, as labgrid)"),
        "place": Field((str, type(None)), default=None, check=_place_name, doc="one named place"),
        "tags": Field((str, dict, type(None)), default=None, check=_tags_field,
                      doc="a tag filter, e.g. 'vmx=1 vtd=1': any free place whose tags include these"),
        "priority": Field(int, default=0, low=-100, high=100,
                          doc="labgrid reservation priority (higher is served first)"),
        "timeout_s": duration(600.0, "how long to wait for a free place"),
        "connect_timeout_s": duration(15.0, "bound on each exchange with the coordinator"),
        "ssh": Field(dict, default={}, schema=PLACE_SSH_SCHEMA,
                     doc="key, known_hosts and host-key policy for the place's NetworkService 'ssh'"),
        "bmc": Field(dict, default={}, schema=PLACE_BMC_SCHEMA,
                     doc="ipmitool settings for the place's NetworkService 'bmc' (password by env name)"),
    }

    @classmethod
    def check_config(cls, cfg: dict[str, Any], where: str) -> None:
        if (cfg["place"] is None) == (cfg["tags"] is None):
            raise ConfigError(f"{where}place / {where}tags: expected exactly one of them (a place name, or a "
                              "tag filter such as 'vmx=1 vtd=1')")

    def __init__(self, host: str, cfg: dict[str, Any], label: str):
        super().__init__(host, cfg, label)
        self.check_config(cfg, f"{label}: baremetal.lease.")
        # A named place is a reservation for the tag "name": the coordinator's scheduler matches
        # place names that way, so waiting works the same for both.
        self.filter: dict[str, str] = cfg["tags"] if cfg["tags"] is not None else {"name": cfg["place"]}
        self.coordinator: str = cfg["coordinator"] or ""
        self.session: CoordinatorSession | None = None
        self.token: str | None = None
        self.place: str | None = None
        self.resources: dict[tuple[str, str], Any] = {}
        self.lost: str | None = None

    def describe_filter(self) -> str:
        if self.cfg["tags"] is None:
            return f"place {self.cfg['place']}"
        return "tags " + " ".join(f"{k}={v}" for k, v in sorted(self.filter.items()))

    # -- acquire / release -------------------------------------------------------------------

    def acquire(self, holder: str) -> None:
        if not self.coordinator:
            # As labgrid's own tools: the environment names the lab's coordinator.
            env = os.environ.get("LG_COORDINATOR")
            if not env:
                raise HostError(f"{self.label}: lease: no labgrid coordinator: baremetal.lease.coordinator is "
                                "not set and LG_COORDINATOR is not in the environment", stage="lease")
            self.coordinator = _coordinator(env, "environment variable LG_COORDINATOR")
        self.session = CoordinatorSession(self.coordinator, self.label, self.cfg["connect_timeout_s"])
        try:
            self.session.release_stale(self.filter)
            self._reserve_and_acquire(holder)
        except BaseException:
            try:
                self.release()
            except HostError as e:          # never replaces the error that ended the acquisition
                log.warning("%s", e)
            raise

    def _reserve_and_acquire(self, holder: str) -> None:
        assert self.session is not None
        s, what = self.session, self.describe_filter()
        matching = s.matching_places(self.filter)
        if not matching:
            raise LeaseNotObtained(f"{self.label}: lease: no place at labgrid coordinator {self.coordinator} "
                                   f"matches {what} (places: {', '.join(sorted(s.place_names())) or 'none'})")
        self.token = s.create_reservation(self.filter, self.cfg["priority"])
        bound = self.cfg["timeout_s"]
        deadline = time.monotonic() + bound
        waited = False
        while True:
            state, allocation = s.poll_reservation(self.token)
            if state == "allocated" and allocation:
                break
            if state not in ("waiting", "allocated"):
                raise LeaseNotObtained(f"{self.label}: lease: reservation {self.token} for {what} at labgrid "
                                       f"coordinator {self.coordinator} became {state}")
            if not waited:
                waited = True
                log.info("%s: waiting up to %.1f s for a place with %s at labgrid coordinator %s (%s)",
                         self.label, bound, what, self.coordinator, s.holders(self.filter))
            if time.monotonic() >= deadline:
                raise LeaseNotObtained(f"{self.label}: lease: no place with {what} became free at labgrid "
                                       f"coordinator {self.coordinator} within {bound:.1f} s "
                                       f"({s.holders(self.filter)})")
            time.sleep(POLL_S)
        self.place = allocation
        s.acquire_place(allocation)
        if waited:
            log.info("%s: place %s acquired (%s)", self.label, allocation, what)
        self.resources = s.place_resources(allocation)
        log.debug("%s: %s holds place %s for %s", self.label, s.name, allocation, holder)

    def release(self) -> None:
        """Release the place and cancel the reservation; each step runs even if another fails."""
        s = self.session
        if s is None:
            return
        self.session = None
        problems: list[str] = []
        if self.place is not None and self.lost is None:
            try:
                s.release_place(self.place)
            except Exception as e:
                problems.append(f"release place {self.place}: {e}")
        if self.token is not None:
            try:
                s.cancel_reservation(self.token)
            except Exception as e:
                problems.append(f"cancel reservation {self.token}: {e}")
        s.close()
        self.token = None
        if problems:
            raise HostError(f"{self.label}: lease: labgrid coordinator {self.coordinator}: "
                            + "; ".join(problems), stage="lease")

    # -- while held ---------------------------------------------------------------------------

    def check(self) -> None:
        if self.lost is None and self.session is not None and self.place is not None:
            self.lost = self.session.lost(self.place)
        if self.lost is not None:
            raise HostError(f"{self.label}: lease: {self.lost}; the run ends without a verdict", stage="lease")

    def attach(self, target: Any) -> Any:
        """A copy of the bare-metal target driven by the place's resources (see the module table)."""
        assert self.place is not None
        placed = copy.copy(target)
        placed.host = self.place
        placed.label = label = f"target {target.name} (host {self.place})"
        self.label = label                     # the lease's own messages name the place from now on
        where = f"labgrid place {self.place} at {self.coordinator}"
        by_cls: dict[str, list[tuple[str, Any]]] = {}
        for (name, cls), entry in sorted(self.resources.items()):
            by_cls.setdefault(cls, []).append((name, entry))
        services = dict(by_cls.get("NetworkService", []))
        bmc = services.pop("bmc", None)
        ssh_entry = services.get("ssh") or (next(iter(services.values())) if len(services) == 1 else None)

        if ssh_entry is not None:
            args = ssh_entry.args
            ssh_cfg = validate({**self.cfg["ssh"], "host": args["address"], "port": int(args.get("port", 22)),
                                "user": args["username"]}, SSH_SCHEMA, where, "NetworkService ssh.")
            placed.ssh = SshSettings.from_section(ssh_cfg)
        elif target.boot.NEEDS_SSH:
            raise HostError(f"{label}: lease: {where} has no NetworkService 'ssh' (boot method "
                            f"{target.boot.NAME} needs SSH); its resources: {self.describe_resources()}",
                            stage="lease")
        placed.boot = type(target.boot)(target.boot.cfg, label, placed.ssh)

        bmc_cfg = None
        if bmc is not None:
            bmc_cfg = validate({**self.cfg["bmc"], "bmc": bmc.args["address"], "user": bmc.args["username"]},
                               IPMI_SCHEMA, where, "NetworkService bmc.")
        power_entries = by_cls.get("NetworkPowerPort", []) + by_cls.get("PDUDaemonPort", [])
        if power_entries:
            power: PowerDriver | None = PlacePower(self.place, power_entries[0], label, where)
        elif bmc_cfg is not None:
            power = IpmiPower(bmc_cfg, label, where)
        else:
            power = target.power
        serial = by_cls.get("NetworkSerialPort", [])
        if serial:
            console: ConsoleDriver | None = PlaceConsole(self.place, serial[0], label, where)
        elif bmc_cfg is not None:
            console = SolConsole(bmc_cfg, label, where)
        else:
            console = target.console
        for part, driver in (("power", power), ("console", console)):
            if driver is None:
                raise HostError(f"{label}: lease: {where} offers no {part} resource and the target file has "
                                f"no baremetal.{part}; its resources: {self.describe_resources()}", stage="lease")
        placed.power = _Guarded(power, self.check, ("on", "off", "cycle", "status"))
        placed.console = _Guarded(console, self.check, ("open", "read", "write"))
        return placed

    def describe_resources(self) -> str:
        return ", ".join(f"{cls} {name}" for name, cls in sorted(self.resources)) or "none"


class _Guarded:
    """A driver whose actions first check that the lease still holds (a place can be taken away)."""

    def __init__(self, inner: Any, check: Callable[[], None], guarded: tuple[str, ...]):
        self._inner, self._check, self._names = inner, check, guarded

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in self._names:
            return value

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check()
            return value(*args, **kwargs)
        return guarded


# -- the place's resources through labgrid's own drivers ---------------------------------------

def _labgrid_target(place: str, name: str, entry: Any) -> Any:
    """A labgrid Target holding one resource of the place, built as labgrid's client does."""
    from labgrid import target_factory
    return target_factory.make_target(place, {"resources": [{entry.cls: {"name": name, **entry.args}}]})


class PlacePower(PowerDriver):
    """A place's NetworkPowerPort or PDUDaemonPort, switched by labgrid's own power driver."""

    NAME = "labgrid"

    def __init__(self, place: str, resource: tuple[str, Any], label: str, where: str):
        super().__init__({}, label, where)
        self.resource_name, self.entry = resource
        self.place = place
        self.driver: Any = None

    def _driver(self) -> Any:
        if self.driver is None:
            from labgrid.driver.powerdriver import NetworkPowerDriver, PDUDaemonDriver
            cls = NetworkPowerDriver if self.entry.cls == "NetworkPowerPort" else PDUDaemonDriver
            target = _labgrid_target(self.place, self.resource_name, self.entry)
            self.driver = cls(target, name=None)
            target.activate(self.driver)
        return self.driver

    def _do(self, action: str) -> str:
        try:
            driver = self._driver()
            if action == "status":
                return "on" if driver.get() else "off"
            getattr(driver, action)()
            return ""
        except InfraError:
            raise
        except Exception as e:
            raise HostError(f"{self.label}: power-{action}: {self.describe()}: {type(e).__name__}: {e}",
                            stage=f"power-{action}") from None

    def describe(self) -> str:
        args = self.entry.args
        return f"{self.entry.cls} {args.get('model', args.get('pdu', ''))} {args.get('host', '')} index {args.get('index', '')}"


class PlaceConsole(ConsoleDriver):
    """A place's NetworkSerialPort (ser2net raw TCP or RFC 2217), read through labgrid's SerialDriver."""

    NAME = "labgrid"

    def __init__(self, place: str, resource: tuple[str, Any], label: str, where: str):
        super().__init__({}, label, where)
        self.resource_name, self.entry = resource
        self.place = place
        self.driver: Any = None
        self.target: Any = None

    def open(self) -> None:
        from labgrid.driver.serialdriver import SerialDriver
        self.target = _labgrid_target(self.place, self.resource_name, self.entry)
        driver = SerialDriver(self.target, name=None)
        try:
            self.target.activate(driver)
        except Exception as e:
            raise ConsoleLost(f"{self.label}: console: {self.describe()}: cannot open: {e}") from None
        self.driver = driver

    def read(self, timeout: float) -> bytes:
        import serial
        from pexpect import TIMEOUT              # what labgrid's SerialDriver raises on a quiet interval
        assert self.driver is not None
        try:
            return self.driver.read(size=1, max_size=65536, timeout=timeout)
        except TIMEOUT:
            return b""
        except (serial.SerialException, OSError) as e:
            raise ConsoleLost(f"{self.label}: console: {self.describe()} closed the stream ({e})") from None

    def write(self, data: bytes) -> None:
        assert self.driver is not None
        self.driver.write(data)

    def describe(self) -> str:
        a = self.entry.args
        return f"labgrid NetworkSerialPort {a.get('host')}:{a.get('port')} ({a.get('protocol', 'rfc2217')})"

    def close(self) -> None:
        if self.target is not None:
            try:
                self.target.deactivate_all_drivers()
            except Exception:
                pass
            self.target = self.driver = None


# -- the coordinator ---------------------------------------------------------------------------

class CoordinatorSession:
    """labgrid's ClientSession on a private event-loop thread; every call bounded and named.

    The session's user name is ``<login>-vtx<pid>``: the coordinator's overview then shows which
    harness process holds a place, and a place held by a process of this host that no longer
    exists (a killed xdist worker) can be released safely by the next run."""

    def __init__(self, address: str, label: str, bound: float):
        self.address, self.label, self.bound = address, label, bound
        try:
            from labgrid.remote.client import ClientSession
        except ImportError:
            raise InfraError(f"{label}: lease: the labgrid backend needs the labgrid package: "
                             "pip install 'vtx-harness[labgrid]'", stage="lease") from None
        self.user = f"{getpass.getuser()}-vtx{os.getpid()}"
        self.hostname = socket.gethostname()
        self.name = f"{self.hostname}/{self.user}"
        user, hostname = self.user, self.hostname

        class Session(ClientSession):
            def __attrs_post_init__(self) -> None:
                super().__attrs_post_init__()
                # The coordinator keeps one client stream per peer address, and grpc shares one
                # connection between channels to the same address: give this session its own
                # connection, else a second session of this process is refused.
                import grpc
                self.unused_channel, self.channel = self.channel, grpc.aio.insecure_channel(
                    self.address, options=[*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
                self.stub = type(self.stub)(self.channel)

            async def start(self) -> None:
                await self.unused_channel.close()     # never connected (grpc connects lazily)
                await super().start()

            def gethostname(self) -> str:
                return hostname

            def getuser(self) -> str:
                return user

        self._session_cls = Session
        self.loop = _shared_loop()
        self.session: Any = None
        try:
            self.session = self._call(self._start(), "connect")
        except BaseException:
            self.close()
            raise

    async def _start(self) -> Any:
        session = self._session_cls(self.address, asyncio.get_running_loop())
        try:
            await session.start()
        except BaseException:
            await session.stop()
            await session.close()
            raise
        return session

    def _call(self, coro: Any, what: str) -> Any:
        """Run ``coro`` on the session's loop within the bound; errors name the coordinator."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.bound)
        except TimeoutError:
            future.cancel()
            raise LeaseNotObtained(f"{self.label}: lease: labgrid coordinator {self.address} did not answer "
                                   f"({what}) within {self.bound:.1f} s") from None
        except BaseException as e:
            future.cancel()
            if isinstance(e, (InfraError, KeyboardInterrupt, SystemExit)):
                raise
            detail = getattr(e, "details", None)
            text = detail() if callable(detail) else str(e)
            if what == "connect":
                text = f"unreachable or not a labgrid coordinator ({text or type(e).__name__})"
            raise LeaseNotObtained(f"{self.label}: lease: labgrid coordinator {self.address}: {what}: "
                                   f"{text or type(e).__name__}") from None

    def _rpc(self, method: str, request: Any, what: str) -> Any:
        async def call() -> Any:
            response = await getattr(self.session.stub, method)(request)
            await self.session.sync_with_coordinator()
            return response
        return self._call(call(), what)

    # places (read from the session's mirror, which the loop thread keeps current)
    def place_names(self) -> list[str]:
        return list(self.session.places)

    def matching_places(self, fltr: dict[str, str]) -> list[Any]:
        out = []
        for name, place in list(self.session.places.items()):
            tags = {**place.tags, "name": name}
            if all(tags.get(k) == v for k, v in fltr.items()):
                out.append(place)
        return out

    def holders(self, fltr: dict[str, str]) -> str:
        """Who holds each matching place, for the waiting message."""
        parts = []
        for place in sorted(self.matching_places(fltr), key=lambda p: p.name):
            state = f"acquired by {place.acquired}" if place.acquired else \
                ("reserved" if place.reservation else "free")
            parts.append(f"{place.name} {state}")
        return "matching places: " + (", ".join(parts) or "none")

    def release_stale(self, fltr: dict[str, str]) -> None:
        """Give back what a harness process of this host that has died (a SIGKILLed xdist worker)
        left behind: its matching places and its reservations (else they block the next run until
        the coordinator expires them)."""
        from labgrid.remote.common import Reservation
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        prefix = f"{self.hostname}/{getpass.getuser()}-vtx"

        def dead(holder: str | None) -> bool:
            pid = (holder or "")[len(prefix):]
            return bool(holder) and holder.startswith(prefix) and pid.isdigit() and not _alive(int(pid))

        for place in self.matching_places(fltr):
            if dead(place.acquired):
                log.info("%s: place %s was left acquired by %s, which no longer runs: releasing it",
                         self.label, place.name, place.acquired)
                self._rpc("ReleasePlace", pb.ReleasePlaceRequest(placename=place.name, fromuser=place.acquired),
                          f"release place {place.name} left by {place.acquired}")
        response = self._rpc("GetReservations", pb.GetReservationsRequest(), "list reservations")
        for res in map(Reservation.from_pb2, response.reservations):
            if dead(res.owner):
                log.info("%s: cancelling reservation %s left by %s, which no longer runs", self.label,
                         res.token, res.owner)
                self._rpc("CancelReservation", pb.CancelReservationRequest(token=res.token),
                          f"cancel reservation {res.token} left by {res.owner}")

    def create_reservation(self, fltr: dict[str, str], priority: int) -> str:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        request = pb.CreateReservationRequest(filters={"main": pb.Reservation.Filter(filter=fltr)},
                                              prio=float(priority))
        return self._rpc("CreateReservation", request, "create reservation").reservation.token

    def poll_reservation(self, token: str) -> tuple[str, str | None]:
        """(state name, allocated place or None)."""
        from labgrid.remote.common import Reservation
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        res = Reservation.from_pb2(self._rpc("PollReservation", pb.PollReservationRequest(token=token),
                                             f"poll reservation {token}").reservation)
        places = res.allocations.get("main") or []
        return res.state.name, (places[0] if places else None)

    def cancel_reservation(self, token: str) -> None:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        self._rpc("CancelReservation", pb.CancelReservationRequest(token=token), f"cancel reservation {token}")

    def acquire_place(self, place: str) -> None:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        self._rpc("AcquirePlace", pb.AcquirePlaceRequest(placename=place), f"acquire place {place}")

    def release_place(self, place: str) -> None:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        self._rpc("ReleasePlace", pb.ReleasePlaceRequest(placename=place, fromuser=self.name),
                  f"release place {place}")

    def place_resources(self, place: str) -> dict[tuple[str, str], Any]:
        """{(name, class): labgrid ResourceEntry} of the acquired place, as labgrid's client sees them."""
        async def get() -> Any:
            return self.session.get_target_resources(self.session.places[place])
        return dict(self._call(get(), f"resources of place {place}"))

    def lost(self, place: str) -> str | None:
        """Why the place is no longer ours, or None while it is."""
        if self.session.stopping.is_set():
            return f"lost the labgrid coordinator {self.address} mid-run"
        current = self.session.places.get(place)
        if current is None:
            return f"place {place} was deleted at labgrid coordinator {self.address} mid-run"
        if current.acquired != self.name:
            now = f"now acquired by {current.acquired}" if current.acquired else "now released"
            return f"place {place} was taken away at labgrid coordinator {self.address} mid-run ({now})"
        return None

    def close(self) -> None:
        """Stop the session's stream and close its channel (bounded; idempotent)."""
        session, self.session = self.session, None
        if session is None:
            return

        async def stop() -> None:
            await session.stop()
            await session.close()
        future = asyncio.run_coroutine_threadsafe(stop(), self.loop)
        try:
            future.result(self.bound)
        except BaseException as e:       # a closed stream is the goal; say why it was not clean
            future.cancel()
            log.debug("%s: closing the labgrid session: %s", self.label, e)


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _shared_loop() -> asyncio.AbstractEventLoop:
    """The one event loop (on a daemon thread) that every coordinator session of this process
    uses: grpc's asyncio support does not serve channels on several loops at once."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="vtx labgrid client", daemon=True).start()
            _loop = loop
        return _loop


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["CoordinatorSession", "LabgridLease", "PlaceConsole", "PlacePower", "parse_tags"]
