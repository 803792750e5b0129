"""EXTENDED COPY through the wire: a copy between the two LUNs of one target, its status,
and a refused copy naming another target's LU."""

import os
import struct

from tests.functional.conftest import CHECK_CONDITION, DENIED_NAME, GOOD, asc_ascq, sense_key

BLOCK = 512


def naa_designator(initiator, lun=0):
    """The NAA designator (LU association) of the LU's Device Identification VPD page."""
    page = initiator.inquiry(lun, evpd=True, page=0x83).data
    offset = 4
    while offset < len(page):
        code_set, kind, length = page[offset] & 0x0F, page[offset + 1], page[offset + 3]
        if kind & 0x0F == 0x03 and (kind >> 4) & 0x03 == 0:
            assert code_set == 0x01
            return bytes(page[offset: offset + 4 + length])
        offset += 4 + length
    raise AssertionError("no NAA designator")


def cscd(designation):
    descriptor = bytearray(32)
    descriptor[0] = 0xE4
    descriptor[4:4 + len(designation)] = designation
    descriptor[29:32] = BLOCK.to_bytes(3, "big")
    return bytes(descriptor)


def extended_copy(initiator, cscds, segments, list_id=1, lun=0):
    targets, segs = b"".join(cscds), b"".join(segments)
    data = struct.pack(">BBH4xII", list_id, 0, len(targets), len(segs), 0) + targets + segs
    cdb = bytes([0x83, 0]) + bytes(8) + len(data).to_bytes(4, "big") + bytes(2)
    return initiator.scsi(cdb, lun, data_out=data)


def block_to_block(blocks, source_lba, destination_lba, source, destination):
    return struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, source, destination, blocks,
                       source_lba, destination_lba)


def test_extended_copy_between_two_luns_of_one_target(make_target):
    initiator = make_target(luns=2).session()
    supported = initiator.inquiry(0, evpd=True, page=0x00).data
    assert 0x8F in supported[4:]
    lun0, lun1 = naa_designator(initiator, 0), naa_designator(initiator, 1)
    assert lun0 != lun1
    data = os.urandom(6000 * BLOCK)                       # several copy chunks
    assert initiator.write16(7, data, BLOCK, lun=1).status == GOOD
    result = extended_copy(initiator, [cscd(lun1), cscd(lun0)],
                           [block_to_block(6000, 7, 1000, source=0, destination=1)], list_id=4)
    assert result.status == GOOD, result.sense.hex()
    read = initiator.read16(1000, 6000, BLOCK, lun=0)
    assert read.status == GOOD and read.data == data
    cdb = bytes([0x84, 0x00, 4]) + bytes(7) + (64).to_bytes(4, "big") + bytes(2)
    status = initiator.scsi(cdb, 0, read_length=64)
    assert status.status == GOOD
    assert status.data == struct.pack(">IBHBI", 8, 0x01, 1, 0, len(data))


def test_extended_copy_cannot_reach_another_targets_lu(make_target):
    target = make_target(luns=2)
    elsewhere = naa_designator(target.session(target=DENIED_NAME))
    initiator = target.session()
    before = initiator.read16(0, 8, BLOCK, lun=0).data
    result = extended_copy(initiator, [cscd(naa_designator(initiator)), cscd(elsewhere)],
                           [block_to_block(8, 0, 0, source=1, destination=0)])
    assert result.status == CHECK_CONDITION
    assert sense_key(result.sense) == 0x0A and asc_ascq(result.sense) == (0x08, 0x04)
    assert initiator.read16(0, 8, BLOCK, lun=0).data == before
