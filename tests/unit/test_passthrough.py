"""PassThroughDevice's own part (issue 9), with a recording fake in place of SG_IO: what the
target keeps (unit attentions, reservations, target port designators, limits) and what it
passes on as the device gave it (status, sense, residual)."""

import contextlib
import struct
import threading
import time
from types import SimpleNamespace

from istgt.scsi.command import ITNexus, ScsiTask
from istgt.scsi.constants import ScsiStatus
from istgt.scsi.passthrough import (
    SG_DXFER_FROM_DEV, SG_DXFER_TO_DEV, DeviceGone, PassThroughDevice, _lba_and_blocks,
    _with_lba_and_blocks,
)

NEXUS = ITNexus("iqn.1994-05.com.example:a,i,0x1", "iqn.x:pass,t,0x0001", 1)
OTHER = ITNexus("iqn.1994-05.com.example:b,i,0x2", "iqn.x:pass,t,0x0001", 1)


class InFlight:
    """How many calls are inside at once (`now`), and the most there ever were."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.most = 0

    @contextlib.contextmanager
    def inside(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            yield
        finally:
            with self.lock:
                self.now -= 1


class FakeSg:
    def __init__(self, peripheral_type=0, max_transfer=1 << 20):
        self.logical_block_size = 512
        self.peripheral_type = peripheral_type
        self.max_transfer = max_transfer
        self.commands = []
        self.answer = (ScsiStatus.GOOD, b"", 0)
        self.fill = b"\xab"
        self.gone = False
        self.resets = 0
        self.identity = ("QEMU", "QEMU HARDDISK", "2.5+", b"serial-1", b"naa-1")
        self.closed = False
        self.sg_name = "sg0"

    def command(self, cdb, direction, buffer, timeout_ms, **options):
        if self.closed:                                      # as SgDevice._enter
            raise DeviceGone(19, "closed", self, sent=False)
        if self.gone:
            raise DeviceGone(19, "gone", self)
        self.commands.append((bytes(cdb), direction, len(buffer) if buffer else 0))
        if cdb[0] == 0x25:                                   # READ CAPACITY(10)
            buffer[:] = struct.pack(">II", 0xFFFF, 512)
        elif direction == SG_DXFER_FROM_DEV and buffer is not None:
            buffer[:] = self.fill * len(buffer)
        return self.answer

    def reset(self):
        self.resets += 1

    def close(self):
        self.closed = True


def device(sg=None, open_device=None):
    lu = SimpleNamespace(name="iqn.x:pass", mappings=((1, 1),))
    lun = SimpleNamespace(number=0, path="/dev/sg0")
    sg = sg or FakeSg()
    d = PassThroughDevice(lu, lun, sg, **({"open_device": open_device} if open_device else {}))
    assert sg.commands[:1] == [(bytes(6), -1, 0)]    # the open took the device's attentions
    sg.commands.clear()
    return d


def run(d, cdb, nexus=NEXUS, data=None, edtl=None):
    task = ScsiTask(0, bytes(cdb), nexus, data_out=data,
                    transfer_length=edtl if edtl is not None else len(data or b""))
    d.execute(task)
    return task


def ready(d, nexus=NEXUS):
    task = run(d, bytes(6), nexus)                   # the power-on attention of the nexus
    assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[2] & 0x0F == 0x06
    return d


def test_each_nexus_gets_its_own_power_on_attention_and_the_device_never_sees_it():
    sg = FakeSg()
    d = ready(device(sg))
    assert sg.commands == []
    assert run(d, bytes(6)).status == ScsiStatus.GOOD
    assert len(sg.commands) == 1
    assert run(d, bytes(6), OTHER).status == ScsiStatus.CHECK_CONDITION


def test_status_sense_and_residual_come_from_the_device():
    sg = FakeSg()
    d = ready(device(sg))
    sg.answer = (ScsiStatus.CHECK_CONDITION, b"\x70\x00\x03" + bytes(15), 0)
    task = run(d, struct.pack(">BBIBHB", 0x28, 0, 7, 0, 1, 0), edtl=512)
    assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[2] == 0x03   # MEDIUM ERROR
    sg.answer = (ScsiStatus.GOOD, b"", 200)
    task = run(d, bytes([0x12, 0, 0, 0, 255, 0]), edtl=255)
    assert task.status == ScsiStatus.GOOD and len(task.data_in) == 55


def test_a_reservation_is_the_targets_and_a_conflict_never_reaches_the_device():
    sg = FakeSg()
    d = ready(ready(device(sg)), OTHER)
    register = struct.pack(">QQ4xBxH", 0, 0xA, 0, 0)
    assert run(d, struct.pack(">BBBxxIBB", 0x5F, 0, 0, 24, 0, 0)[:10], data=register).status \
        == ScsiStatus.GOOD
    reserve = struct.pack(">QQ4xBxH", 0xA, 0, 0, 0)
    assert run(d, struct.pack(">BBBxxIBB", 0x5F, 1, 1, 24, 0, 0)[:10], data=reserve).status \
        == ScsiStatus.GOOD                                              # WRITE EXCLUSIVE
    before = len(sg.commands)
    write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
    assert run(d, write, OTHER, data=bytes(512)).status == ScsiStatus.RESERVATION_CONFLICT
    assert len(sg.commands) == before
    assert run(d, write, NEXUS, data=bytes(512)).status == ScsiStatus.GOOD
    assert sg.commands[-1][1] == SG_DXFER_TO_DEV


def test_vpd_83_gets_the_target_port_designators_after_the_devices_own():
    sg = FakeSg()
    d = ready(device(sg))
    own = bytes([0x01, 0x03, 0x00, 0x08]) + bytes(range(8))            # an NAA designator
    page = bytes([0x00, 0x83]) + struct.pack(">H", len(own)) + own

    def answer(cdb, direction, buffer, timeout, **options):
        buffer[:len(page)] = page
        return ScsiStatus.GOOD, b"", len(buffer) - len(page)
    sg.command = answer
    task = run(d, bytes([0x12, 0x01, 0x83, 0x01, 0x00, 0]), edtl=256)
    data = bytes(task.data_in)
    assert data[4:4 + len(own)] == own
    assert struct.unpack(">H", data[2:4])[0] == len(data) - 4
    assert b"iqn.x:pass,t,0x0001" in data                               # the target port name


def test_a_read_over_the_devices_limit_is_split_and_joined():
    sg = FakeSg(max_transfer=64 * 1024)
    d = ready(device(sg))
    task = run(d, struct.pack(">BBQIBB", 0x88, 0, 1000, 300, 0, 0), edtl=300 * 512)
    assert task.status == ScsiStatus.GOOD and len(task.data_in) == 300 * 512
    reads = [c for c in sg.commands if c[0][0] == 0x88]
    assert [_lba_and_blocks(c[0]) for c in reads] == [(1000, 128), (1128, 128), (1256, 44)]


def test_a_device_that_is_gone_answers_not_ready_and_lu_reset_reaches_the_device():
    sg = FakeSg()
    d = ready(device(sg))
    sg.gone = True
    task = run(d, bytes(6))
    assert task.status == ScsiStatus.CHECK_CONDITION
    assert (task.sense[2] & 0x0F, task.sense[12]) == (0x02, 0x04)      # NOT READY
    sg.gone = False
    d.reset("lun")
    assert sg.resets == 1
    task = run(d, bytes(6))
    assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[12:14] == b"\x29\x03"


def test_the_lba_and_length_of_a_piece_are_rewritten_and_nothing_else():
    cdb = struct.pack(">BBIBHB", 0x2A, 0x08, 5, 0x3, 100, 0x7)      # FUA, group 3, control 7
    piece = _with_lba_and_blocks(cdb, 9, 4)
    assert _lba_and_blocks(piece) == (9, 4) and piece[1] == 0x08 and piece[6] == 0x3
    assert piece[9] == 0x7


def test_report_luns_is_the_targets_and_cdbs_go_with_their_own_length():
    sg = FakeSg()
    d = ready(device(sg))
    d.set_lun_numbers([0, 3])
    task = run(d, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), edtl=256)
    assert task.status == ScsiStatus.GOOD and struct.unpack(">I", task.data_in[:4])[0] == 16
    assert sg.commands == []                                  # never reached the device
    run(d, struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0).ljust(16, b"\0"), edtl=512)
    assert len(sg.commands[-1][0]) == 10                     # not the BHS's 16 bytes


def test_a_recovered_error_in_one_piece_does_not_cut_the_transfer_short():
    sg = FakeSg(max_transfer=64 * 1024)
    d = ready(device(sg))
    answers = iter([(ScsiStatus.GOOD, b"", 0),
                    (ScsiStatus.CHECK_CONDITION, b"\x70\x00\x01" + bytes(15), 0),
                    (ScsiStatus.GOOD, b"", 0)])
    original = sg.command

    def command(cdb, direction, buffer, timeout, **options):
        original(cdb, direction, buffer, timeout)
        return next(answers)
    sg.command = command
    task = run(d, struct.pack(">BBQIBB", 0x88, 0, 0, 300, 0, 0), edtl=300 * 512)
    assert len(task.data_in) == 300 * 512                    # every piece ran
    assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[2] & 0x0F == 0x01


def test_transport_trouble_is_busy_and_a_bug_is_never_good():
    from istgt.scsi.passthrough import TransportTrouble
    sg = FakeSg()
    d = ready(device(sg))

    def interrupted(*_, **options):
        raise TransportTrouble(4, "EINTR", busy=True)
    sg.command = interrupted
    assert run(d, bytes(6)).status == ScsiStatus.BUSY

    def broken(*_, **options):
        raise struct.error("a bug")
    sg.command = broken
    task = run(d, bytes(6))
    assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[2] & 0x0F == 0x04


UA_CAPACITY_CHANGED = bytes([0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2A, 0x09, 0, 0, 0, 0])


def test_a_unit_attention_of_the_device_reaches_every_nexus_once():
    """The device sees one initiator, the target: the attention it reports to whichever
    nexus asked first is owed to the others too, as the device gave it."""
    sg = FakeSg()
    d = ready(ready(device(sg)), OTHER)
    third = ITNexus("iqn.1994-05.com.example:c,i,0x3", "iqn.x:pass,t,0x0001", 1)
    ready(d, third)
    sg.answer = (ScsiStatus.CHECK_CONDITION, UA_CAPACITY_CHANGED, 0)
    first = run(d, bytes(6))
    assert first.status == ScsiStatus.CHECK_CONDITION and first.sense == UA_CAPACITY_CHANGED
    sg.answer = (ScsiStatus.GOOD, b"", 0)
    sent = len(sg.commands)
    for nexus in (OTHER, third):
        relayed = run(d, bytes(6), nexus)
        assert relayed.status == ScsiStatus.CHECK_CONDITION
        assert relayed.sense == UA_CAPACITY_CHANGED
        assert run(d, bytes(6), nexus).status == ScsiStatus.GOOD
    assert len(sg.commands) == sent + 2               # the relayed ones never reached it
    assert run(d, bytes(6)).status == ScsiStatus.GOOD  # the first nexus had its own


class ResetAttentionsSg(FakeSg):
    """After a reset the device reports 29/00 once to the next command."""

    def __init__(self):
        super().__init__()
        self.pending = 0

    extra = None            # another attention the device holds after its reset ones

    def reset(self):
        super().reset()
        self.pending = 2
        self.extra_pending = self.extra

    def command(self, cdb, direction, buffer, timeout_ms, **options):
        if self.pending:
            self.pending -= 1
            self.commands.append((bytes(cdb), direction, 0))
            return (ScsiStatus.CHECK_CONDITION, bytes([0x70, 0, 6]) + bytes(9) + b"\x29" +
                    bytes(5), 0)
        if getattr(self, "extra_pending", None):
            sense, self.extra_pending = self.extra_pending, None
            return (ScsiStatus.CHECK_CONDITION, sense, 0)
        return super().command(cdb, direction, buffer, timeout_ms)


def test_an_lu_reset_gives_each_nexus_the_targets_attention_not_the_devices_too():
    sg = ResetAttentionsSg()
    d = ready(ready(device(sg)), OTHER)
    d.reset("lun")
    assert sg.resets == 1
    assert [c[0] for c in sg.commands] == [bytes(6)] * 3     # taken with TEST UNIT READY
    for nexus in (NEXUS, OTHER):
        task = run(d, bytes(6), nexus)
        assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[12:14] == b"\x29\x03"
        assert run(d, bytes(6), nexus).status == ScsiStatus.GOOD


def test_a_device_back_under_its_path_is_served_again_after_a_power_on_attention(monkeypatch):
    import istgt.scsi.passthrough as passthrough
    monkeypatch.setattr(passthrough, "REOPEN_INTERVAL_S", 0.0)
    opened = []

    def open_device(path):
        if not opened and not returned:
            raise OSError(2, "no such device")
        sg = FakeSg()
        opened.append(sg)
        return sg

    returned = False
    first = FakeSg()
    d = ready(ready(device(first, open_device)), OTHER)
    first.gone = True
    gone = run(d, bytes(6))
    assert gone.status == ScsiStatus.CHECK_CONDITION and gone.sense[2] & 0x0F == 0x02
    assert not opened
    returned = True
    back = run(d, bytes(6))                      # reopened: this command gets the power-on
    assert back.status == ScsiStatus.CHECK_CONDITION and back.sense[2] & 0x0F == 0x06
    assert back.sense[12] == 0x29 and first.closed and d.sg is opened[0]
    assert run(d, bytes(6)).status == ScsiStatus.GOOD
    assert run(d, bytes(6), OTHER).sense[12] == 0x29     # the other nexus hears of it too
    assert run(d, bytes(6), OTHER).status == ScsiStatus.GOOD
    assert opened[0].commands[-1][0] == bytes(6)


def test_another_device_found_under_the_path_is_not_served(monkeypatch):
    import istgt.scsi.passthrough as passthrough
    monkeypatch.setattr(passthrough, "REOPEN_INTERVAL_S", 0.0)
    stranger = FakeSg()
    stranger.identity = ("ATA", "SOMEONE ELSES", "1.0", b"serial-2", b"naa-2")
    first = FakeSg()
    d = ready(device(first, lambda path: stranger))
    first.gone = True
    for _ in range(2):
        task = run(d, bytes(6))
        assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[2] & 0x0F == 0x02
    assert stranger.closed and d.sg is first and stranger.commands == []


def test_an_sg_node_is_closed_only_when_no_ioctl_uses_it(tmp_path):
    """A gone device's node is closed at once, but its fd number is freed only when the
    last ioctl in progress returns: a number reused under it would send the next ioctl to
    another file."""
    import os

    import pytest

    from istgt.scsi.passthrough import SgDevice
    sg = SgDevice.__new__(SgDevice)
    sg.path, sg.fd = "/dev/sg9", os.open(os.devnull, os.O_RDONLY)
    sg._init_requests()
    fd = sg._enter()                                  # an ioctl in progress
    sg.close()
    os.fstat(fd)                                      # still open
    with pytest.raises(DeviceGone):
        sg._enter()                                   # no new ioctl starts on it
    sg._leave()
    assert sg.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


class ConcurrentSg(FakeSg):
    """Counts how many commands are inside the device at once."""

    def __init__(self, peripheral_type):
        super().__init__(peripheral_type)
        self.in_flight = InFlight()

    def command(self, cdb, direction, buffer, timeout_ms, **options):
        with self.in_flight.inside():
            time.sleep(0.05)
        return super().command(cdb, direction, buffer, timeout_ms)


def run_together(d, count):
    """`count` READ(10)s of one nexus (LBA = their order) through a LogicalUnit with
    QueueDepth 8."""
    from istgt.lu.unit import LogicalUnit
    config = SimpleNamespace(number=1, name="iqn.x:pass", queue_depth=8)
    lu = LogicalUnit(config, {0: d}, max_sessions=4)       # room for 32 tasks
    done = threading.Semaphore(0)
    tasks = [ScsiTask(0, struct.pack(">BBIBHB", 0x28, 0, n, 0, 1, 0), NEXUS, tag=n,
                      transfer_length=512) for n in range(count)]
    for task in tasks:
        lu.submit(task, lambda t, aborted: done.release())
    for _ in tasks:
        assert done.acquire(timeout=10)
    lu.shutdown()
    return tasks


def test_a_pass_through_disk_with_a_queue_depth_gets_commands_in_parallel():
    sg = ConcurrentSg(peripheral_type=0)
    d = ready(device(sg))
    tasks = run_together(d, 8)
    assert all(t.status == ScsiStatus.GOOD for t in tasks)
    assert sg.in_flight.most > 1


def test_a_pass_through_tape_takes_one_command_at_a_time_in_order_whatever_the_queue_depth():
    for _ in range(5):                    # the order was lost 1 time in 2 with a plain lock
        sg = ConcurrentSg(peripheral_type=1)
        d = ready(device(sg))
        tasks = run_together(d, 16)
        assert all(t.status == ScsiStatus.GOOD for t in tasks)
        assert sg.in_flight.most == 1
        assert [struct.unpack_from(">I", c[0], 2)[0] for c in sg.commands] == list(range(16))


class HeldTapeSg(FakeSg):
    """A tape whose first command (a long REWIND) ends only when released or reset."""

    def __init__(self):
        super().__init__(peripheral_type=1)
        self.release = threading.Event()

    def command(self, cdb, direction, buffer, timeout_ms, **options):
        if cdb[0] == 0x01:
            self.commands.append((bytes(cdb), direction, 0))
            self.release.wait(10)
            return (ScsiStatus.GOOD, b"", 0)
        return super().command(cdb, direction, buffer, timeout_ms)

    def reset(self):
        super().reset()
        self.release.set()


def test_an_aborted_tape_command_still_waiting_never_reaches_the_drive():
    """Another initiator's long REWIND holds the drive; a WRITE waiting behind it is aborted:
    FUNCTION COMPLETE at once, the drive never sees it, and nobody's REWIND is reset."""
    from istgt.lu.unit import LogicalUnit
    sg = HeldTapeSg()
    d = ready(ready(device(sg)), OTHER)
    lu = LogicalUnit(SimpleNamespace(number=1, name="iqn.x:pass", queue_depth=8), {0: d},
                     max_sessions=2)
    answered = []
    rewind = ScsiTask(0, bytes([0x01, 0, 0, 0, 0, 0]), OTHER, tag=1)
    write = ScsiTask(0, bytes([0x0A, 0, 0, 2, 0, 0]), NEXUS, tag=2, data_out=bytes(512),
                     transfer_length=512)
    lu.submit(rewind, lambda t, aborted: answered.append(("rewind", aborted)))
    for _ in range(100):
        if sg.commands:
            break
        time.sleep(0.01)
    lu.submit(write, lambda t, aborted: answered.append(("write", aborted)))
    time.sleep(0.1)
    started = time.monotonic()
    assert lu.abort_task(NEXUS, 2)
    assert time.monotonic() - started < 1 and sg.resets == 0
    sg.release.set()
    for _ in range(100):
        if len(answered) == 2:
            break
        time.sleep(0.01)
    lu.shutdown()
    assert sorted(answered) == [("rewind", False), ("write", True)]
    assert [c[0][0] for c in sg.commands] == [0x01]


