"""Pass-through LUs (issue 9) on real SCSI devices: this machine has none, so the target
runs in a QEMU guest (tools/guest.py) against QEMU's scsi-hd and scsi-cd, and the host
reaches it through a forwarded port with QEMU's iSCSI initiator."""
from __future__ import annotations

import os
import sys
import time

import pytest

from tests.interop.conftest import MIB, REPO_ROOT, free_port, require_tool, run_tool
from tests.interop.test_qemu_roundtrip import sha256_of, write_seeded_image

sys.path.insert(0, str(REPO_ROOT / "tools"))
from guest import Guest, build  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]

NODE_BASE = "iqn.2024-01.org.example.guest"
DISK_BYTES = 64 * MIB
ISO_BYTES = 3 * MIB
SPLIT_DISK_BYTES = 8 * MIB
SPLIT_LIMIT = 64 * 1024
BOOT_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "qemu-img"):
        require_tool(tool)
    cache = build()
    work = tmp_path_factory.mktemp("passthrough")
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    iso = work / "disc.iso"
    iso_digest = write_seeded_image(iso, ISO_BYTES, seed=93)
    split = work / "split.raw"
    with open(split, "wb") as f:
        f.truncate(SPLIT_DISK_BYTES)
    port = free_port()
    machine = Guest(cache, "python3 /repo/tests/guest/serve_passthrough.py\n", [
        "-drive", f"file={disk},if=none,id=disk0,format=raw,cache=writeback",
        # dpofua=on: QEMU's default says DPOFUA=0 in MODE SENSE yet honours FUA, which
        # libiscsi's DpoFua tests count against the device
        "-device", "scsi-hd,drive=disk0,bus=scsi.0,dpofua=on",
        "-drive", f"file={iso},if=none,id=cd0,format=raw,media=cdrom,readonly=on",
        "-device", "scsi-cd,drive=cd0,bus=scsi.0",
        # a host adapter that takes at most 64 KiB per command: longer READ/WRITEs are split
        "-device", f"virtio-scsi-pci,id=narrow,max_sectors={SPLIT_LIMIT // 512}",
        "-drive", f"file={split},if=none,id=split0,format=raw,cache=writethrough",
        "-device", "scsi-hd,drive=split0,bus=narrow.0,product=SPLITDISK",
        # reads throttled to 4 KiB/s after a 256 KiB burst (the kernel's reads at attach):
        # a device that holds a 512 KiB READ for more than a minute
        "-drive", f"file={iso},if=none,id=slow0,format=raw,readonly=on,"
                  "throttling.bps-read=4096,throttling.bps-read-max=262144",
        "-device", "scsi-hd,drive=slow0,bus=scsi.0,product=SLOWDISK",
    ], host_port=port)
    machine.start()
    try:
        if not machine.wait_for("TARGET READY", BOOT_TIMEOUT_S) or not answers(port):
            pytest.fail(f"the guest's target did not start; console:\n"
                        f"{machine.console_text()[-3000:]}\noutput:\n{machine.output()[-3000:]}")
        machine.split_disk = split
        yield machine, port, disk, iso, iso_digest
    finally:
        (machine.job / "stop").touch()
        output = machine.output()
        machine.stop(90)
        print(output[-2000:])


def answers(port: int, timeout: float = 60) -> bool:
    """Whether a discovery login through the forwarded port works (the guest is slow: the
    port forward exists before the target listens)."""
    from tests.functional.initiator import ConnectionClosed, Initiator
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            initiator = Initiator("127.0.0.1", port, timeout=10)
            try:
                initiator.login()
                return True
            finally:
                initiator.close()
        except (OSError, ConnectionClosed):      # QEMU's forward resets until it listens
            time.sleep(1)
    return False


def url(port: int, name: str) -> str:
    return f"iscsi://127.0.0.1:{port}/{NODE_BASE}:{name}/0"


