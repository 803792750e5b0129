"""Mode pages of a direct-access LU: current, changeable, default and saved values (SPC-4 7.5).

Saved values are the configured defaults: MODE SELECT cannot save (SP=1 is refused with
SAVING PARAMETERS NOT SUPPORTED) because nothing outside the config file persists.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import IntEnum

from istgt.scsi.sense import invalid_field_in_parameter_list

ALL_PAGES = 0x3F
ALL_SUBPAGES = 0xFF


class PageControl(IntEnum):
    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


class PageCode(IntEnum):
    READ_WRITE_ERROR_RECOVERY = 0x01
    DISCONNECT_RECONNECT = 0x02
    VERIFY_ERROR_RECOVERY = 0x07
    CACHING = 0x08
    CONTROL = 0x0A
    INFORMATIONAL_EXCEPTIONS_CONTROL = 0x1C


CONTROL_EXTENSION_SUBPAGE = 0x01

# Caching page byte 2
CACHING_WCE = 0x04
CACHING_RCD = 0x01
# Control page byte 2 / byte 4
CONTROL_D_SENSE = 0x04
CONTROL_SWP = 0x08
# Control page byte 3: queue algorithm modifier 1 = unrestricted reordering allowed
CONTROL_QAM_UNRESTRICTED = 0x10


@dataclass(frozen=True)
class PageDefinition:
    page: int
    subpage: int
    default: bytes  # the whole page, header included
    changeable: bytes  # same length: 1 bits may be changed by MODE SELECT

    @property
    def key(self) -> tuple[int, int]:
        return (self.page, self.subpage)


def _page(page: int, subpage: int, length: int, fields: dict[int, int]) -> bytes:
    """A page of `length` bytes in total with its header, the other bytes from `fields`."""
    data = bytearray(length)
    if subpage:
        data[0] = 0x40 | page  # SPF
        data[1] = subpage
        data[2:4] = (length - 4).to_bytes(2, "big")
    else:
        data[0] = page
        data[1] = length - 2
    for index, value in fields.items():
        data[index] = value
    return bytes(data)


def disk_page_definitions(write_cache: bool, read_cache: bool) -> list[PageDefinition]:
    caching = (CACHING_WCE if write_cache else 0) | (0 if read_cache else CACHING_RCD)
    return [
        PageDefinition(
            0x01, 0, _page(0x01, 0, 12, {2: 0x80}), _page(0x01, 0, 12, {})  # AWRE
        ),
        PageDefinition(0x02, 0, _page(0x02, 0, 16, {}), _page(0x02, 0, 16, {})),
        PageDefinition(0x07, 0, _page(0x07, 0, 12, {}), _page(0x07, 0, 12, {})),
        PageDefinition(
            0x08,
            0,
            _page(0x08, 0, 20, {2: caching}),
            _page(0x08, 0, 20, {2: CACHING_WCE | CACHING_RCD}),
        ),
        PageDefinition(
            0x0A,
            0,
            # Busy timeout FFFFh: unlimited.
            _page(0x0A, 0, 12, {3: CONTROL_QAM_UNRESTRICTED, 8: 0xFF, 9: 0xFF}),
            _page(0x0A, 0, 12, {2: CONTROL_D_SENSE, 4: CONTROL_SWP}),
        ),
        PageDefinition(
            0x0A,
            CONTROL_EXTENSION_SUBPAGE,
            _page(0x0A, CONTROL_EXTENSION_SUBPAGE, 32, {}),
            _page(0x0A, CONTROL_EXTENSION_SUBPAGE, 32, {}),
        ),
        PageDefinition(0x1C, 0, _page(0x1C, 0, 12, {}), _page(0x1C, 0, 12, {})),
    ]


class ModePages:
    """The mode page set of one LU; thread-safe."""

    def __init__(self, definitions: list[PageDefinition]) -> None:
        self._definitions = {d.key: d for d in definitions}
        self._order = [d.key for d in definitions]
        self._lock = threading.Lock()
        self._current: dict[tuple[int, int], bytes] = {  # guarded by _lock
            d.key: d.default for d in definitions
        }
        self._derive()

    def _value(self, key: tuple[int, int], control: PageControl) -> bytes:
        definition = self._definitions[key]
        if control == PageControl.CHANGEABLE:
            return definition.changeable
        if control in (PageControl.DEFAULT, PageControl.SAVED):
            return definition.default
        with self._lock:
            return self._current[key]

    def sense(self, page: int, subpage: int, control: PageControl) -> bytes | None:
        """Pages for MODE SENSE, or None when the page/subpage is not supported."""
        if page == ALL_PAGES:
            keys = [k for k in self._order if subpage == ALL_SUBPAGES or k[1] == subpage]
            if subpage not in (0, ALL_SUBPAGES):
                return None
        elif subpage == ALL_SUBPAGES:
            keys = [k for k in self._order if k[0] == page]
        else:
            keys = [(page, subpage)] if (page, subpage) in self._definitions else []
        if not keys:
            return None
        return b"".join(self._value(key, control) for key in keys)

    def current(self, page: int, subpage: int = 0) -> bytes:
        return self._value((page, subpage), PageControl.CURRENT)

    def select(self, data: bytes | memoryview, base_offset: int) -> bool:
        """Apply the pages of a MODE SELECT parameter list (after header and block
        descriptors); `base_offset` locates `data` in the parameter list for field pointers.
        All pages are checked before any is applied. Returns True when a value changed."""
        updates: dict[tuple[int, int], bytes] = {}
        offset = 0
        data = bytes(data)
        while offset < len(data):
            start = offset
            if len(data) - offset < 2:
                raise invalid_field_in_parameter_list(base_offset + offset)
            page = data[offset] & 0x3F
            if data[offset] & 0x40:
                if len(data) - offset < 4:
                    raise invalid_field_in_parameter_list(base_offset + offset)
                subpage = data[offset + 1]
                length = 4 + int.from_bytes(data[offset + 2 : offset + 4], "big")
            else:
                subpage = 0
                length = 2 + data[offset + 1]
            definition = self._definitions.get((page, subpage))
            if definition is None:
                raise invalid_field_in_parameter_list(base_offset + start, 5)
            if length != len(definition.default):
                raise invalid_field_in_parameter_list(base_offset + start + 1)
            if offset + length > len(data):
                raise invalid_field_in_parameter_list(base_offset + start + 1)
            new = bytearray(data[offset : offset + length])
            new[0] &= 0x7F  # PS is reserved in MODE SELECT
            current = updates.get(definition.key) or self._value(definition.key, PageControl.CURRENT)
            for index in range(2, length):
                stray = (new[index] ^ current[index]) & ~definition.changeable[index] & 0xFF
                if stray:
                    raise invalid_field_in_parameter_list(
                        base_offset + start + index, stray.bit_length() - 1
                    )
            new[0:2] = current[0:2]
            updates[definition.key] = bytes(new)
            offset += length
        changed = False
        with self._lock:
            for key, value in updates.items():
                if self._current[key] != value:
                    self._current[key] = value
                    changed = True
            self._derive()
        return changed

    def reset(self) -> None:
        """Back to saved values (a logical unit reset, SPC-4 7.5.2)."""
        with self._lock:
            for key, definition in self._definitions.items():
                self._current[key] = definition.default
            self._derive()

    def _derive(self) -> None:
        """The behaviour switches other code reads on every command, kept as plain
        attributes (recomputed, under _lock, whenever a page changes)."""
        caching = self._current.get((PageCode.CACHING, 0))
        control = self._current.get((PageCode.CONTROL, 0))
        self.write_cache_enabled = bool(caching and caching[2] & CACHING_WCE)
        self.read_cache_disabled = bool(caching and caching[2] & CACHING_RCD)
        self.descriptor_sense = bool(control and control[2] & CONTROL_D_SENSE)
        self.software_write_protect = bool(control and control[4] & CONTROL_SWP)
