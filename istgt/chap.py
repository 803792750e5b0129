"""CHAP for iSCSI login (RFC 7143 12.1.3, RFC 1994): the target's authenticator and the
initiator's response helper (used by the test initiator and the istgtcontrol client).

Exchange, as the target sees it:

1. Initiator: ``CHAP_A=<a1,a2,...>`` (algorithms, in its order of preference).
   Target: ``CHAP_A=<a> CHAP_I=<identifier> CHAP_C=<challenge>``, where ``a`` is the first of the
   initiator's values this target supports. No common algorithm: ``AuthError`` whose ``answer``
   holds ``CHAP_A=Reject`` for the failure response.
2. Initiator: ``CHAP_N=<user> CHAP_R=<H(I || secret || C)>``, plus ``CHAP_I`` and ``CHAP_C``
   when it wants to authenticate the target (mutual CHAP).
   Target, mutual only: ``CHAP_N=<mutual user> CHAP_R=<H(I' || mutual secret || C')>``.

Algorithm numbers are the IANA PPP CHAP ones, as in LIO and open-iscsi: MD5=5, SHA1=6,
SHA-256=7, SHA3-256=8. The challenge is ``secrets`` randomness as long as the digest (at least 16
bytes); the identifier is a random byte.

Security rules beyond istgt (bug B23): the user name is matched exactly (RFC 1994 names are
not case-folded), the response is compared in constant time, an initiator challenge equal to
ours is refused (reflection attack), its length must be 1..1024 bytes and its identifier
0..255, and a mutual secret equal to the initiator's secret is refused (RFC 7143 9.2.1: a
secret must not serve both directions). Keys out of order are an ``AuthError``. Every failure
is an ``AuthError``; the login maps it to status 0x0201 (authentication failure).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping, Sequence

from istgt.iscsi.params import (
    REJECT,
    decode_binary,
    encode_base64,
    encode_hex,
    parse_list,
    parse_number,
)

MAX_CHALLENGE_LENGTH = 1024  # RFC 7143 12.1.3 (binary length, not its encoding)
MIN_CHALLENGE_LENGTH = 16
MAX_NAME_LENGTH = 255
STATUS_AUTH_FAILURE = 0x0201

__all__ = (
    "ALGORITHMS",
    "AuthError",
    "ChapAlgorithm",
    "ChapAuthenticator",
    "chap_response",
    "decode_binary",
    "encode_base64",
    "encode_hex",
)


@dataclass(frozen=True)
class ChapAlgorithm:
    name: str  # how configuration and logs spell it
    number: int  # CHAP_A value
    hashlib_name: str

    @property
    def digest_size(self) -> int:
        return hashlib.new(self.hashlib_name).digest_size


ALGORITHMS: dict[str, ChapAlgorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        ChapAlgorithm("MD5", 5, "md5"),
        ChapAlgorithm("SHA1", 6, "sha1"),
        ChapAlgorithm("SHA-256", 7, "sha256"),
        ChapAlgorithm("SHA3-256", 8, "sha3_256"),
    )
}
_BY_NUMBER = {algorithm.number: algorithm for algorithm in ALGORITHMS.values()}


class AuthError(Exception):
    """CHAP failed. ``str()`` is for the log; ``answer`` are keys for the failure response."""

    status = STATUS_AUTH_FAILURE

    def __init__(self, message: str, answer: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.answer = list(answer)


def _algorithm(algorithm: ChapAlgorithm | int | str) -> ChapAlgorithm:
    if isinstance(algorithm, ChapAlgorithm):
        return algorithm
    found = _BY_NUMBER.get(algorithm) if isinstance(algorithm, int) else ALGORITHMS.get(algorithm)
    if found is None:
        raise ValueError(f"unknown CHAP algorithm {algorithm!r}")
    return found


def chap_response(
    algorithm: ChapAlgorithm | int | str,
    identifier: int,
    secret: bytes | str,
    challenge: bytes,
) -> bytes:
    """H(identifier || secret || challenge) (RFC 1994 4.1); str secrets are UTF-8."""
    if not 0 <= identifier <= 255:
        raise ValueError(f"CHAP identifier {identifier} outside 0..255")
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    digest = hashlib.new(_algorithm(algorithm).hashlib_name)
    digest.update(bytes((identifier,)))
    digest.update(secret)
    digest.update(challenge)
    return digest.digest()


class _State(Enum):
    WAIT_ALGORITHM = "waiting for CHAP_A"
    WAIT_RESPONSE = "waiting for CHAP_N and CHAP_R"
    COMPLETE = "complete"


class ChapAuthenticator:
    """Target side of one CHAP exchange (one connection's security stage).

    ``lookup(user)`` returns an object with ``user``, ``secret``, ``mutual_user`` and
    ``mutual_secret`` (istgt.config.AuthEntry), or None.
    """

    def __init__(
        self,
        lookup: Callable[[str], Any],
        mutual_required: bool,
        algorithms: Sequence[str] = ("SHA3-256", "SHA-256", "SHA1", "MD5"),
    ) -> None:
        self._lookup = lookup
        self._mutual_required = mutual_required
        self._supported = {_algorithm(name).number for name in algorithms}
        if not self._supported:
            raise ValueError("no CHAP algorithm allowed")
        self._state = _State.WAIT_ALGORITHM
        self._algorithm: ChapAlgorithm | None = None
        self._identifier = 0
        self._challenge = b""
        self.user: str | None = None  # the authenticated CHAP_N
        self.mutual = False  # True when the target also authenticated itself

    @property
    def complete(self) -> bool:
        return self._state is _State.COMPLETE

    @property
    def algorithm(self) -> ChapAlgorithm | None:
        return self._algorithm

    def step(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """Consume the CHAP keys of one Login Request; return the keys for the response."""
        chap_keys = {key: value for key, value in keys.items() if key.startswith("CHAP_")}
        try:
            if self._state is _State.WAIT_ALGORITHM:
                return self._choose_algorithm(chap_keys)
            if self._state is _State.WAIT_RESPONSE:
                return self._verify(chap_keys)
            if chap_keys:
                raise AuthError(f"CHAP keys after completion: {sorted(chap_keys)}")
            return []
        except AuthError:
            self._state = _State.WAIT_ALGORITHM
            raise

    # -- step 1 -------------------------------------------------------------------------------

    def _choose_algorithm(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if not keys:
            return []  # e.g. AuthMethod alone: the initiator sends CHAP_A next
        if set(keys) != {"CHAP_A"}:
            raise AuthError(f"CHAP sequence error: expected CHAP_A, got {sorted(keys)}")
        algorithm = self._pick(keys["CHAP_A"])
        self._algorithm = algorithm
        self._identifier = secrets.randbelow(256)
        length = max(MIN_CHALLENGE_LENGTH, algorithm.digest_size)
        self._challenge = secrets.token_bytes(length)
        self._state = _State.WAIT_RESPONSE
        return [
            ("CHAP_A", str(algorithm.number)),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", encode_hex(self._challenge)),
        ]

    def _pick(self, offered_text: str) -> ChapAlgorithm:
        try:
            offered = parse_list(offered_text)
        except ValueError:
            raise AuthError(f"malformed CHAP_A {offered_text[:64]!r}", [("CHAP_A", REJECT)])
        for item in offered:  # the initiator's order of preference; unknown items skipped
            try:
                number = parse_number(item)
            except ValueError:
                continue
            if number in self._supported:
                return _BY_NUMBER[number]
        raise AuthError(
            f"no supported CHAP algorithm in CHAP_A={offered_text[:64]}", [("CHAP_A", REJECT)]
        )

    # -- step 2 -------------------------------------------------------------------------------

    def _verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if not keys:
            return []
        if "CHAP_A" in keys:
            raise AuthError("CHAP sequence error: CHAP_A repeated")
        if "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise AuthError(f"CHAP sequence error: expected CHAP_N and CHAP_R, got {sorted(keys)}")
        user = keys["CHAP_N"]
        entry = self._entry_for(user)
        self._check_response(keys["CHAP_R"], entry.secret, user)
        answer = self._mutual_answer(keys, entry)
        self.user = user
        self._state = _State.COMPLETE
        return answer

    def _entry_for(self, user: str) -> Any:
        if not user or len(user.encode("utf-8")) > MAX_NAME_LENGTH:
            raise AuthError("CHAP_N empty or longer than 255 bytes")
        entry = self._lookup(user)
        if entry is None or entry.user != user:  # exact match, whatever lookup folds
            raise AuthError(f"CHAP user {user!r} not found")
        if not entry.secret:
            raise AuthError(f"CHAP user {user!r} has no secret")
        return entry

    def _check_response(self, text: str, secret: str, user: str) -> None:
        assert self._algorithm is not None
        try:
            received = decode_binary(text)
        except ValueError as error:
            raise AuthError(f"malformed CHAP_R from {user!r}: {error}") from None
        expected = chap_response(self._algorithm, self._identifier, secret, self._challenge)
        if not hmac.compare_digest(received, expected):
            raise AuthError(f"CHAP response of {user!r} does not match")

    def _mutual_answer(self, keys: dict[str, str], entry: Any) -> list[tuple[str, str]]:
        has_identifier, has_challenge = "CHAP_I" in keys, "CHAP_C" in keys
        if not has_identifier and not has_challenge:
            if self._mutual_required:
                raise AuthError("mutual CHAP required but the initiator sent no CHAP_I/CHAP_C")
            return []
        if has_identifier != has_challenge:
            raise AuthError("mutual CHAP needs both CHAP_I and CHAP_C")
        identifier = self._mutual_identifier(keys["CHAP_I"])
        challenge = self._mutual_challenge(keys["CHAP_C"])
        if not entry.mutual_user or not entry.mutual_secret:
            raise AuthError(f"no mutual CHAP credentials configured for {entry.user!r}")
        if entry.mutual_secret == entry.secret:
            raise AuthError(f"mutual secret of {entry.user!r} equals its secret; refused")
        assert self._algorithm is not None
        response = chap_response(self._algorithm, identifier, entry.mutual_secret, challenge)
        self.mutual = True
        return [("CHAP_N", entry.mutual_user), ("CHAP_R", encode_hex(response))]

    @staticmethod
    def _mutual_identifier(text: str) -> int:
        try:
            identifier = parse_number(text)
        except ValueError:
            raise AuthError(f"malformed CHAP_I {text[:64]!r}") from None
        if not 0 <= identifier <= 255:
            raise AuthError(f"CHAP_I {identifier} outside 0..255")
        return identifier

    def _mutual_challenge(self, text: str) -> bytes:
        try:
            challenge = decode_binary(text)
        except ValueError as error:
            raise AuthError(f"malformed CHAP_C: {error}") from None
        if not 1 <= len(challenge) <= MAX_CHALLENGE_LENGTH:
            raise AuthError(f"CHAP_C of {len(challenge)} bytes outside 1..{MAX_CHALLENGE_LENGTH}")
        if hmac.compare_digest(challenge, self._challenge):
            raise AuthError("CHAP_C equals the target's challenge (reflection attack)")
        return challenge
