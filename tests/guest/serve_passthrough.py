"""Runs in the test guest (tools/guest.py): export every SCSI generic device of the guest as a
Pass LU (QEMU's scsi-hd as target `pass-disk`, the ones with product SPLITDISK and
SLOWDISK as `pass-split` and `pass-slow`, scsi-cd as `pass-cd`, the kernel's scsi_debug disk as `pass-debug`, tgt's
virtual tape drive and changer attached over iSCSI (attach_vtl.sh) as `pass-tape` and
`pass-changer`, and both again as one library, `pass-library`, changer at LUN0 and drive
at LUN1), serve them on port 3260 until /job/stop appears, then stop the target
with SIGTERM. scsi_debug reports a MEDIUM ERROR for reads of LBA 4660-4669 (opts=2); when
/job/remove appears, the scsi_debug disk is deleted from the guest, as a pulled disk, and
when /job/readd appears its host is scanned again, so it comes back under the same node;
/job/grow-debug makes it 1 GiB (its unit attention CAPACITY DATA HAS CHANGED)."""
import os
import signal
import subprocess
import sys
import time

NAMES = {0: "pass-disk", 5: "pass-cd", 1: "pass-tape", 8: "pass-changer"}
MODELS = {"scsi_debug": "pass-debug", "SPLITDISK": "pass-split", "SLOWDISK": "pass-slow"}


def sysfs(sg: str, name: str) -> str:
    with open(f"/sys/class/scsi_generic/{sg}/device/{name}") as f:
        return f.read().strip()


def devices():
    found = {}
    for sg in sorted(os.listdir("/sys/class/scsi_generic")):
        kind = int(sysfs(sg, "type"))
        if kind not in NAMES:                 # tgt's LUN 0 (a storage array controller)
            continue
        name = MODELS.get(sysfs(sg, "model"), NAMES[kind])
        if name in found.values():
            name = f"{name}-{sg}"
        found[sg] = name
    return found


def main() -> int:
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=16", "opts=2"], check=True)
    subprocess.run(["sh", "/repo/tests/guest/attach_vtl.sh"], check=True, timeout=120)
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
    # a tape library as one target: the changer at LUN0, its drive at LUN1 (through the
    # st node's name, as an admin would write it)
    changer = next(sg for sg, name in units.items() if name == "pass-changer")
    lines += [f"[LogicalUnit{len(units) + 1}]", "  TargetName pass-library",
              "  Mapping PortalGroup1 InitiatorGroup1", "  AuthMethod None",
              "  UnitType Pass", "  QueueDepth 8", f"  LUN0 Device /dev/{changer}",
              "  LUN1 Device /dev/nst0"]
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
    removed = readded = False
    debug = next(sg for sg, name in units.items() if name == "pass-debug")
    host = os.path.realpath(f"/sys/class/scsi_generic/{debug}/device").split("/")[-3]
    while not os.path.exists("/job/stop") and target.poll() is None:
        if os.path.exists("/job/remove") and not removed:
            with open(f"/sys/class/scsi_generic/{debug}/device/delete", "w") as f:
                f.write("1")
            removed = True
            print("DEBUG REMOVED", flush=True)
        if os.path.exists("/job/grow-debug"):       # scsi_debug: CAPACITY DATA HAS CHANGED
            os.unlink("/job/grow-debug")
            with open("/sys/bus/pseudo/drivers/scsi_debug/virtual_gb", "w") as f:
                f.write("1")
            print("DEBUG GROWN", flush=True)
        if os.path.exists("/job/readd") and removed and not readded:
            with open(f"/sys/class/scsi_host/{host}/scan", "w") as f:
                f.write("- - -")
            readded = True
            print("DEBUG BACK", os.listdir("/sys/class/scsi_generic"), flush=True)
        time.sleep(0.2)
    target.send_signal(signal.SIGTERM)
    return target.wait(30)


if __name__ == "__main__":
    sys.exit(main())
