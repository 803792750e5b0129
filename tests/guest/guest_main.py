"""Runs inside the test guest as PID 1's child: list the SCSI devices, then exit."""
import os
import subprocess

print("GUEST sg devices:", sorted(os.listdir("/sys/class/scsi_generic")), flush=True)
for name in sorted(os.listdir("/sys/class/scsi_generic")):
    base = f"/sys/class/scsi_generic/{name}/device"
    with open(f"{base}/type") as f:
        kind = f.read().strip()
    with open(f"{base}/model") as f:
        model = f.read().strip()
    print(f"GUEST {name} type {kind} model {model}", flush=True)
