"""CHAP on the UnitControl channel (istgt's AUTH command), both ends.

    C: AUTH CHAP_A 5
    S: AUTH CHAP_IC <id> 0x<challenge>
    C: AUTH CHAP_NR <user> 0x<response> [<mutual id> 0x<mutual challenge>]
    S: AUTH CHAP_NR "<mutual user>" 0x<mutual response>      (only when asked)
    S: OK AUTH

MD5 only, as istgt and its istgtcontrol speak it. Every error returns to the start.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from typing import Any

from istgt.chap import chap_response

MD5 = 5
CHALLENGE_BYTES = 1024     # what istgt sends; the client's mutual challenge too
MAX_CHALLENGE_BYTES = 1024


class ControlAuthError(Exception):
    """The `ERR ...` line to answer."""


def _hex(value: str, what: str) -> bytes:
    if not value[:2].lower() == "0x":
        raise ControlAuthError(f"{what} format error")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError:
        raise ControlAuthError(f"{what} format error") from None
    if not raw:
        raise ControlAuthError(f"{what} format error")
    return raw


class ServerChap:
    """The target's side of one control connection. `lookup(user)` gives the auth.conf
    entry (user, secret, mutual_user, mutual_secret) or None."""

    def __init__(self, lookup: Callable[[str], Any], mutual_required: bool) -> None:
        self._lookup = lookup
        self._mutual_required = mutual_required
        self._challenge: tuple[int, bytes] | None = None
        self.authenticated = False

    def step(self, args: list[str]) -> list[str]:
        """The data lines for one AUTH command (the caller adds `OK AUTH` once
        `authenticated`); raises ControlAuthError with the message of the ERR line."""
        try:
            return self._step(args)
        except ControlAuthError:
            self._challenge = None
            raise

    def _step(self, args: list[str]) -> list[str]:
        if self.authenticated or not args:
            raise ControlAuthError("CHAP sequence error")
        if args[0].upper() == "CHAP_A":
            if self._challenge is not None:
                raise ControlAuthError("CHAP sequence error")
            offered = args[1:] or [""]
            if str(MD5) not in offered[0].split(","):
                raise ControlAuthError("invalid algorithm")
            identifier = secrets.randbelow(256)
            challenge = secrets.token_bytes(CHALLENGE_BYTES)
            self._challenge = (identifier, challenge)
            return [f"AUTH CHAP_IC {identifier} 0x{challenge.hex().upper()}"]
        if args[0].upper() == "CHAP_NR":
            return self._verify(args[1:])
        raise ControlAuthError("CHAP sequence error")

    def _verify(self, args: list[str]) -> list[str]:
        if self._challenge is None:
            raise ControlAuthError("CHAP sequence error")
        if len(args) < 2:
            raise ControlAuthError("no response")
        user, response = args[0], _hex(args[1], "response")
        entry = self._lookup(user)
        identifier, challenge = self._challenge
        self._challenge = None
        if entry is None or not entry.secret or not hmac.compare_digest(
                response, chap_response(MD5, identifier, entry.secret, challenge)):
            raise ControlAuthError("auth user or secret is missing")
        lines: list[str] = []
        if len(args) >= 4:
            try:
                mutual_id = int(args[2], 10)
            except ValueError:
                raise ControlAuthError("invalid parameters") from None
            mutual_challenge = _hex(args[3], "challenge")
            if not 0 <= mutual_id <= 255 or len(mutual_challenge) > MAX_CHALLENGE_BYTES:
                raise ControlAuthError("invalid parameters")
            if not entry.mutual_user or not entry.mutual_secret:
                raise ControlAuthError("auth user or secret is missing")
            answer = chap_response(MD5, mutual_id, entry.mutual_secret, mutual_challenge)
            lines.append(f'AUTH CHAP_NR "{entry.mutual_user}" 0x{answer.hex().upper()}')
        elif self._mutual_required:
            raise ControlAuthError("CHAP sequence error")
        self.authenticated = True
        return lines


def client_response(challenge_line_args: list[str], user: str, secret: str,
                    mutual: bool) -> tuple[str, tuple[int, bytes] | None]:
    """From `AUTH CHAP_IC <id> 0x<challenge>` (its arguments after AUTH): the CHAP_NR
    request line and, when `mutual`, the (id, challenge) the server must answer."""
    if len(challenge_line_args) < 3 or challenge_line_args[0].upper() != "CHAP_IC":
        raise ControlAuthError("CHAP sequence error")
    identifier = int(challenge_line_args[1], 10)
    challenge = _hex(challenge_line_args[2], "challenge")
    response = chap_response(MD5, identifier, secret, challenge)
    line = f"AUTH CHAP_NR {user} 0x{response.hex()}"
    if not mutual:
        return line, None
    mutual_id = secrets.randbelow(256)
    mutual_challenge = secrets.token_bytes(CHALLENGE_BYTES)
    return f"{line} {mutual_id} 0x{mutual_challenge.hex()}", (mutual_id, mutual_challenge)


def check_mutual_answer(args: list[str], expected: tuple[int, bytes], secret: str) -> bool:
    """Whether `AUTH CHAP_NR "<user>" 0x<answer>` answers our mutual challenge."""
    if len(args) < 3 or args[0].upper() != "CHAP_NR":
        return False
    try:
        answer = _hex(args[2], "response")
    except ControlAuthError:
        return False
    identifier, challenge = expected
    return hmac.compare_digest(answer, chap_response(MD5, identifier, secret, challenge))
