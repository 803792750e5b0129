"""Ceph RBD LUs through librbd (issue 8), on the run's one-node cluster (tests/conftest.py):
the disk LU's SCSI features on an RBD image, COMPARE AND WRITE done by the cluster, and two
targets (gateways) on one image seeing each other's writes."""

import os
import struct

import pytest

from tests.functional.conftest import C_TARGET, CHECK_CONDITION, GOOD, asc_ascq, sense_key
from tests.functional.test_image_lu import get_lba_status
from tests.functional.test_provisioning import synchronize_cache, unmap

pytestmark = pytest.mark.skipif(C_TARGET, reason="the C istgt has no RBD support")

MiB = 1 << 20
MISCOMPARE = 0x0E


def rbd_target(make_target, cluster, image, size="16MB"):
    return make_target(lun0_storage=f"rbd:rbd/{image}:conf={cluster.conf} {size}")


def compare_and_write(initiator, lba, expected, new):
    cdb = struct.pack(">BBQ3xBBB", 0x89, 0, lba, len(new) // 512, 0, 0)
    return initiator.scsi(cdb, data_out=expected + new)


def test_an_rbd_lu_reads_writes_unmaps_and_reports_allocation(make_target, ceph_cluster):
    target = rbd_target(make_target, ceph_cluster, "features")
    device = target.server.units[1].devices[0]
    assert type(device.backend).__name__ == "RbdBackend"
    initiator = target.session()
    data = os.urandom(4 * MiB)
    assert initiator.write10(8192, data).status == GOOD       # one whole 4 MiB object
    assert synchronize_cache(initiator).status == GOOD
    assert initiator.read10(8192, 8192).data == data
    assert get_lba_status(initiator, 8192) == (0, 8192)
    assert get_lba_status(initiator, 0)[0] == 1               # never written
    assert unmap(initiator, (8192, 8192)).status == GOOD
    assert initiator.read10(8192, 8192).data == bytes(4 * MiB)
    assert unmap(initiator, (8193, 7)).status == GOOD         # part of an object reads zeros
    assert initiator.read10(8193, 7).data == bytes(7 * 512)


def test_compare_and_write_is_done_by_the_cluster(make_target, ceph_cluster):
    target = rbd_target(make_target, ceph_cluster, "caw")
    initiator = target.session()
    old, new = b"\x11" * 512, b"\x22" * 512
    assert initiator.write10(100, old).status == GOOD
    assert compare_and_write(initiator, 100, old, new).status == GOOD
    assert initiator.read10(100, 1).data == new
    wrong = new[:37] + b"\x00" + new[38:]
    result = compare_and_write(initiator, 100, wrong, old)
    assert result.status == CHECK_CONDITION and sense_key(result.sense) == MISCOMPARE
    assert asc_ascq(result.sense) == (0x1D, 0x00)
    assert struct.unpack(">I", result.sense[3:7])[0] == 37      # INFORMATION: the offset
    assert initiator.read10(100, 1).data == new                 # nothing written


def test_two_gateways_on_one_image_see_each_others_writes(make_target, ceph_cluster):
    first = rbd_target(make_target, ceph_cluster, "shared")
    second = make_target(lun0_storage=f"rbd:rbd/shared:conf={ceph_cluster.conf} Auto")
    one, two = first.session(), second.session()
    payload = os.urandom(64 * 1024)
    assert one.write10(0, payload).status == GOOD
    assert two.read10(0, 128).data == payload
    swapped = os.urandom(512)
    assert compare_and_write(two, 0, payload[:512], swapped).status == GOOD
    assert compare_and_write(one, 0, payload[:512], os.urandom(512)).status == CHECK_CONDITION
    assert one.read10(0, 1).data == swapped


PR_OUT, PR_IN = 0x5F, 0x5E
REGISTER, RESERVE, PREEMPT = 0x00, 0x01, 0x04
WRITE_EXCLUSIVE = 0x1
RESERVATION_CONFLICT = 0x18


def pr_out(initiator, action, key=0, service_key=0, pr_type=0, aptpl=False):
    data = struct.pack(">QQ4xBxH", key, service_key, 0x01 if aptpl else 0, 0)
    cdb = struct.pack(">BBBxxIBB", PR_OUT, action, pr_type, len(data), 0, 0)[:10]
    return initiator.scsi(cdb, data_out=data)


def read_keys(initiator):
    result = initiator.scsi(struct.pack(">BBxxxxxHB", PR_IN, 0, 4096, 0), read_length=4096)
    assert result.status == GOOD
    count = struct.unpack_from(">I", result.data, 4)[0] // 8
    return sorted(struct.unpack_from(f">{count}Q", result.data, 8))


def test_gateways_share_persistent_reservations(make_target, ceph_cluster):
    """A registration made through one gateway is reported through the other, a reservation
    taken through one is enforced by the other at once, and a preemption through one gives
    the other gateway's initiator its unit attention."""
    first = rbd_target(make_target, ceph_cluster, "prshared")
    second = make_target(lun0_storage=f"rbd:rbd/prshared:conf={ceph_cluster.conf} Auto")
    a = first.session(initiator_name="iqn.2024-01.org.example:host-a")
    b = second.session(initiator_name="iqn.2024-01.org.example:host-b")
    assert pr_out(a, REGISTER, service_key=0xA).status == GOOD
    assert read_keys(b) == [0xA]
    assert pr_out(b, REGISTER, service_key=0xB).status == GOOD
    assert read_keys(a) == [0xA, 0xB]
    assert pr_out(a, RESERVE, key=0xA, pr_type=WRITE_EXCLUSIVE).status == GOOD
    c = second.session(initiator_name="iqn.2024-01.org.example:host-c")   # not registered
    assert c.write10(0, bytes(512)).status == RESERVATION_CONFLICT
    assert b.write10(0, bytes(512)).status == RESERVATION_CONFLICT         # registered only
    assert a.write10(0, bytes(512)).status == GOOD
    # host-b preempts host-a through the other gateway: host-a hears of it
    assert pr_out(b, PREEMPT, key=0xB, service_key=0xA, pr_type=WRITE_EXCLUSIVE).status == GOOD
    result = a.tur()
    assert result.status == CHECK_CONDITION and sense_key(result.sense) == 0x06
    assert asc_ascq(result.sense) == (0x2A, 0x05)                          # REGISTRATIONS PREEMPTED
    assert read_keys(a) == [0xB]
    assert a.write10(0, bytes(512)).status == RESERVATION_CONFLICT


def test_reservations_survive_restarting_every_gateway_only_with_aptpl(make_target,
                                                                       ceph_cluster):
    for image, aptpl, kept in (("aptpl-on", True, [0x5]), ("aptpl-off", False, [])):
        location = f"rbd:rbd/{image}:conf={ceph_cluster.conf}"
        gateways = [make_target(lun0_storage=f"{location} 16MB"),
                    make_target(lun0_storage=f"{location} Auto")]
        assert pr_out(gateways[0].session(), REGISTER, service_key=0x5,
                      aptpl=aptpl).status == GOOD
        assert read_keys(gateways[1].session()) == [0x5]
        gateways[0].stop()                  # one gateway restarts while the other serves:
        gateways[0] = make_target(lun0_storage=f"{location} Auto")    # the state stays
        assert read_keys(gateways[0].session()) == [0x5], image
        for gateway in gateways:            # then every gateway stops: a power-on
            gateway.stop()
        again = [make_target(lun0_storage=f"{location} Auto") for _ in range(2)]
        assert [read_keys(g.session()) for g in again] == [kept, kept], image


def test_compare_and_write_past_the_first_object_reports_the_offset_in_the_buffer(
        make_target, ceph_cluster):
    """librbd reports a miscompare from the start of the object; the sense INFORMATION
    must count from the start of the Data-Out buffer, whichever object the LBA is in. A
    range across an object boundary is refused (librbd cannot do it atomically)."""
    target = rbd_target(make_target, ceph_cluster, "caw2", size="32MB")
    initiator = target.session()
    for lba in (8192 + 100, 18432 + 8):              # in objects 1 and 2 (4 MiB objects)
        old = os.urandom(512)
        assert initiator.write10(lba, old).status == GOOD
        wrong = old[:37] + bytes([old[37] ^ 0xFF]) + old[38:]
        result = compare_and_write(initiator, lba, wrong, os.urandom(512))
        assert result.status == CHECK_CONDITION and sense_key(result.sense) == MISCOMPARE
        assert struct.unpack(">I", result.sense[3:7])[0] == 37, lba
    across = compare_and_write(initiator, 8191, bytes(1024), bytes(1024))
    assert across.status == CHECK_CONDITION and sense_key(across.sense) == 0x05
    assert asc_ascq(across.sense) == (0x24, 0x00)


def test_an_lu_that_fails_to_start_leaves_no_watch_on_the_cluster(make_target, ceph_cluster,
                                                                  tmp_path):
    from istgt.server import StartupError
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"{not json")
    ceph_cluster.rbd("create", "--size", "8M", "rbd/broken")
    ceph_cluster._run(["rados", "-c", str(ceph_cluster.conf), "-p", "rbd", "put",
                       "istgt.pr.broken", str(garbage)], 30)
    with pytest.raises(StartupError, match="reservations in the cluster"):
        make_target(lun0_storage=f"rbd:rbd/broken:conf={ceph_cluster.conf} Auto")
    watchers = ceph_cluster._run(["rados", "-c", str(ceph_cluster.conf), "-p", "rbd",
                                  "listwatchers", "istgt.pr.broken"], 30)
    assert watchers.strip() == "", watchers


