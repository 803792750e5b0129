#!/usr/bin/env python3
"""A QEMU guest with real SCSI devices, for the pass-through tests (issue 9): this machine has
none, so the target runs inside a Debian guest against QEMU's emulated scsi-hd and scsi-cd
(and the guest kernel's scsi_debug), reached from the host through a forwarded port.

    tools/guest.py build [CACHE]       # Debian root file system image, kernel, initrd
    tools/guest.py run [CACHE] -- CMD  # boot, run CMD in the guest (repo at /repo), power off

`build` runs debootstrap once (about 70 s) and keeps the result in CACHE (default
~/.cache/istgt-guest); `Guest` (used by the tests) boots it with TCG (about 10 s; nested KVM
fails on these machines), the repository shared read-only over 9p at /repo and a job
directory read-write at /job. The guest's PID 1 (/sbin/istgt-guest-init, written here) mounts them and runs
/job/run.sh, whose output goes to /job/output and the serial console.
Needs Debian's debootstrap, qemu-system-x86 and e2fsprogs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "istgt-guest"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# tgt and open-iscsi: a virtual tape drive and changer attached to the guest over iSCSI,
# as real SCSI tape and changer devices for the pass-through target
PACKAGES = "linux-image-amd64,python3,kmod,iproute2,sg3-utils,procps,tgt,open-iscsi,mt-st"
LAYOUT_VERSION = "3"            # bump when the image's content changes
IMAGE_SIZE = "2G"

INIT = """#!/bin/sh
# PID 1 of the pass-through test guest: mount what the target needs, run /job/run.sh.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /run /tmp /repo /job
mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /tmp
for m in virtio_pci virtio_scsi virtio_net sd_mod sr_mod sg st 9p 9pnet_virtio; do
  modprobe -q $m
done
ip link set lo up
for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
mount -t 9p -o trans=virtio,version=9p2000.L,ro repo /repo
mount -t 9p -o trans=virtio,version=9p2000.L job /job
echo "GUEST READY $(uname -r)"
cd /repo
PYTHONDONTWRITEBYTECODE=1 sh /job/run.sh > /job/output 2>&1
echo "GUEST DONE $?" | tee -a /job/output
sync
echo o > /proc/sysrq-trigger
sleep 30
"""


def build(cache: Path = DEFAULT_CACHE) -> Path:
    """The cache directory holding rootfs.img, vmlinuz and initrd.img (built if missing)."""
    stamp = cache / f"built-{LAYOUT_VERSION}"
    if stamp.exists():
        return cache
    for tool in ("debootstrap", "qemu-system-x86_64", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (make test installs debootstrap, "
                               "qemu-system-x86 and e2fsprogs)")
    cache.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="root-", dir=cache))
    try:
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE,
                        str(root), MIRROR], check=True, capture_output=True, timeout=1800)
        init = root / "sbin" / "istgt-guest-init"
        init.write_text(INIT)
        init.chmod(0o755)
        _copy_python_dependencies(root)
        boot = root / "boot"
        shutil.copy(next(boot.glob("vmlinuz-*")), cache / "vmlinuz")
        shutil.copy(next(boot.glob("initrd.img-*")), cache / "initrd.img")
        image = cache / "rootfs.img"
        image.unlink(missing_ok=True)
        subprocess.run(["mkfs.ext4", "-q", "-d", str(root), "-L", "root", str(image),
                        IMAGE_SIZE], check=True, capture_output=True, timeout=600)
        stamp.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return cache


def _copy_python_dependencies(root: Path) -> None:
    """google-crc32c is not in Debian: the venv's wheel (CPython 3.11 ABI, as the guest's
    python3) goes into the guest's dist-packages."""
    import google_crc32c
    source = Path(google_crc32c.__file__).resolve().parent.parent
    target = root / "usr" / "lib" / "python3" / "dist-packages"
    for entry in source.iterdir():
        if entry.name.startswith("google_crc32c"):
            copy = shutil.copytree if entry.is_dir() else shutil.copy
            copy(entry, target / entry.name)


class Guest:
    """One boot of the guest with the given extra QEMU arguments (disks), running `script`."""

    def __init__(self, cache: Path, script: str, qemu_args: list[str], host_port: int | None,
                 memory_mib: int = 1024) -> None:
        self.job = Path(tempfile.mkdtemp(prefix="istgt-guest-job-"))
        (self.job / "run.sh").write_text(script)
        self.console = self.job / "console.log"
        forward = f",hostfwd=tcp:127.0.0.1:{host_port}-10.0.2.15:3260" if host_port else ""
        self.command = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2",
            "-m", str(memory_mib), "-nographic", "-no-reboot",
            "-kernel", str(cache / "vmlinuz"), "-initrd", str(cache / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 init=/sbin/istgt-guest-init quiet "
                       "net.ifnames=0",       # eth0, as the init script expects
            "-drive", f"file={cache / 'rootfs.img'},if=virtio,format=raw,snapshot=on",
            "-virtfs", f"local,path={REPO},mount_tag=repo,security_model=none,readonly=on",
            "-virtfs", f"local,path={self.job},mount_tag=job,security_model=none",
            "-netdev", f"user,id=net0{forward}", "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-scsi-pci,id=scsi",
            *qemu_args,
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.console, "wb") as console:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=console, stderr=subprocess.STDOUT)

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.console_text() or text in self.output():
                return True
            if self.process.poll() is not None:
                return text in self.console_text() or text in self.output()
            time.sleep(0.2)
        return False

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def output(self) -> str:
        path = self.job / "output"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 60) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.job, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("cache", nargs="?", default=str(DEFAULT_CACHE))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cache = build(Path(args.cache))
    if args.action == "build":
        print(cache)
        return 0
    command = " ".join(args.command[1:] if args.command[:1] == ["--"] else args.command)
    guest = Guest(cache, command + "\n", [], None)
    guest.start()
    guest.process.wait(600)
    print(guest.console_text())
    print(guest.output())
    guest.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
