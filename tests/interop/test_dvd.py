"""A virtual DVD drive (UnitType DVD) with real initiators: an ISO reads back byte for byte
through qemu-img, istgtcontrol (ours and the C istgt's) changes the disc, and an initiator
of the drive sees the media change while writes to a disk of the same target never stop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests.functional.initiator import Initiator
from tests.interop.conftest import (
    NODE_BASE, REPO_ROOT, PythonTarget, TargetLayout, free_ports, require_tool, run_tool,
)

pytestmark = pytest.mark.interop

DVD = f"{NODE_BASE}:dvd"
DISK = f"{NODE_BASE}:disk"
ISO_A, ISO_B = "a.iso", "b.iso"


def write_config(layout: TargetLayout) -> None:
    d = layout.directory
    d.mkdir(parents=True, exist_ok=True)
    (d / "auth.conf").write_text("")
    (d / ISO_A).write_bytes(os.urandom(3 << 20))
    (d / ISO_B).write_bytes(os.urandom(5 << 20) + b"tail")     # not a whole block: cut
    with open(d / "disk.img", "wb") as disk:
        disk.truncate(16 << 20)
    layout.config_path.write_text(f"""\
[Global]
  NodeBase "{NODE_BASE}"
  PidFile "{d / 'istgt.pid'}"
  AuthFile "{d / 'auth.conf'}"
  MediaDirectory "{d}"
[UnitControl]
  ControlSocket {d / 'ctl.sock'}
  AuthMethod None
  Portal UC1 127.0.0.1:{layout.control_port}
  Netmask 127.0.0.1
[PortalGroup1]
  Portal DA1 127.0.0.1:{layout.port}
  Portal DA2 [::1]:{layout.port}
  Portal DA3 127.0.0.1:{layout.chap_port}
[InitiatorGroup1]
  InitiatorName "ALL"
  Netmask 127.0.0.0/8
  Netmask [::1]
[LogicalUnit1]
  TargetName disk
  Mapping PortalGroup1 InitiatorGroup1
  AuthMethod None
  UnitType Disk
  LUN0 Storage "{d / 'disk.img'}" 16MB
[LogicalUnit2]
  TargetName dvd
  Mapping PortalGroup1 InitiatorGroup1
  AuthMethod None
  UnitType DVD
  LUN0 Removable ro "{d / ISO_A}" Auto
""")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    require_tool("qemu-img")
    port, chap_port, control_port = free_ports(3)
    layout = TargetLayout(tmp_path_factory.mktemp("dvd"), port, chap_port, control_port, ())
    write_config(layout)
    running = PythonTarget(layout)
    running.start()
    yield running
    assert running.stop() == 0, running.log_text()[-3000:]


def read_image(target, tmp_path) -> bytes:
    out = tmp_path / "out.raw"
    out.unlink(missing_ok=True)
    done = run_tool(["qemu-img", "convert", "-O", "raw",
                     f"iscsi://127.0.0.1:{target.layout.port}/{DVD}/0", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def control(target, args, tool=(sys.executable, "-m", "istgt.control.client")):
    conf = target.layout.directory / "ctl.conf"
    conf.write_text(f"[Global]\n  Host 127.0.0.1\n  Port {target.layout.control_port}\n")
    return subprocess.run([*tool, "-c", str(conf), "-t", DVD, *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


def test_an_iso_reads_back_byte_identical(target, tmp_path):
    image = (target.layout.directory / ISO_A).read_bytes()
    assert read_image(target, tmp_path) == image


def test_a_changed_disc_is_announced_and_served_while_a_disk_keeps_writing(target, tmp_path):
    d = target.layout.directory
    drive = Initiator("127.0.0.1", target.layout.port, initiator_name="iqn.2024-01.org.example:cd")
    drive.login(DVD)
    for _ in range(3):                                 # the new nexus' power-on attention
        if drive.tur().status == 0:
            break
    writer = Initiator("127.0.0.1", target.layout.port, initiator_name="iqn.2024-01.org.example:w")
    writer.login(DISK)
    writer.tur()
    errors, stop, writes = [], threading.Event(), [0]

    def keep_writing():
        lba = 0
        while not stop.is_set():
            result = writer.write10(lba % 4096, os.urandom(4096))
            if result.status != 0:
                errors.append(result)
                return
            lba, writes[0] = lba + 8, writes[0] + 1

    thread = threading.Thread(target=keep_writing)
    thread.start()
    try:
        done = control(target, ["change", ISO_B])
        assert (done.returncode, done.stdout) == (0, "DONE CHANGE command\n"), done.stderr
        result = drive.tur()
        assert result.status == 2 and result.sense[12:14] == bytes([0x28, 0x00])
        assert drive.tur().status == 0
        whole_blocks = len((d / ISO_B).read_bytes()) // 2048 * 2048
        assert read_image(target, tmp_path) == (d / ISO_B).read_bytes()[:whole_blocks]
        # the C istgt's own tool changes it back, over TCP
        done = control(target, ["change", ISO_A], tool=("/usr/sbin/istgtcontrol",))
        assert done.returncode == 0 and "DONE CHANGE command" in done.stdout
        assert read_image(target, tmp_path) == (d / ISO_A).read_bytes()
    finally:
        stop.set()
        thread.join(10)
        drive.close()
        writer.close()
    assert not errors and writes[0] > 10


def test_a_disc_outside_the_media_directory_is_refused(target):
    done = control(target, ["change", "/etc/passwd"])
    assert done.returncode == 1 and done.stdout == "ABORT CHANGE command\n"
    assert "not within MediaDirectory" in done.stderr
    listed = control(target, ["list"]).stdout.splitlines()[0]
    assert listed.startswith("lun0 removable present unlock - ro ")
