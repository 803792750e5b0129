#!/usr/bin/env python3
"""A throw-away one-node Ceph cluster on loopback: one monitor and one memstore OSD, no
systemd, no authentication, everything (config, data, logs, pids) inside one directory.

    tools/ceph_one_node.py start DIR [--pool rbd] [--memory-mib 1024]
    tools/ceph_one_node.py stop DIR

`start` prints the ceph.conf path once the pool is ready (about 8 s); `stop` kills the
daemons by the pids it recorded and removes nothing else. The tests use `Cluster` directly.
Needs Debian's ceph-mon, ceph-osd and ceph-common.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

COMMAND_TIMEOUT_S = 60
READY_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        self.conf = self.directory / "ceph.conf"

    @property
    def _pids(self) -> Path:
        return self.directory / "pids"

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run a ceph CLI command against this cluster; its stdout (RuntimeError if it fails)."""
        return self._run(["ceph", "-c", str(self.conf), "--connect-timeout", "10", *args],
                         timeout)

    def rbd(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        return self._run(["rbd", "-c", str(self.conf), *args], timeout)

    @staticmethod
    def _run(command: list[str], timeout: float) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
        return result.stdout

    def start(self, pool: str = "rbd", memory_mib: int = 1024) -> None:
        for tool in ("ceph-mon", "ceph-osd", "ceph", "monmaptool", "rbd"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (apt-get install ceph-mon "
                                   "ceph-osd ceph-common)")
        d = self.directory
        for sub in ("mon.a", "osd.0", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        v2, v1 = _free_port(), _free_port()
        self.conf.write_text(f"""\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
mon warn on insecure global id reclaim allowed = false
mon warn on pool no redundancy = false
mon allow pool size one = true
mon allow pool delete = true
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
# a killed gateway's watch lapses in 10 s rather than 30 (failover tests)
osd client watch timeout = 10
osd objectstore = memstore
memstore device bytes = {memory_mib << 20}
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
mon data = {d}/mon.$id
osd data = {d}/osd.$id
keyring = {d}/keyring
""")
        (d / "keyring").write_text("")
        self._run(["monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]", str(d / "monmap")], 30)
        self._run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap",
                   str(d / "monmap")], 60)
        self._spawn(["ceph-mon", "-c", str(self.conf), "-f", "-i", "a"], "mon.a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        self._run(["ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid",
                   osd_uuid], 60)
        self._spawn(["ceph-osd", "-c", str(self.conf), "-f", "-i", osd_id], f"osd.{osd_id}")
        self._wait_for_osd()
        self.ceph("osd", "pool", "create", pool, "8", "8")
        self.rbd("pool", "init", pool)

    def _spawn(self, command: list[str], name: str) -> None:
        with open(self.directory / "log" / f"{name}.stdout", "ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        with open(self._pids, "a") as pids:
            pids.write(f"{process.pid} {name}\n")

    def _wait_for_osd(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if '"num_up_osds":1' in self.ceph("osd", "stat", "-f", "json").replace(" ", ""):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the OSD did not come up within {READY_TIMEOUT_S} s; logs in "
                           f"{self.directory / 'log'}")

    def stop(self) -> None:
        """Kill every daemon this cluster started (by the pids recorded at start)."""
        try:
            lines = self._pids.read_text().splitlines()
        except FileNotFoundError:
            return
        pids = [int(line.split()[0]) for line in lines if line.strip()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for pid in pids if _alive(pid)]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._pids.unlink()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("directory")
    parser.add_argument("--pool", default="rbd")
    parser.add_argument("--memory-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    cluster = Cluster(args.directory)
    if args.action == "stop":
        cluster.stop()
        return 0
    started = time.monotonic()
    try:
        cluster.start(args.pool, args.memory_mib)
    except BaseException:
        cluster.stop()
        raise
    print(f"{cluster.conf}  # ready in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
