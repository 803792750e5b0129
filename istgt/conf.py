"""Lexer for istgt's configuration grammar (istgt.conf, auth.conf, istgtcontrol.conf).

The grammar is the C istgt one (istgt_conf.c), with two deliberate differences:
syntax errors are fatal (C prints them and carries on, so keys silently land in the
wrong section), and a backslash continuation also works when the file has CRLF line
endings.  This module knows nothing about what the keys mean: that is config.py.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ConfigError",
    "ConfFile",
    "Item",
    "Section",
    "SectionKind",
    "parse_conf",
    "read_conf",
    "split_tokens",
]

_DELIMITERS = " \t"
_SECTION_NUMBER = re.compile(r"\d+")


class ConfigError(Exception):
    """A configuration problem, located as precisely as is known.

    ``str()`` is ``FILE:LINE: [Section] Key: message``; the parts that do not apply
    are left out.
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        line: int | None = None,
        section: str | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.section = section
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        location = ""
        if self.path is not None:
            location = self.path if self.line is None else f"{self.path}:{self.line}"
            location += ": "
        elif self.line is not None:
            location = f"line {self.line}: "
        where = f"[{self.section}] " if self.section else ""
        what = f"{self.key}: " if self.key else ""
        return f"{location}{where}{what}{self.message}"


class SectionKind(enum.Enum):
    """Section type, from a case-insensitive prefix match of the section name."""

    GLOBAL = "Global"
    UNIT_CONTROL = "UnitControl"
    PORTAL_GROUP = "PortalGroup"
    INITIATOR_GROUP = "InitiatorGroup"
    LOGICAL_UNIT = "LogicalUnit"
    AUTH_GROUP = "AuthGroup"
    NONE = ""  # unknown section: kept so config.py can warn about it

    @classmethod
    def of(cls, name: str) -> SectionKind:
        folded = name.casefold()
        for kind in cls:
            if kind is not cls.NONE and folded.startswith(kind.value.casefold()):
                return kind
        return cls.NONE


@dataclass(frozen=True)
class Item:
    """One key line: ``key`` as written, its values, and the first physical line."""

    key: str
    values: tuple[str, ...]
    line: int

    @property
    def value(self) -> str | None:
        """The first value, or None when the key has none (C reads that as unset)."""
        return self.values[0] if self.values else None


@dataclass(frozen=True)
class Section:
    name: str
    kind: SectionKind
    number: int  # from the first run of digits in the name; 0 when there is none
    line: int  # line of the first header with this name
    items: tuple[Item, ...]

    def first(self, key: str) -> Item | None:
        """First occurrence of ``key`` (case-insensitive), as C's single-value lookups."""
        folded = key.casefold()
        for item in self.items:
            if item.key.casefold() == folded:
                return item
        return None

    def all(self, key: str) -> tuple[Item, ...]:
        folded = key.casefold()
        return tuple(item for item in self.items if item.key.casefold() == folded)


@dataclass(frozen=True)
class ConfFile:
    path: str
    sections: tuple[Section, ...]

    def find(self, name: str) -> Section | None:
        """The section whose whole name equals ``name`` case-insensitively."""
        folded = name.casefold()
        for section in self.sections:
            if section.name.casefold() == folded:
                return section
        return None

    def of_kind(self, kind: SectionKind) -> tuple[Section, ...]:
        return tuple(section for section in self.sections if section.kind is kind)


