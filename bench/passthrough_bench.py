#!/usr/bin/env python3
"""Pass-through side by side (issue 9): one QEMU scsi-hd in the test guest (tools/guest.py,
TCG), exported three ways by the Python target running in the guest, measured with qemu-img
bench from the host in one run:

    pass-qd0    UnitType Pass, no QueueDepth (as istgt: one command at a time)
    pass-qd32   UnitType Pass, QueueDepth 32 (SG_IO on up to 16 workers at once)
    disk        UnitType Disk on the same device's block node (/dev/sdX)
    pass-qd32-again  the A/A control

    bench/passthrough_bench.py [--reps 3] [--scale 0.05]

The guest's CPU is emulated, so the numbers say how the three compare, not what a real
machine does. The C istgt has no Linux pass-through to compare with (CAM only).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from guest import Guest, build  # noqa: E402
from run_bench import bench, free_port  # noqa: E402

NODE_BASE = "iqn.2024-01.org.example.guest"
SERVE = r"""
SG=$(basename $(ls -d /sys/class/scsi_generic/*/device/block/sd* | head -1 | cut -d/ -f5))
SD=$(ls /sys/class/scsi_generic/$SG/device/block)
cat > /tmp/istgt.conf <<CONF
[Global]
  NodeBase NODE_BASE
  PidFile /tmp/istgt.pid
  AuthFile /tmp/auth.conf
  MaxSessions 16
[UnitControl]
[PortalGroup1]
  Portal DA1 0.0.0.0:3260
[InitiatorGroup1]
  InitiatorName "ALL"
  Netmask 0.0.0.0/0
[LogicalUnit1]
  TargetName pass-qd0
  Mapping PortalGroup1 InitiatorGroup1
  UnitType Pass
  LUN0 Device /dev/$SG
[LogicalUnit2]
  TargetName pass-qd32
  Mapping PortalGroup1 InitiatorGroup1
  UnitType Pass
  QueueDepth 32
  LUN0 Device /dev/$SG
[LogicalUnit3]
  TargetName disk
  Mapping PortalGroup1 InitiatorGroup1
  UnitType Disk
  QueueDepth 32
  LUN0 Storage /dev/$SD Auto
CONF
touch /tmp/auth.conf
echo "BENCH DEVICE $SG $SD"
python3 -m istgt.main -D -c /tmp/istgt.conf &
sleep 3
echo "TARGET READY"
while [ ! -e /job/stop ]; do sleep 0.5; done
kill %1
wait
""".replace("NODE_BASE", NODE_BASE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--workloads", default="4k-read-qd1,4k-read-qd32,4k-write-qd32,"
                                                "64k-read-qd16")
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args(argv)
    cache = build()
    work = Path(tempfile.mkdtemp(prefix="istgt-passbench-"))
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(args.size_mib << 20)
    port = free_port()
    machine = Guest(cache, SERVE, [
        "-drive", f"file={disk},if=none,id=disk0,format=raw,cache=none,aio=threads",
        "-device", "scsi-hd,drive=disk0,bus=scsi.0",
    ], host_port=port)
    machine.start()
    try:
        if not machine.wait_for("TARGET READY", 300) or \
                not machine.wait_for("listening on", 120):
            print(machine.console_text()[-3000:], machine.output()[-3000:])
            return 1
        print([line for line in machine.output().splitlines() if "BENCH" in line])
        url = f"iscsi://127.0.0.1:{port}/{NODE_BASE}:{{}}/0".format
        lanes = [("pass-qd0", url("pass-qd0")), ("pass-qd32", url("pass-qd32")),
                 ("disk", url("disk")), ("pass-qd32-again", url("pass-qd32"))]
        medians = bench(lanes, args.workloads.split(","), args.reps, args.scale, 600.0)
        print("\n# relative to pass-qd32 (A/A: pass-qd32-again)")
        for workload, ops in medians.items():
            base = ops.get("pass-qd32")
            if base:
                print(f"{workload:14} " + "  ".join(
                    f"{name} {ops[name] / base:5.2f}" for name in ops if name != "pass-qd32"))
    finally:
        (machine.job / "stop").touch()
        machine.stop(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