def write_atomic(initiator, lba, data):
    cdb = struct.pack(">BBQHHBB", 0x9C, 0, lba, 0, len(data) // 512, 0, 0)
    return initiator.scsi(cdb, data_out=data)


def test_write_atomic_on_rbd_stays_inside_one_object(make_target, ceph_cluster):
    """RADOS applies a write to one object whole or not at all: WRITE ATOMIC is offered
    with an ATOMIC ALIGNMENT that keeps every atomic write inside one object."""
    target = rbd_target(make_target, ceph_cluster, "atomic")
    initiator = target.session()
    limits = initiator.scsi(bytes([0x12, 0x01, 0xB0, 0x00, 0x40, 0]), read_length=64).data
    most, alignment = struct.unpack_from(">II", limits, 44)   # page bytes 44-51
    assert most == alignment == 2048                  # 1 MiB of 512-byte blocks
    payload = os.urandom(8 * 512)
    assert write_atomic(initiator, 2048, payload).status == GOOD
    assert initiator.read10(2048, 8).data == payload
    for lba, blocks, field in ((2049, 8, 2), (0, 2049, 12)):
        result = write_atomic(initiator, lba, bytes(blocks * 512))
        assert result.status == CHECK_CONDITION and asc_ascq(result.sense) == (0x24, 0x00)
        assert struct.unpack(">H", result.sense[16:18])[0] == field
