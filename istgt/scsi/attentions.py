"""Unit attentions per I_T nexus, shared by the device classes (DiskDevice and its DVD and
tape subclasses, PassThroughDevice).

A nexus seen for the first time has a power-on attention waiting; `_state_lock` guards
`_unit_attentions` (subclasses keep more of their per-nexus state under the same lock).
An attention is an ASC/ASCQ of the target's, or (pass-through) a device's sense relayed
as it was.
"""

from __future__ import annotations

import threading

from istgt.scsi import pr
from istgt.scsi.command import ITNexus
from istgt.scsi.constants import Asc


class NexusAttentions:
    def _init_attentions(self) -> None:
        self._state_lock = threading.Lock()
        # guarded by _state_lock: pending unit attentions per nexus (a known nexus has a list)
        self._unit_attentions: dict[ITNexus, list[int | bytes]] = {}

    def _take_unit_attention(self, nexus: ITNexus, consume: bool) -> int | bytes | None:
        with self._state_lock:
            pending = self._unit_attentions.get(nexus)
            if pending is None:
                pending = [Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET]
                self._unit_attentions[nexus] = pending
            if consume and pending:
                return pending.pop(0)
            return None

    def _queue_unit_attention(self, asc: int | bytes, except_nexus: ITNexus | None = None) -> None:
        with self._state_lock:
            for nexus, pending in self._unit_attentions.items():
                if nexus != except_nexus and asc not in pending:
                    pending.append(asc)

    def _reservation_unit_attention(self, pattern: ITNexus, asc: int) -> None:
        with self._state_lock:
            for nexus, pending in self._unit_attentions.items():
                if pr.nexus_matches(pattern, nexus) and asc not in pending:
                    pending.append(asc)

    def _reset_unit_attentions(self, asc: int) -> None:
        """A reset: whatever was pending is replaced by the reset's attention."""
        with self._state_lock:
            for pending in self._unit_attentions.values():
                pending[:] = [asc]

    def _forget_nexus(self, nexus: ITNexus) -> None:
        """The I_T nexus is gone: a later one with the same ports starts afresh (and is
        told about the power-on/reset like any new nexus)."""
        with self._state_lock:
            self._unit_attentions.pop(nexus, None)
