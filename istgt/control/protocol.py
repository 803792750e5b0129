"""istgt's UnitControl line protocol, both ends: framing, tokens, quoting (pure code).

A request is one line: a command word and arguments separated by spaces or tabs; double or
single quotes group, a backslash escapes the next character. A reply is zero or more data
lines that start with the command word, then one `OK <CMD>` or `ERR <message>` line. Every
line the server writes ends in CRLF; a reader accepts LF, CRLF or a lone CR.
"""

from __future__ import annotations

MAX_LINE = 4094          # longer lines are cut into pieces, as istgt does
BANNER_PREFIX = "iSCSI Target Controller version"


def split_line(line: str) -> list[str]:
    """Tokens of a request line (istgt's strsepq): quotes group, backslash escapes."""
    tokens: list[str] = []
    current: list[str] = []
    in_token = False
    quote = ""
    escaped = False
    for char in line:
        if escaped:
            current.append(char)
            escaped = False
            in_token = True
        elif char == "\\":
            escaped = True
            in_token = True
        elif quote:
            if char == quote:
                quote = ""
            else:
                current.append(char)
        elif char in "\"'":
            quote = char
            in_token = True
        elif char in " \t":
            if in_token:
                tokens.append("".join(current))
                current, in_token = [], False
        else:
            current.append(char)
            in_token = True
    if in_token:
        tokens.append("".join(current))
    return tokens


def quote(value: str) -> str:
    """One argument as istgtcontrol sends it: in double quotes, with `"`, `'` and `\\`
    escaped by a backslash."""
    escaped = "".join("\\" + c if c in "\"'\\" else c for c in value)
    return f'"{escaped}"'


def parse_request(line: str) -> tuple[str, list[str]]:
    """(COMMAND upper-cased, arguments); ("", []) for an empty line."""
    tokens = split_line(line.strip())
    if not tokens:
        return "", []
    return tokens[0].upper(), tokens[1:]


class LineBuffer:
    """Cuts received bytes into lines (LF, CRLF or a lone CR; at most MAX_LINE bytes)."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        lines: list[str] = []
        while True:
            cut = self._next_end()
            if cut is None:
                break
            end, skip = cut
            raw = bytes(self._pending[:end])
            del self._pending[:end + skip]
            lines.append(raw.decode("utf-8", "replace"))
        return lines

    def _next_end(self) -> tuple[int, int] | None:
        for index, byte in enumerate(self._pending):
            if index >= MAX_LINE:
                return index, 0
            if byte == 0x0A:
                return index, 1
            if byte == 0x0D:
                if index + 1 == len(self._pending):
                    return None          # a CR at the end: wait to see whether LF follows
                return index, 2 if self._pending[index + 1] == 0x0A else 1
        return None

    def flush(self) -> str | None:
        """What is left when the peer closed (a last line without terminator)."""
        if not self._pending:
            return None
        raw = bytes(self._pending).rstrip(b"\r")
        self._pending.clear()
        return raw.decode("utf-8", "replace")
