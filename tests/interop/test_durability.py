"""Durability on the wire: with the write cache on, a FUA write reaches stable storage before
its GOOD leaves the target. `strace -f` of the real daemon shows the order of the system calls:
the data's pwrite, then fdatasync, then the sendmsg that carries the status."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.interop.conftest import REPO_ROOT, free_port
from tests.interop.libiscsi_client import Session

TARGET = "iqn.2007-09.jp.ne.peach.istgt:durable"
FUA_LBA, PLAIN_LBA = 4096, 8192


def start_traced(tmp_path, port):
    disk = tmp_path / "durable.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    (tmp_path / "auth.conf").write_text("")
    config = tmp_path / "istgt.conf"
    config.write_text(f"""[Global]
  NodeBase "iqn.2007-09.jp.ne.peach.istgt"
  PidFile {tmp_path}/istgt.pid
  AuthFile {tmp_path}/auth.conf
[UnitControl]
  ControlSocket {tmp_path}/istgt.sock
[PortalGroup1]
  Portal DA1 127.0.0.1:{port}
[InitiatorGroup1]
  InitiatorName "ALL"
  Netmask 127.0.0.1
[LogicalUnit1]
  TargetName durable
  Mapping PortalGroup1 InitiatorGroup1
  AuthMethod None
  UnitType Disk
  QueueDepth 8
  LUN0 Storage {disk} 16MB
  LUN0 Option WriteCache Enable
""")
    trace = tmp_path / "strace.log"
    process = subprocess.Popen(
        ["strace", "-f", "-o", str(trace), "-e", "trace=pwrite64,fdatasync,fsync,sendmsg",
         sys.executable, "-m", "istgt.main", "-D", "-c", str(config)],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return process, trace
        except OSError:
            time.sleep(0.1)
    process.kill()
    pytest.fail("the traced target did not start")


def calls_after_pwrite_at(lines, offset):
    """The names of the system calls after the pwrite64 at `offset`, in order."""
    start = next(i for i, line in enumerate(lines)
                 if "pwrite64(" in line and re.search(rf", {offset}\) += ", line))
    return [m.group(1) for line in lines[start + 1:]
            if (m := re.search(r"\b(pwrite64|fdatasync|fsync|sendmsg)\(", line))]


def test_fua_write_is_flushed_before_its_status_is_sent(tmp_path):
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: `make test` installs it")
    port = free_port()
    process, trace = start_traced(tmp_path, port)
    try:
        with Session(f"127.0.0.1:{port}", TARGET) as session:
            session.write16(FUA_LBA, b"\xf0" * 512, fua=True)
            session.write16(PLAIN_LBA, b"\x0f" * 512)
    finally:
        # stop the daemon itself (strace exits with its tracee)
        pid = int((tmp_path / "istgt.pid").read_text())
        os.kill(pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            os.kill(pid, 9)
            raise
    lines = trace.read_text().splitlines()
    after_fua = calls_after_pwrite_at(lines, FUA_LBA * 512)
    assert after_fua.index("fdatasync") < after_fua.index("sendmsg"), after_fua[:6]
    # With the write cache on, a plain write is answered without waiting for a flush.
    after_plain = calls_after_pwrite_at(lines, PLAIN_LBA * 512)
    assert after_plain[0] == "sendmsg", after_plain[:6]