class OldNodeSg(FakeSg):
    """The old node: while a command is on it, another command reopens the device."""

    def __init__(self, fresh, sent):
        super().__init__()
        self.fresh, self.sent, self.device = fresh, sent, None

    def command(self, cdb, direction, buffer, timeout_ms, **options):
        if self.device is None:                           # the open's TEST UNIT READY
            return super().command(cdb, direction, buffer, timeout_ms)
        self.device.sg = self.fresh
        raise DeviceGone(19, "gone", self, sent=self.sent)


def test_a_command_that_may_have_run_on_the_old_node_is_not_run_again():
    """A WRITE stuck on the old node comes back ENODEV after another command reopened the
    device: it may have run, so it is answered NOT READY, not run again over newer data."""
    fresh = FakeSg()
    old = OldNodeSg(fresh, sent=True)
    d = ready(device(old))
    old.device = d
    task = run(d, struct.pack(">BBIBHB", 0x2A, 0, 7, 0, 1, 0), data=bytes(512))
    assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[2] & 0x0F == 0x02
    assert fresh.commands == [] and not fresh.closed and d.sg is fresh


def test_a_command_that_never_reached_the_old_node_runs_on_the_new_one():
    fresh = FakeSg()
    old = OldNodeSg(fresh, sent=False)
    d = ready(device(old))
    old.device = d
    task = run(d, struct.pack(">BBIBHB", 0x2A, 0, 7, 0, 1, 0), data=bytes(512))
    assert task.status == ScsiStatus.GOOD and fresh.commands[0][0][0] == 0x2A