def split_tokens(text: str) -> list[str]:
    """Split on runs of space/TAB with istgt's quoting rules (strsepq).

    ``"..."`` and ``'...'`` group text and may sit mid-token (``a"b c"d`` is ``ab cd``).
    A backslash escapes the next character outside quotes and inside double quotes;
    inside single quotes it is literal.  ``""`` is an empty token.  An unterminated
    quote runs to the end of the text.
    """
    tokens: list[str] = []
    position = 0
    length = len(text)
    while True:
        while position < length and text[position] in _DELIMITERS:
            position += 1
        if position >= length:
            return tokens
        chars: list[str] = []
        quote: str | None = None
        while position < length:
            char = text[position]
            if quote is None and char in _DELIMITERS:
                break
            position += 1
            if char == "\\" and quote != "'":
                if position < length:
                    chars.append(text[position])
                    position += 1
                else:
                    chars.append(char)
            elif quote is None and char in "\"'":
                quote = char
            elif char == quote:
                quote = None
            else:
                chars.append(char)
        tokens.append("".join(chars))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash-continued physical lines; return (first line number, text).

    The check is made on the line without its end of line, so CRLF files continue
    too (C istgt only continues on backslash + LF, bug B25).  The continued line is
    appended verbatim, leading blanks included, as in C.
    """
    physical = text.split("\n")
    if physical and physical[-1] == "":
        physical.pop()  # the newline that ends the last line
    result: list[tuple[int, str]] = []
    index = 0
    while index < len(physical):
        first_line = index + 1
        joined = ""
        while True:
            line = physical[index].removesuffix("\r")
            index += 1
            stripped = line.lstrip(" \t")
            # C requires something before the backslash: a lone "\" does not continue.
            if len(stripped) >= 2 and stripped.endswith("\\"):
                joined += line[:-1]
                if index < len(physical):
                    continue
            else:
                joined += line
            break
        result.append((first_line, joined))
    return result


def _parse_header(text: str, path: str, line: int) -> str:
    """Return the section name of a ``[name]`` line; anything after ``]`` is an error."""
    chars: list[str] = []
    quote: str | None = None
    position = 1
    closed = False
    while position < len(text):
        char = text[position]
        position += 1
        if char == "\\" and quote != "'" and position < len(text):
            chars.append(text[position])
            position += 1
        elif quote is None and char in "\"'":
            quote = char
        elif char == quote:
            quote = None
        elif quote is None and char == "]":
            closed = True
            break
        else:
            chars.append(char)
    if not closed:
        raise ConfigError(f"broken section header {text!r}: missing ']'", path, line)
    trailing = text[position:].strip()
    if trailing:
        raise ConfigError(
            f"broken section header {text!r}: unexpected text {trailing!r} after ']'",
            path,
            line,
        )
    name = "".join(chars).strip()
    if not name:
        raise ConfigError("broken section header: empty section name", path, line)
    return name


def parse_conf(text: str, path: str = "<config>") -> ConfFile:
    """Lex istgt configuration text.  Raises ConfigError naming file and line."""
    order: list[str] = []  # folded names in first-seen order
    headers: dict[str, tuple[str, int]] = {}  # folded name -> (name, first line)
    items: dict[str, list[Item]] = {}
    current: str | None = None
    for line_number, raw in _logical_lines(text):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = _parse_header(line, path, line_number)
            folded = name.casefold()
            if folded not in headers:  # a repeated header reopens the section
                headers[folded] = (name, line_number)
                items[folded] = []
                order.append(folded)
            current = folded
            continue
        tokens = split_tokens(line)
        if not tokens or not tokens[0]:
            raise ConfigError(f"broken key line {line!r}", path, line_number)
        if current is None:
            raise ConfigError(
                "key outside any section (a [Section] header must come first)",
                path,
                line_number,
                key=tokens[0],
            )
        items[current].append(Item(tokens[0], tuple(tokens[1:]), line_number))
    sections = []
    for folded in order:
        name, first_line = headers[folded]
        digits = _SECTION_NUMBER.search(name)
        sections.append(
            Section(
                name=name,
                kind=SectionKind.of(name),
                number=int(digits.group()) if digits else 0,
                line=first_line,
                items=tuple(items[folded]),
            )
        )
    return ConfFile(path=path, sections=tuple(sections))


def read_conf(path: str | Path) -> ConfFile:
    """Read and lex a configuration file.  Bytes that are not UTF-8 pass through."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror or error}", name) from error
    return parse_conf(data.decode("utf-8", errors="surrogateescape"), name)
