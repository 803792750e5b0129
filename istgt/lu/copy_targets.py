"""The logical units one target's EXTENDED COPY may name, found by their NAA designator.

A copy manager (the LU that received EXTENDED COPY) reaches the other LUs of the same
target through this registry. It is built once when the target's LUNs exist and never
changes afterwards, so lookups need no lock. LUs of other targets are deliberately absent:
an initiator allowed on one target must not reach another target's data through a copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class CopyTargets:
    """NAA designator (as Device Identification VPD reports it) -> device."""

    def __init__(self, devices: Iterable[Any] = ()) -> None:
        self._by_naa: dict[bytes, Any] = {}
        for device in devices:
            self.add(device)

    def add(self, device: Any) -> None:
        if not hasattr(device, "identity"):
            return              # a pass-through device: its identity is the device's own
        naa = bytes(device.identity.naa)
        if naa in self._by_naa and self._by_naa[naa] is not device:
            raise ValueError(f"two logical units share the NAA designator {naa.hex()}")
        self._by_naa[naa] = device

    def find(self, naa: bytes) -> Any | None:
        return self._by_naa.get(bytes(naa))

    def __len__(self) -> int:
        return len(self._by_naa)
