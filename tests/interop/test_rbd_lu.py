"""Ceph RBD LUs (issue 8) against a one-node cluster started for this module
(tests/conftest.py's ceph_cluster: tools/ceph_one_node.py, a monitor and a memstore OSD on
loopback, killed by pid afterwards):
the target creates the image, 64 MiB round-trips through QEMU's iSCSI driver, again after a
target restart, and the image is what `rbd info` reports."""
from __future__ import annotations

import json
import os

import pytest

from tests.interop.conftest import (
    MIB, InteropTarget, LuSpec, require_tool, run_tool, start_target, stop_target,
)
from tests.interop.test_qemu_roundtrip import sha256_of, write_seeded_image

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

SIZE = 64 * MIB


@pytest.fixture(scope="module")
def cluster(ceph_cluster):
    require_tool("qemu-img")
    return ceph_cluster


def rbd_unit(cluster, image: str) -> LuSpec:
    return LuSpec(f"rbd-{image}", SIZE, extra=("AuthMethod None",),
                  image=f"rbd:rbd/{image}:conf={cluster.conf}")


def test_an_rbd_lu_is_created_round_trips_and_survives_a_restart(cluster, tmp_path):
    unit = rbd_unit(cluster, "disk0")
    source = tmp_path / "payload.raw"
    digest = write_seeded_image(source, SIZE, seed=9)
    target = start_target(tmp_path / "target", (unit,))
    try:
        info = json.loads(cluster.rbd("info", "--format", "json", "rbd/disk0"))
        assert info["size"] == SIZE                      # created by the target at start
        url = InteropTarget(target, {unit.name: unit}).lun_url(unit.name)
        done = run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source),
                         url], timeout=180)
        assert done.returncode == 0, done.stderr
        stop_target(target)
        target = start_target(tmp_path / "target2", (unit,))
        url = InteropTarget(target, {unit.name: unit}).lun_url(unit.name)
        back = tmp_path / "back.raw"
        done = run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(back)],
                        timeout=180)
        assert done.returncode == 0, done.stderr
        assert os.path.getsize(back) == SIZE and sha256_of(back) == digest
    finally:
        stop_target(target)
    # and what the target wrote is in the cluster, read without the target
    direct = tmp_path / "direct.raw"
    done = run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                     f"rbd:rbd/disk0:conf={cluster.conf}", str(direct)], timeout=180)
    assert done.returncode == 0, done.stderr
    assert sha256_of(direct) == digest


def test_an_rbd_snapshot_is_served_read_only(cluster, tmp_path):
    cluster.rbd("create", "--size", "8M", "rbd/snapped")
    cluster.rbd("snap", "create", "rbd/snapped@s1")
    unit = LuSpec("rbd-snap", 8 * MIB, extra=("AuthMethod None",),
                  image=f"rbd:rbd/snapped@s1:conf={cluster.conf}")
    target = start_target(tmp_path / "target", (unit,))
    try:
        url = InteropTarget(target, {unit.name: unit}).lun_url(unit.name)
        write = run_tool(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 512", url])
        output = write.stdout + write.stderr
        assert "write protected" in output.lower() or "permission denied" in output.lower(), \
            output
        read = run_tool(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 512", url])
        assert read.returncode == 0 and "read 512/512" in read.stdout, read.stdout + read.stderr
    finally:
        stop_target(target)