def test_a_pass_through_disk_round_trips_64_mib(guest, tmp_path):
    machine, port, disk, _, _ = guest
    source = tmp_path / "payload.raw"
    digest = write_seeded_image(source, DISK_BYTES, seed=92)
    done = run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source),
                     url(port, "pass-disk")], timeout=600)
    assert done.returncode == 0, done.stderr
    back = tmp_path / "back.raw"
    done = run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", url(port, "pass-disk"),
                     str(back)], timeout=600)
    assert done.returncode == 0, done.stderr
    assert os.path.getsize(back) == DISK_BYTES and sha256_of(back) == digest


def test_an_iso_in_the_guests_cd_drive_reads_back_byte_identical(guest, tmp_path):
    machine, port, _, iso, iso_digest = guest
    back = tmp_path / "disc.raw"
    done = run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", url(port, "pass-cd"),
                     str(back)], timeout=600)
    assert done.returncode == 0, done.stderr
    assert os.path.getsize(back) == ISO_BYTES and sha256_of(back) == iso_digest


def session(port: int, name: str):
    from tests.functional.initiator import Initiator
    initiator = Initiator("127.0.0.1", port, initiator_name="iqn.2024-01.org.example:host",
                          timeout=30)
    initiator.login(f"{NODE_BASE}:{name}")
    for _ in range(4):                         # the nexus's power-on attention
        if initiator.tur().status == 0:
            break
    return initiator


def read10(initiator, lba: int, blocks: int = 1):
    import struct
    return initiator.scsi(struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0),
                          read_length=blocks * 512)


def test_device_errors_reach_the_initiator_and_a_removed_device_is_not_ready(guest):
    """scsi_debug's injected MEDIUM ERROR, and its NOT READY while stopped, come back as the
    device's sense; when the device is deleted in the guest, its LUN answers NOT READY while
    the other LUNs keep working."""
    machine, port, _, _, _ = guest
    debug = session(port, "pass-debug")
    assert read10(debug, 0).status == 0
    failed = read10(debug, 4660)
    assert failed.status == 2
    sense = failed.sense
    assert sense[2] & 0x0F == 0x03 and sense[12] == 0x11, sense.hex()   # MEDIUM ERROR, 11/xx
    stop_unit = debug.scsi(bytes([0x1B, 0, 0, 0, 0x00, 0]))      # START STOP UNIT: stop
    assert stop_unit.status == 0
    stopped = read10(debug, 0)
    assert stopped.status == 2 and stopped.sense[2] & 0x0F == 0x02, stopped.sense.hex()
    assert stopped.sense[12] == 0x04                               # the device's NOT READY
    assert debug.scsi(bytes([0x1B, 0, 0, 0, 0x01, 0])).status == 0  # started again
    assert read10(debug, 0).status == 0
    disk = session(port, "pass-disk")
    (machine.job / "remove").touch()
    assert machine.wait_for("DEBUG REMOVED", 60)
    time.sleep(1)
    gone = debug.tur()
    assert gone.status == 2 and gone.sense[2] & 0x0F == 0x02, gone.sense.hex()   # NOT READY
    assert disk.tur().status == 0 and read10(disk, 8).status == 0
    # the same device back under its node: served again, after a power-on attention
    (machine.job / "readd").touch()
    assert machine.wait_for("DEBUG BACK", 60)
    deadline = time.monotonic() + 30
    answer = debug.tur()
    while answer.status == 2 and answer.sense[2] & 0x0F == 0x02 and time.monotonic() < deadline:
        time.sleep(1)
        answer = debug.tur()
    assert answer.status == 2 and answer.sense[2] & 0x0F == 0x06, answer.sense.hex()
    assert answer.sense[12] == 0x29                                # POWER ON (the LUN's)
    assert debug.tur().status == 0
    assert read10(debug, 0).status == 0 and read10(debug, 4660).status == 2   # the same one


CONFORMANCE_FAMILIES = ("ALL.Read10.", "ALL.Read16.", "ALL.Write10.", "ALL.Write16.",
                        "ALL.Inquiry.", "ALL.TestUnitReady.", "ALL.ReadCapacity10.",
                        "ALL.ReadCapacity16.", "ALL.iSCSITMF.")


