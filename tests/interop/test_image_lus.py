"""Disk image LUs (issue 8): for each of the seven formats istgt picks by extension, the target
creates the image, 64 MiB written through QEMU's iSCSI driver read back byte for byte, again
after a target restart, and the image is one `qemu-img info` recognises with the asked size."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.interop.conftest import (
    MIB, InteropTarget, LuSpec, require_tool, run_tool, start_target, stop_target,
)
from tests.interop.test_qemu_roundtrip import sha256_of, write_seeded_image

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

SIZE = 64 * MIB
FORMATS = {"vdi": "vdi", "vhd": "vpc", "vmdk": "vmdk", "qcow": "qcow", "qcow2": "qcow2",
           "qed": "qed", "vhdx": "vhdx"}
UNITS = tuple(LuSpec(f"img-{ext}", SIZE, extra=("AuthMethod None",), image=f"disk.{ext}")
              for ext in FORMATS)


@pytest.fixture(scope="module")
def image_target(tmp_path_factory):
    require_tool("qemu-storage-daemon")
    require_tool("qemu-img")
    directory = tmp_path_factory.mktemp("image-target")
    target = start_target(directory, UNITS)
    holder = {"target": target}
    try:
        yield holder, directory
    finally:
        stop_target(holder["target"])


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("image-payload") / "payload.raw"
    return path, write_seeded_image(path, SIZE, seed=8)


def convert(args: list[str]) -> None:
    result = run_tool(["qemu-img", "convert", *args], timeout=180)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"


def url(target, ext: str) -> str:
    return InteropTarget(target, {u.name: u for u in UNITS}).lun_url(f"img-{ext}")


@pytest.mark.parametrize("ext", FORMATS)
def test_an_image_lu_round_trips_64_mib(image_target, payload, tmp_path, ext):
    holder, directory = image_target
    source, digest = payload
    assert (directory / f"disk.{ext}").exists(), "the target creates a missing image"
    convert(["-n", "-f", "raw", "-O", "raw", str(source), url(holder["target"], ext)])
    back = tmp_path / "back.raw"
    convert(["-f", "raw", "-O", "raw", url(holder["target"], ext), str(back)])
    assert os.path.getsize(back) == SIZE and sha256_of(back) == digest


def test_images_are_what_qemu_img_sees_and_survive_a_restart(image_target, payload, tmp_path):
    holder, directory = image_target
    source, digest = payload
    stop_target(holder["target"])               # the daemon lets go of the images' locks
    for ext, driver in FORMATS.items():
        info = run_tool(["qemu-img", "info", "--output=json", str(directory / f"disk.{ext}")])
        assert info.returncode == 0, info.stderr
        facts = json.loads(info.stdout)
        assert facts["format"] == driver and facts["virtual-size"] == SIZE, facts
    holder["target"] = start_target(directory, UNITS)
    for ext in FORMATS:
        back = tmp_path / f"{ext}.raw"
        convert(["-f", "raw", "-O", "raw", url(holder["target"], ext), str(back)])
        assert sha256_of(back) == digest, f"{ext}: different data after a restart"


def running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may leave the dead unreaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_target_takes_its_storage_daemon_along(tmp_path):
    """SIGKILL of the target must not leave qemu-storage-daemon holding the images' locks:
    the next start would be refused."""
    unit = LuSpec("img-kill", SIZE, extra=("AuthMethod None",), image="disk.qcow2")
    target = start_target(tmp_path, (unit,))
    try:
        daemons = [pid for pid in children_of(target.process.pid)
                   if b"qemu-storage-daemon" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(daemons) == 1, daemons
    finally:
        target.kill()
    deadline = time.monotonic() + 10
    while running(daemons[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(daemons[0]), "the daemon outlived its target"
    target = start_target(tmp_path, (unit,))    # the image is not locked any more
    stop_target(target)


def children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += [int(child) for child in children.read().split()]
        except FileNotFoundError:
            pass                                # a thread that just ended
    return found
