"""Runs in the test guest (tools/guest.py): export every SCSI generic device of the guest as a
Pass LU (QEMU's scsi-hd as target `pass-disk`, scsi-cd as `pass-cd`, the kernel's scsi_debug
disk as `pass-debug`), serve them on port 3260 until /job/stop appears, then stop the target
with SIGTERM. scsi_debug reports a MEDIUM ERROR for reads of LBA 4660-4669 (opts=2); when
/job/remove appears, the scsi_debug disk is deleted from the guest, as a pulled disk."""
import os
import signal
import subprocess
import sys
import time

NAMES = {0: "pass-disk", 5: "pass-cd", 1: "pass-tape", 8: "pass-changer"}


def sysfs(sg: str, name: str) -> str:
    with open(f"/sys/class/scsi_generic/{sg}/device/{name}") as f:
        return f.read().strip()


def devices():
    found = {}
    for sg in sorted(os.listdir("/sys/class/scsi_generic")):
        kind = int(sysfs(sg, "type"))
        name = "pass-debug" if sysfs(sg, "model") == "scsi_debug" else NAMES.get(kind, sg)
        if name in found.values():
            name = f"{name}-{sg}"
        found[sg] = name
    return found


def main() -> int:
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=16", "opts=2"], check=True)
    time.sleep(1)
    units = devices()
    lines = ["[Global]", "  NodeBase iqn.2024-01.org.example.guest", "  PidFile /tmp/istgt.pid",
             "  AuthFile /tmp/auth.conf", "  Timeout 30", "  NopInInterval 20",
             "  DiscoveryAuthMethod None", "  MaxSessions 16", "  MaxConnections 4",
             "[UnitControl]", "  ControlSocket /tmp/ctl.sock",
             "[PortalGroup1]", "  Portal DA1 0.0.0.0:3260",
             "[InitiatorGroup1]", '  InitiatorName "ALL"', "  Netmask 0.0.0.0/0"]
    for number, (sg, name) in enumerate(sorted(units.items()), start=1):
        lines += [f"[LogicalUnit{number}]", f"  TargetName {name}",
                  "  Mapping PortalGroup1 InitiatorGroup1", "  AuthMethod None",
                  "  UnitType Pass", "  QueueDepth 32", f"  LUN0 Device /dev/{sg}"]
    with open("/tmp/istgt.conf", "w") as conf:
        conf.write("\n".join(lines) + "\n")
    open("/tmp/auth.conf", "w").close()
    print("GUEST units", units, flush=True)
    target = subprocess.Popen([sys.executable, "-m", "istgt.main", "-D", "-c", "/tmp/istgt.conf"],
                              cwd="/repo", env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    time.sleep(3)
    if target.poll() is not None:
        print("TARGET FAILED", target.returncode, flush=True)
        return 1
    print("TARGET READY", flush=True)
    removed = False
    while not os.path.exists("/job/stop") and target.poll() is None:
        if os.path.exists("/job/remove") and not removed:
            debug = next(sg for sg, name in units.items() if name == "pass-debug")
            with open(f"/sys/class/scsi_generic/{debug}/device/delete", "w") as f:
                f.write("1")
            removed = True
            print("DEBUG REMOVED", flush=True)
        time.sleep(0.2)
    target.send_signal(signal.SIGTERM)
    return target.wait(30)


if __name__ == "__main__":
    sys.exit(main())