# What does not pass through the scsi-hd, and why: the device's own answers, passed through
# as they are, and a defect of libiscsi 1.19's test (it fails on the emulated disk LU too).
DEVICE_ANSWERS = {
    "ALL.Inquiry.BlockLimits": "QEMU's scsi-hd returns a 60-byte Block Limits page without "
                               "claiming SBC-3 in its standard INQUIRY data",
    "ALL.iSCSITMF.LUNResetSimpleAsync": "libiscsi 1.19 test defect "
                                        "(tests/interop/conformance-expected.tsv)",
}
CLIENT_CRASHES = ("ALL.iSCSITMF.LUNResetSimpleAsync",)
# QEMU's scsi-hd has no REPORT SUPPORTED OPERATION CODES, which these tests need first
DEVICE_SKIPS = ("ALL.Read10.DpoFua", "ALL.Read16.DpoFua", "ALL.Write10.DpoFua",
                "ALL.Write16.DpoFua")


def test_libiscsi_read_write_inquiry_and_tmf_tests_through_a_pass_through_disk(guest):
    """The read, write, inquiry, capacity and task management tests of iscsi-test-cu
    against the guest's scsi-hd passed through: every one passes but those the device
    itself answers otherwise (listed above, each checked to still be so)."""
    from tests.interop import conformance_runner as runner
    require_tool("iscsi-test-cu")
    machine, port, _, _, _ = guest
    tests = [t for t in runner.list_tests() if t.startswith(CONFORMANCE_FAMILIES)]
    assert len(tests) > 30
    outcomes = {t: runner.run_one(t, url(port, "pass-disk"), timeout_s=60) for t in tests}
    unexpected = []
    for test, outcome in outcomes.items():
        if test in DEVICE_SKIPS:
            expected = outcome.result is runner.Result.SKIP and \
                "REPORT_SUPPORTED_OPCODES" in outcome.reason
        elif test in DEVICE_ANSWERS:
            # the libiscsi test's defect can also take its own process down (SIGSEGV in
            # its callbacks, depending on when the reset's answer comes)
            expected = outcome.result is runner.Result.FAIL or \
                test in CLIENT_CRASHES and outcome.result is runner.Result.CRASH
        else:
            expected = outcome.result is runner.Result.PASS
        if not expected:
            unexpected.append(f"{test}: {outcome.result.name} {outcome.reason}")
    passed = sum(o.result is runner.Result.PASS for o in outcomes.values())
    assert not unexpected, f"{passed} of {len(tests)} passed; unexpected:\n" + \
        "\n".join(unexpected)