def test_a_device_without_serial_or_identification_is_not_reopened(monkeypatch):
    import istgt.scsi.passthrough as passthrough
    monkeypatch.setattr(passthrough, "REOPEN_INTERVAL_S", 0.0)
    first = FakeSg()
    first.identity = ("QEMU", "QEMU HARDDISK", "2.5+", None, b"")
    opened = []
    d = ready(device(first, lambda path: opened.append(1) or FakeSg()))
    first.gone = True
    for _ in range(3):
        assert run(d, bytes(6)).sense[2] & 0x0F == 0x02
    assert opened == []


def test_a_closed_unit_opens_nothing_more(monkeypatch):
    import istgt.scsi.passthrough as passthrough
    monkeypatch.setattr(passthrough, "REOPEN_INTERVAL_S", 0.0)
    first = FakeSg()
    opened = []
    d = ready(device(first, lambda path: opened.append(1) or FakeSg()))
    d.close()
    assert not d._device_gone(DeviceGone(19, "closed", first, sent=False), NEXUS)
    assert opened == []


class FakeLibc:
    """In place of libc's ioctl: counts SG_IO calls inside at once, records resets."""

    def __init__(self):
        self.in_flight = InFlight()
        self.reset_values = []

    def ioctl(self, fd, request, argument):
        import ctypes
        if request == 0x2284:                                # SG_SCSI_RESET
            self.reset_values.append(ctypes.cast(argument, ctypes.POINTER(ctypes.c_int))[0])
            return 0
        with self.in_flight.inside():
            self.hold()
        return 0

    def hold(self):
        time.sleep(0.02)


