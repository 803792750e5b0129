"""A mutation fuzzer for the target's network input.

Seeds are the byte streams a real session sends (recorded from the project's initiator:
login, SCSI commands with and without data, NOP-Out, Text, task management, Logout).
Each input is a seed with a few mutations (bit flips, byte values that matter to decoders,
length fields, truncation, duplicated or dropped PDUs), sent on a fresh connection; the
fuzzer reads whatever comes back for a moment and closes. Between batches a liveness check
logs in, runs INQUIRY and READ, and logs out: the target must answer all three.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass, field

from tests.functional.initiator import Initiator

INTERESTING_BYTES = (0x00, 0x01, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFE, 0xFF)
INTERESTING_WORDS = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFF, 0x1000000, 48, 8192)


class RecordingSocket:
    """Wraps a socket and keeps every byte sent through it."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sent = bytearray()

    def sendall(self, data) -> None:
        self.sent += data
        self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def record_seeds(host: str, port: int, target: str) -> list[bytes]:
    """Client-to-target byte streams of a few complete sessions."""
    seeds = []
    for scenario in (_io_session, _management_session, _discovery_session):
        initiator = Initiator(host, port, timeout=5)
        recorder = RecordingSocket(initiator.sock)
        initiator.sock = recorder
        try:
            scenario(initiator, target)
        finally:
            initiator.close()
        seeds.append(bytes(recorder.sent))
    return seeds


def _rw10(opcode: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", opcode, 0, lba, 0, blocks, 0)


def _io_session(initiator: Initiator, target: str) -> None:
    initiator.login(target)
    initiator.strict = False
    initiator.tur()
    initiator.inquiry()
    initiator.scsi(_rw10(0x28, 0, 8), read_length=4096)
    initiator.scsi(_rw10(0x2A, 8, 8), data_out=bytes(range(256)) * 16)
    initiator.scsi(_rw10(0x2A, 64, 1024), data_out=bytes(512 * 1024))    # R2T / Data-Out
    initiator.scsi(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2),
                   read_length=32)                                        # READ CAPACITY(16)
    initiator.logout()


def _management_session(initiator: Initiator, target: str) -> None:
    initiator.login(target)
    initiator.strict = False
    initiator.nop_out(b"ping")
    initiator.text([("MaxRecvDataSegmentLength", "65536")])
    itt = initiator.submit(_rw10(0x28, 0, 1), read_length=512)
    initiator.collect(itt)
    initiator.tmf(1, ref_itt=itt)              # ABORT TASK of a finished command
    initiator.tmf(5)                           # LOGICAL UNIT RESET
    initiator.logout()


def _discovery_session(initiator: Initiator, target: str) -> None:
    initiator.login(None)
    initiator.strict = False
    initiator.send_targets()
    initiator.logout()


def split_pdus(stream: bytes) -> list[bytes]:
    """Cut a recorded stream (no digests) into PDUs."""
    pdus, pos = [], 0
    while pos + 48 <= len(stream):
        length = int.from_bytes(stream[pos + 5:pos + 8], "big")
        size = 48 + stream[pos + 4] * 4 + length + (-length % 4)
        pdus.append(stream[pos:pos + size])
        pos += size
    return pdus


def mutate(seed: bytes, rng: random.Random) -> bytes:
    pdus = split_pdus(seed)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.1 and len(pdus) > 1:
            del pdus[rng.randrange(len(pdus))]
        elif choice < 0.2:
            i = rng.randrange(len(pdus))
            pdus.insert(i, pdus[i])
        elif choice < 0.3 and len(pdus) > 1:
            i, j = rng.randrange(len(pdus)), rng.randrange(len(pdus))
            pdus[i], pdus[j] = pdus[j], pdus[i]
        else:
            i = rng.randrange(len(pdus))
            pdus[i] = _mutate_pdu(bytearray(pdus[i]), rng)
    data = b"".join(pdus)
    if rng.random() < 0.1:
        data = data[:rng.randrange(len(data) + 1)]                # truncated anywhere
    return data


def _mutate_pdu(pdu: bytearray, rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.35:                                   # flip bits in the header
        pos = rng.randrange(min(48, len(pdu)))
        pdu[pos] ^= 1 << rng.randrange(8)
    elif kind < 0.6:                                  # a byte that decoders care about
        pos = rng.randrange(min(48, len(pdu)))
        pdu[pos] = rng.choice(INTERESTING_BYTES)
    elif kind < 0.8 and len(pdu) >= 48:               # a 32-bit field: lengths, tags, SNs
        pos = rng.choice((4, 16, 20, 24, 28, 32, 36, 40, 44))
        pdu[pos:pos + 4] = struct.pack(">I", rng.choice(INTERESTING_WORDS))
    elif len(pdu) > 48:                               # the data segment (login keys, CDB data)
        pos = rng.randrange(48, len(pdu))
        pdu[pos] = rng.randrange(256)
    else:                                             # the CDB
        pos = rng.randrange(32, 48)
        pdu[pos] = rng.choice(INTERESTING_BYTES)
    return bytes(pdu)


def send_input(host: str, port: int, data: bytes, linger_s: float = 0.02) -> None:
    """One input on a fresh connection: send it, read what comes back briefly, close."""
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.sendall(data)
            sock.settimeout(linger_s)
            deadline = time.monotonic() + linger_s
            while time.monotonic() < deadline:
                if not sock.recv(65536):
                    break
        except OSError:
            pass        # the target may close first: that is an answer too


def alive(host: str, port: int, target: str) -> str | None:
    """None if a fresh session logs in and gets INQUIRY and READ answered; else why not."""
    initiator = Initiator(host, port, timeout=10)
    try:
        initiator.login(target)
        initiator.strict = False
        for _ in range(4):
            if initiator.tur().status == 0:
                break
        if initiator.inquiry().status != 0:
            return "INQUIRY failed"
        if initiator.scsi(_rw10(0x28, 0, 1), read_length=512).status != 0:
            return "READ failed"
        initiator.logout()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        initiator.close()


@dataclass
class FuzzReport:
    inputs: int = 0
    batches: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def run(host: str, port: int, target: str, inputs: int, seed: int, batch: int = 250,
        time_limit_s: float = 3600.0, linger_s: float = 0.02, on_batch=None) -> FuzzReport:
    """Send up to `inputs` mutated inputs (stopping at `time_limit_s`), checking liveness
    after every `batch`; `on_batch(report)` may add its own checks (memory, threads)."""
    rng = random.Random(seed)
    seeds = record_seeds(host, port, target)
    report = FuzzReport()
    started = time.monotonic()
    while report.inputs < inputs and time.monotonic() - started < time_limit_s:
        for _ in range(min(batch, inputs - report.inputs)):
            data = mutate(rng.choice(seeds), rng)
            try:
                send_input(host, port, data, linger_s)
            except OSError as exc:
                report.failures.append(f"input {report.inputs}: connect/send: {exc}")
            report.inputs += 1
        report.batches += 1
        problem = alive(host, port, target)
        if problem is not None:
            report.failures.append(f"after {report.inputs} inputs: {problem}")
            break
        if on_batch is not None:
            on_batch(report)
    report.seconds = time.monotonic() - started
    return report