def test_reads_and_writes_longer_than_the_host_adapter_takes_are_split(guest):
    """The SPLITDISK sits on a virtio-scsi adapter that takes 64 KiB per command: Block
    Limits says so, and a 2 MiB WRITE(16)/READ(16) is done in 32 pieces at the right LBAs
    (checked in the disk's file on the host)."""
    import struct
    machine, port, _, _, _ = guest
    split = session(port, "pass-split")
    limits = split.inquiry(evpd=True, page=0xB0, length=64)
    assert limits.status == 0
    assert struct.unpack_from(">I", limits.data, 8)[0] == SPLIT_LIMIT // 512
    payload = os.urandom(2 * MIB)
    lba = 100
    wrote = split.scsi(struct.pack(">BBQIBB", 0x8A, 0, lba, len(payload) // 512, 0, 0),
                       data_out=payload)
    assert wrote.status == 0, wrote.sense.hex()
    assert split.scsi(bytes([0x35]) + bytes(9)).status == 0        # SYNCHRONIZE CACHE
    back = split.scsi(struct.pack(">BBQIBB", 0x88, 0, lba, len(payload) // 512, 0, 0),
                      read_length=len(payload))
    assert back.status == 0 and back.data == payload
    with open(machine.split_disk, "rb") as f:
        f.seek(lba * 512)
        assert f.read(len(payload)) == payload


def tape_cdb(opcode: int, length: int, fixed: int = 0) -> bytes:
    return bytes([opcode, fixed]) + length.to_bytes(3, "big") + b"\0"


def test_tape_records_of_any_size_the_drive_takes_pass_through(guest):
    """tgt's virtual tape drive, attached to the guest over iSCSI, as a real SCSI tape:
    variable-length records up to the drive's 1 MiB limit (istgt capped them at 64 KiB),
    a short record read with a longer request (ILI, residual), a filemark."""
    _, port, _, _, _ = guest
    tape = session(port, "pass-tape")
    limits = tape.scsi(bytes([0x05, 0, 0, 0, 0, 0]), read_length=6)  # READ BLOCK LIMITS
    assert limits.status == 0
    largest = int.from_bytes(limits.data[1:4], "big")
    assert largest >= MIB
    assert tape.scsi(bytes([0x01, 0, 0, 0, 0, 0])).status == 0         # REWIND
    # tgt takes records past the 1 MiB its READ BLOCK LIMITS states: 4 MiB goes through too
    records = [os.urandom(256 * 1024), os.urandom(largest), os.urandom(4 * MIB),
               os.urandom(1000)]
    for record in records:
        wrote = tape.scsi(tape_cdb(0x0A, len(record)), data_out=record)
        assert wrote.status == 0, wrote.sense.hex()
    assert tape.scsi(bytes([0x10, 0, 0, 0, 1, 0])).status == 0         # WRITE FILEMARKS
    assert tape.scsi(bytes([0x01, 0, 0, 0, 0, 0])).status == 0
    for record in records[:3]:
        read = tape.scsi(tape_cdb(0x08, len(record)), read_length=len(record))
        assert read.status == 0 and read.data == record
    short = tape.scsi(tape_cdb(0x08, 4096), read_length=4096)          # a 1000-byte record
    assert short.status == 2 and short.data[:1000] == records[3]
    assert short.sense[2] & 0x20                                       # ILI
    assert int.from_bytes(short.sense[3:7], "big") == 3096             # 4096 - 1000
    # the residual is the device's: tgt, through the guest's iSCSI initiator, reports 1000
    # here (sg_raw in the guest receives 3096 bytes too); it reaches the initiator as given
    assert short.underflow and short.residual == 4096 - len(short.data) == 1000
    mark = tape.scsi(tape_cdb(0x08, 4096), read_length=4096)
    assert mark.status == 2 and mark.sense[2] & 0x80                  # FILEMARK
    assert mark.sense[12:14] == b"\x00\x01"                            # FILEMARK DETECTED


def element_status(changer) -> dict[int, tuple[bool, str]]:
    """address -> (full, primary volume tag) of every storage element."""
    cdb = bytes([0xB8, 0x12, 0, 0, 0xFF, 0xFF, 0]) + (65535).to_bytes(3, "big") + bytes(2)
    answer = changer.scsi(cdb, read_length=65535)       # READ ELEMENT STATUS, storage, VolTag
    assert answer.status == 0, answer.sense.hex()
    data = answer.data
    end = 8 + int.from_bytes(data[5:8], "big")
    elements, offset = {}, 8
    while offset < end:
        voltag = data[offset + 1] & 0x80
        size = int.from_bytes(data[offset + 2:offset + 4], "big")
        pages_end = offset + 8 + int.from_bytes(data[offset + 5:offset + 8], "big")
        offset += 8
        while offset < pages_end:
            address = int.from_bytes(data[offset:offset + 2], "big")
            tag = data[offset + 12:offset + 44].decode().strip() if voltag else ""
            elements[address] = (bool(data[offset + 2] & 0x01), tag)
            offset += size
    return elements


def test_a_medium_changer_passes_through(guest):
    """tgt's virtual changer as a real SCSI changer: READ ELEMENT STATUS shows the
    cartridge in slot 33 by its barcode, MOVE MEDIUM takes it to slot 34."""
    _, port, _, _, _ = guest
    changer = session(port, "pass-changer")
    before = element_status(changer)
    assert before[33] == (True, "T0000002") and not before[34][0]
    move = bytes([0xA5, 0, 0, 16, 0, 33, 0, 34, 0, 0, 0, 0])            # MOVE MEDIUM
    moved = changer.scsi(move)
    assert moved.status == 0, moved.sense.hex()
    after = element_status(changer)
    assert not after[33][0] and after[34] == (True, "T0000002")


def test_abort_task_ends_a_command_the_device_holds(guest):
    """SG_IO cannot abort one command: the target waits a grace period, then resets the
    device, so ABORT TASK answers FUNCTION COMPLETE with the command really ended, not when
    the device would have answered (a minute later: its reads are throttled to 4 KiB/s),
    and the LUN works again."""
    import struct
    _, port, _, _, _ = guest
    slow = session(port, "pass-slow")
    read = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1024, 0)               # 512 KiB
    assert slow.scsi(read, read_length=512 * 1024).status == 0     # the bucket lets one by
    held = slow.submit(read, read_length=512 * 1024)
    time.sleep(2)
    started = time.monotonic()
    answer = slow.tmf(1, ref_itt=held)                                 # ABORT TASK
    took = time.monotonic() - started
    assert answer.response == 0 and took < 20, (answer.response, took)
    assert slow.tasks[held].result is None                           # its answer was dropped
    reset = slow.tur()
    assert reset.status == 2 and reset.sense[12:14] == b"\x29\x03", reset.sense.hex()
    assert slow.tur().status == 0


def test_a_library_of_a_changer_and_its_drive_in_one_target(guest):
    """The changer at LUN0 and the drive at LUN1 (named by its /dev/nst0 node) of one
    target: REPORT LUNS is the target's, each LUN is its device, and a REWIND on the drive
    and a READ ELEMENT STATUS on the changer sent together both answer (each sequential
    LUN queues on its own; the unit tests show one does not wait for the other)."""
    _, port, _, _, _ = guest
    library = session(port, "pass-library")
    luns = library.scsi(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), read_length=256)
    assert luns.status == 0 and int.from_bytes(luns.data[:4], "big") == 16
    assert [luns.data[8 + 8 * i + 1] for i in range(2)] == [0, 1]
    for _ in range(4):                                    # LUN1's power-on attention
        if library.tur(lun=1).status == 0:
            break
    changer_type = library.inquiry(lun=0).data[0] & 0x1F
    drive_type = library.inquiry(lun=1).data[0] & 0x1F
    assert (changer_type, drive_type) == (0x08, 0x01)
    rewind = library.submit(bytes([0x01, 0, 0, 0, 0, 0]), lun=1)           # REWIND
    status = library.scsi(bytes([0xB8, 0x02, 0, 0, 0xFF, 0xFF, 0]) +
                          (4096).to_bytes(3, "big") + bytes(2), read_length=4096)
    assert status.status == 0, status.sense.hex()          # READ ELEMENT STATUS, slots
    assert library.collect(rewind).status == 0


def test_a_unit_attention_of_the_device_reaches_every_initiator(guest):
    """scsi_debug grown to 1 GiB reports CAPACITY DATA HAS CHANGED (2A/09) once, to its one
    initiator, the target: the session whose command meets it gets it, and the other
    session gets the same sense before its next command runs."""
    machine, port, _, _, _ = guest
    first, second = session(port, "pass-debug"), session(port, "pass-debug")
    (machine.job / "grow-debug").touch()
    assert machine.wait_for("DEBUG GROWN", 60)
    met = first.tur()
    assert met.status == 2 and met.sense[2] & 0x0F == 0x06, met.sense.hex()
    assert met.sense[12:14] == b"\x2a\x09"
    relayed = second.tur()
    assert relayed.status == 2 and relayed.sense == met.sense
    assert first.tur().status == 0 and second.tur().status == 0
    blocks, _ = second.read_capacity16()
    assert blocks == (1 << 30) // 512