def bare_sg_device(monkeypatch):
    import os

    import istgt.scsi.passthrough as passthrough
    libc = FakeLibc()
    monkeypatch.setattr(passthrough, "_libc", libc)
    sg = passthrough.SgDevice.__new__(passthrough.SgDevice)
    sg.path, sg.fd = "/dev/sg9", os.open(os.devnull, os.O_RDONLY)
    sg._init_requests()
    return sg, libc


def test_no_more_commands_on_one_sg_node_than_the_driver_queues(monkeypatch):
    """sg takes 16 requests per open file and answers EDOM beyond: at QueueDepth 32 the
    others wait for a slot instead of coming back BUSY (one slot is kept for the target)."""
    sg, libc = bare_sg_device(monkeypatch)
    threads = [threading.Thread(target=sg.command, args=(bytes(6), -1, None, 1000))
               for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert libc.in_flight.most == 15
    sg.close()


def test_the_device_reset_is_never_escalated_by_the_kernel(monkeypatch):
    sg, libc = bare_sg_device(monkeypatch)
    sg.reset()
    assert libc.reset_values == [0x101]          # SG_SCSI_RESET_DEVICE | NO_ESCALATE
    sg.close()


def test_ending_a_held_command_resets_the_device_but_keeps_the_reservations():
    sg = FakeSg()
    d = ready(ready(device(sg)), OTHER)
    assert run(d, bytes([0x16, 0, 0, 0, 0, 0])).status == ScsiStatus.GOOD    # RESERVE(6)
    assert d.end_held_commands() and sg.resets == 1
    for nexus in (NEXUS, OTHER):
        assert run(d, bytes(6), nexus).sense[12:14] == b"\x29\x03"
    assert run(d, bytes(6), OTHER).status == ScsiStatus.RESERVATION_CONFLICT
    d.reset("lun")                                      # an LU reset releases it
    run(d, bytes(6), OTHER)
    assert run(d, bytes(6), OTHER).status == ScsiStatus.GOOD


def test_other_attentions_the_device_holds_at_a_reset_reach_every_nexus():
    """The reset's own 29h attentions are the target's to give; a capacity change the
    device held is kept for every nexus."""
    sg = ResetAttentionsSg()
    d = ready(ready(device(sg)), OTHER)
    sg.extra = UA_CAPACITY_CHANGED
    d.reset("lun")
    for nexus in (NEXUS, OTHER):
        assert run(d, bytes(6), nexus).sense[12:14] == b"\x29\x03"
        assert run(d, bytes(6), nexus).sense == UA_CAPACITY_CHANGED
        assert run(d, bytes(6), nexus).status == ScsiStatus.GOOD


def test_the_devices_reset_attention_met_during_a_reset_is_not_relayed():
    sg = FakeSg()
    d = ready(ready(device(sg)), OTHER)
    reset_ua = bytes([0x70, 0, 6]) + bytes(9) + b"\x29" + bytes(5)
    d._resets_in_progress = 1                          # a reset on another thread
    sg.answer = (ScsiStatus.CHECK_CONDITION, reset_ua, 0)
    assert run(d, bytes(6)).sense == reset_ua           # the command met it
    d._resets_in_progress = 0
    sg.answer = (ScsiStatus.GOOD, b"", 0)
    assert run(d, bytes(6), OTHER).status == ScsiStatus.GOOD     # nothing relayed


def test_normaca_is_not_offered_in_the_standard_inquiry_data():
    sg = FakeSg()
    sg.fill = b"\x20"                                  # every byte has bit 5 (NORMACA) set
    d = ready(device(sg))
    task = run(d, bytes([0x12, 0, 0, 0, 36, 0]), edtl=36)
    assert task.status == ScsiStatus.GOOD and task.data_in[3] == 0x00


def test_a_lost_nexus_is_forgotten_and_a_new_one_starts_afresh():
    d = ready(device())
    d.nexus_lost(NEXUS)
    assert NEXUS not in d._unit_attentions
    ready(d)                                      # the power-on of a new nexus again


def test_naca_and_link_are_refused_before_the_device_sees_them():
    """ACA would stop the shared device for every initiator (CLEAR ACA is not offered)."""
    sg = FakeSg()
    d = ready(device(sg))
    for cdb, byte, bit in ((bytes([0x00, 0, 0, 0, 0, 0x04]), 5, 2),
                           (struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0x01), 9, 0)):
        task = run(d, cdb, edtl=512 if cdb[0] == 0x28 else 0)
        assert task.status == ScsiStatus.CHECK_CONDITION
        sense = task.sense
        assert sense[2] & 0x0F == 0x05 and sense[12] == 0x24
        assert sense[15] & 0x80 and sense[15] & 0x40                # SKSV, C/D
        assert sense[15] & 0x07 == bit and int.from_bytes(sense[16:18], "big") == byte
    assert sg.commands == []


