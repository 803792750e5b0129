"""The medium of one Disk LUN: started or stopped, loaded or ejected (removable LUs only),
and which I_T nexuses prevent its removal (SBC-4 5.18 PREVENT ALLOW MEDIUM REMOVAL,
5.25 START STOP UNIT)."""

from __future__ import annotations

import threading

from istgt.scsi.command import ITNexus
from istgt.scsi.constants import Asc, ResetKind, SenseKey
from istgt.scsi.sense import CheckCondition


class MediumState:
    def __init__(self, removable: bool) -> None:
        self.removable = removable
        self._lock = threading.Lock()
        self._stopped = False                 # guarded by _lock
        self._loaded = True                   # guarded by _lock; False only when removable
        self._preventing: set[ITNexus] = set()  # guarded by _lock

    def not_ready_asc(self) -> int | None:
        """Why medium-access commands get NOT READY now, or None when they may run."""
        with self._lock:
            if not self._loaded:
                return Asc.MEDIUM_NOT_PRESENT
            if self._stopped:
                return Asc.LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED
        return None

    def set_prevent(self, nexus: ITNexus, prevent: bool) -> None:
        with self._lock:
            if prevent:
                self._preventing.add(nexus)
            else:
                self._preventing.discard(nexus)

    def start_stop(self, start: bool, load_eject: bool) -> None:
        """START STOP UNIT with POWER CONDITION 0. A fixed disk stops or starts and
        ignores LOEJ. A removable LU only acts on LOEJ: load (START=1) or eject (START=0),
        either refused while any nexus prevents removal; without LOEJ nothing changes, as
        in C istgt's DVD and as libiscsi's StartStopUnit.NoLoej expects."""
        with self._lock:
            if not self.removable:
                self._stopped = not start
            elif load_eject:
                if self._preventing:
                    raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
                self._loaded = start

    @property
    def loaded(self) -> bool:
        with self._lock:
            return self._loaded

    @property
    def prevented(self) -> bool:
        with self._lock:
            return bool(self._preventing)

    def operator_eject(self) -> bool:
        """istgtcontrol unload: eject unless an initiator prevents removal (as a drive's
        button does nothing then). False when refused."""
        with self._lock:
            if not self.removable or self._preventing:
                return False
            self._loaded = False
            return True

    def operator_load(self) -> bool:
        """istgtcontrol load: close the tray; True when a medium was not loaded before."""
        with self._lock:
            if not self.removable:
                return False
            was_loaded, self._loaded = self._loaded, True
            self._stopped = False
            return not was_loaded

    def nexus_lost(self, nexus: ITNexus) -> None:
        with self._lock:
            self._preventing.discard(nexus)

    def reset(self, kind: ResetKind) -> None:
        """Every reset ends prevention; a power cycle also spins the unit up again. The
        medium stays where it is (ejected media is not reloaded by a reset)."""
        with self._lock:
            self._preventing.clear()
            if kind in (ResetKind.POWER_ON, ResetKind.TARGET_COLD):
                self._stopped = False
