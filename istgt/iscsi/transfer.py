"""Transport state of a SCSI command and the PDUs that answer it (RFC 7143 11.3-11.8).

Pure code: a completed task and the connection's limits in, Data-In/SCSI Response PDUs out.
"""

from __future__ import annotations

from istgt.iscsi import pdu as wire

GOOD = 0x00
OVERFLOW, UNDERFLOW = 0x04, 0x02     # O and U bits of a SCSI Response / Data-In


class Command:
    """Transport state of one SCSI command while it gathers data or executes."""

    __slots__ = ("itt", "lun_field", "task", "buffer", "received", "next_offset",
                 "outstanding_r2t", "r2t_sn", "read", "holds_slot", "unsolicited_end",
                 "unsolicited_sn", "unsolicited_next")

    def __init__(self, itt, lun_field, task, read, holds_slot):
        self.itt = itt
        self.lun_field = lun_field
        self.task = task
        self.read = read
        self.holds_slot = holds_slot
        self.buffer = None
        self.received = 0
        self.next_offset = 0
        self.outstanding_r2t = 0
        self.r2t_sn = 0
        self.unsolicited_end = 0
        self.unsolicited_sn = 0
        self.unsolicited_next = 0     # offset the next unsolicited Data-Out must carry


class R2tState:
    __slots__ = ("command", "offset", "length", "received", "data_sn")

    def __init__(self, command, offset, length):
        self.command = command
        self.offset = offset
        self.length = length
        self.received = 0
        self.data_sn = 0         # the DataSN the next Data-Out of this burst must carry

    @property
    def next_offset(self) -> int:
        return self.offset + self.received


def scsi_responses(cmd: Command, task, max_segment: int, max_burst: int) -> list:
    status = task.status
    sense = task.sense or b""
    edtl = task.transfer_length
    data = task.data_in
    out = []
    rflags = residual = 0
    data_sn = 0
    if cmd.read:
        n = len(data) if data is not None else 0
        if n > edtl:
            rflags, residual, n = OVERFLOW, n - edtl, edtl
        elif n < edtl:
            rflags, residual = UNDERFLOW, edtl - n
        collapse = status == GOOD and not sense
        if n:
            view = memoryview(data)[:n]
            seg = max_segment
            burst = max_burst
            offset = 0
            while offset < n:
                room = burst - offset % burst
                length = min(seg, n - offset, room)
                end = offset + length
                last = end == n
                r = wire.data_in(cmd.itt, cmd.lun_field, view[offset:end], data_sn, offset,
                                 final=last or length == room,
                                 status=status if (last and collapse) else None,
                                 residual_flags=rflags, residual=residual)
                r.ends_command = last and collapse and cmd.holds_slot
                out.append(r)
                data_sn += 1
                offset = end
            if collapse:
                return out
    elif edtl or task.data_out_length:
        # write residuals: what the CDB asked for (SPDTL) against EDTL (RFC 7143 11.4.5)
        wanted = task.data_out_length
        if wanted is None:
            wanted = cmd.received if cmd.buffer is not None else 0
        if wanted > edtl:
            rflags, residual = OVERFLOW, wanted - edtl
        elif wanted < edtl:
            rflags, residual = UNDERFLOW, edtl - wanted
        data_sn = cmd.r2t_sn
    r = wire.scsi_response(cmd.itt, status, sense, rflags, residual, data_sn)
    r.ends_command = cmd.holds_slot
    out.append(r)
    return out


class MalformedAhs(ValueError):
    """An AHS whose length runs past TotalAHSLength (the PDU is rejected, RFC 7143 11.2.1.5)."""


def extended_cdb(cdb: bytes, ahs: bytes) -> bytes:
    """Append an Extended CDB AHS (type 1) to the 16 bytes in the BHS."""
    pos = 0
    while pos + 4 <= len(ahs):
        length = int.from_bytes(ahs[pos:pos + 2], "big")
        kind = ahs[pos + 2]
        if length == 0 or pos + 3 + length > len(ahs):
            raise MalformedAhs(f"AHS type {kind} of {length} bytes at {pos} runs past "
                               f"TotalAHSLength {len(ahs)}")
        if kind == 1:
            return cdb + bytes(ahs[pos + 4:pos + 3 + length])
        pos += (3 + length + 3) & ~3      # header (3 bytes) + AHS-specific, padded to 4
    return cdb