class HoldingLibc(FakeLibc):
    """SG_IO calls stay inside until released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def hold(self):
        self.release.wait(10)


def test_an_aborted_command_waiting_for_a_request_slot_is_never_sent(monkeypatch):
    """15 commands fill the node's slots (one is kept for the target): a 16th, aborted
    while it waits, ends NotSent; the kept slot still takes the target's own command."""
    import istgt.scsi.passthrough as passthrough
    sg, _ = bare_sg_device(monkeypatch)
    libc = HoldingLibc()
    monkeypatch.setattr(passthrough, "_libc", libc)
    holders = [threading.Thread(target=sg.command, args=(bytes(6), -1, None, 1000))
               for _ in range(15)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 5
    while libc.in_flight.now < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    aborted = threading.Event()
    outcome = []

    def waiting():
        try:
            sg.command(bytes(6), -1, None, 1000, cancelled=aborted.is_set)
            outcome.append("sent")
        except passthrough.NotSent:
            outcome.append("not sent")
    late = threading.Thread(target=waiting)
    late.start()
    time.sleep(0.2)
    assert libc.in_flight.now == 15 and not outcome            # it waits for a slot
    aborted.set()
    late.join(2)
    assert outcome == ["not sent"] and libc.in_flight.now == 15
    own = threading.Thread(target=sg.command, args=(bytes(6), -1, None, 1000),
                           kwargs={"own": True})
    own.start()
    deadline = time.monotonic() + 5
    while libc.in_flight.now < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert libc.in_flight.now == 16                             # the kept slot
    libc.release.set()
    for t in (*holders, own):
        t.join(5)
    sg.close()


def test_the_devices_reset_attention_is_not_relayed_when_a_reset_came_and_went():
    """A reset that started and ended while the command was at the device."""
    sg = FakeSg()
    d = ready(ready(device(sg)), OTHER)
    reset_ua = bytes([0x70, 0, 6]) + bytes(9) + b"\x29" + bytes(5)
    original = sg.command

    def during_a_reset(cdb, direction, buffer, timeout, **options):
        d._reset_epoch += 1                           # a whole reset meanwhile
        original(cdb, direction, buffer, timeout)
        return (ScsiStatus.CHECK_CONDITION, reset_ua, 0)
    sg.command = during_a_reset
    assert run(d, bytes(6)).sense == reset_ua
    sg.command = original
    assert run(d, bytes(6), OTHER).status == ScsiStatus.GOOD


class UnresettableSg(FakeSg):
    def reset(self):
        raise OSError(5, "no device reset handler")


def test_a_failed_reset_to_end_a_held_command_leaves_the_attentions_as_they_were():
    sg = UnresettableSg()
    d = ready(ready(device(sg)), OTHER)
    d._queue_unit_attention(0x2A03)                  # RESERVATIONS PREEMPTED, say
    assert not d.end_held_commands()
    for nexus in (NEXUS, OTHER):
        task = run(d, bytes(6), nexus)
        assert task.sense[12:14] == b"\x2a\x03"
        assert run(d, bytes(6), nexus).status == ScsiStatus.GOOD


def test_a_split_transfer_whose_later_piece_found_the_node_closed_is_not_run_again(
        monkeypatch):
    import istgt.scsi.passthrough as passthrough
    monkeypatch.setattr(passthrough, "REOPEN_INTERVAL_S", 0.0)
    fresh = FakeSg()
    old = FakeSg(max_transfer=64 * 1024)
    d = ready(device(old, lambda path: fresh))
    original = old.command

    def close_after_first(cdb, direction, buffer, timeout, **options):
        answer = original(cdb, direction, buffer, timeout)
        old.closed = True                             # the node went after piece 1
        return answer
    old.command = close_after_first
    task = run(d, struct.pack(">BBQIBB", 0x8A, 0, 0, 300, 0, 0), data=bytes(300 * 512))
    assert task.status == ScsiStatus.CHECK_CONDITION and task.sense[2] & 0x0F == 0x02
    assert all(c[0][0] != 0x8A for c in fresh.commands)   # not written again from the start


def test_a_blank_serial_number_does_not_identify_a_device():
    from istgt.scsi.passthrough import _identifies
    assert not _identifies(("V", "M", "1", bytes([0, 0x80, 0, 8]) + b"        ", None))
    assert not _identifies(("V", "M", "1", None, bytes([0, 0x83, 0, 0])))
    assert _identifies(("V", "M", "1", bytes([0, 0x80, 0, 4]) + b"A1B2", None))
    assert _identifies(("V", "M", "1", None, bytes([0, 0x83, 0, 12]) + bytes(12)))


def test_an_attention_a_returning_device_holds_reaches_every_nexus_after_its_power_on(
        monkeypatch):
    import istgt.scsi.passthrough as passthrough
    monkeypatch.setattr(passthrough, "REOPEN_INTERVAL_S", 0.0)
    fresh = ResetAttentionsSg()
    first = FakeSg()
    d = ready(ready(device(first, lambda path: fresh)), OTHER)
    first.closed = True                               # gone; back when asked
    fresh.pending, fresh.extra_pending = 1, UA_CAPACITY_CHANGED
    assert run(d, bytes(6)).sense[12] == 0x29          # the power-on, from the target
    assert run(d, bytes(6)).sense == UA_CAPACITY_CHANGED
    assert run(d, bytes(6), OTHER).sense[12] == 0x29
    assert run(d, bytes(6), OTHER).sense == UA_CAPACITY_CHANGED


def test_only_a_task_being_executed_can_be_cancelled():
    """A task that ended before its abort reached the device leaves nothing behind that a
    later task reusing its id() could be taken for."""
    d = ready(device())
    done = ScsiTask(0, bytes(6), NEXUS)
    d.execute(done)
    d.cancel_unsent([done])
    assert d._cancelled == set() and d._executing == set()


def test_limits_come_from_the_queue_of_the_devices_block_node(tmp_path):
    from istgt.scsi.passthrough import PIECE_MAX, logical_block_size, max_transfer_bytes
    assert (max_transfer_bytes(str(tmp_path)), logical_block_size(str(tmp_path))) == \
        (PIECE_MAX, 512)                                  # a tape or changer: no block node
    queue = tmp_path / "block" / "sda" / "queue"
    queue.mkdir(parents=True)
    (queue / "max_sectors_kb").write_text("64\n")
    (queue / "logical_block_size").write_text("4096\n")
    assert (max_transfer_bytes(str(tmp_path)), logical_block_size(str(tmp_path))) == \
        (64 * 1024, 4096)
    (queue / "max_sectors_kb").write_text("4096\n")
    assert max_transfer_bytes(str(tmp_path)) == PIECE_MAX   # never more than sg takes
