"""CHAP authenticator and initiator helper (RFC 7143 12.1.3, RFC 1994)."""

from __future__ import annotations

import base64
import hashlib
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istgt.chap import (
    ALGORITHMS,
    AuthError,
    ChapAuthenticator,
    chap_response,
    decode_binary,
    encode_base64,
    encode_hex,
)

USERS = {
    "alice": SimpleNamespace(
        user="alice",
        secret="alice-secret-12",
        mutual_user="target1",
        mutual_secret="target-secret-1",
    ),
    "bob": SimpleNamespace(
        user="bob", secret="bob-secret-123", mutual_user=None, mutual_secret=None
    ),
    "same": SimpleNamespace(
        user="same", secret="same-secret-1", mutual_user="t", mutual_secret="same-secret-1"
    ),
}
HASHLIB = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}


def lookup(user: str):
    return USERS.get(user)


def folding_lookup(user: str):
    """Like istgt's auth.conf lookup, which folds case (bug B23)."""
    return USERS.get(user.lower())


def independent_response(number: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.new(HASHLIB[number], bytes([identifier]) + secret + challenge).digest()


def challenge_of(answer: list[tuple[str, str]]) -> tuple[int, int, bytes]:
    keys = dict(answer)
    assert list(keys) == ["CHAP_A", "CHAP_I", "CHAP_C"]
    return int(keys["CHAP_A"]), int(keys["CHAP_I"]), decode_binary(keys["CHAP_C"])


def start(auth: ChapAuthenticator, offer: str = "5") -> tuple[int, int, bytes]:
    return challenge_of(auth.step({"CHAP_A": offer}))


def respond(auth, user="alice", secret=None, extra=None, encode=encode_hex, offer="5"):
    number, identifier, challenge = start(auth, offer)
    secret = USERS[user].secret if secret is None else secret
    response = independent_response(number, identifier, secret.encode(), challenge)
    keys = {"CHAP_N": user, "CHAP_R": encode(response)}
    keys.update(extra or {})
    return auth.step(keys), challenge


# -- algorithms ---------------------------------------------------------------------------------


def test_algorithm_numbers_are_the_iana_ones():
    assert {name: a.number for name, a in ALGORITHMS.items()} == {
        "MD5": 5,
        "SHA1": 6,
        "SHA-256": 7,
        "SHA3-256": 8,
    }


@pytest.mark.parametrize("number", [5, 6, 7, 8])
def test_chap_response_matches_hashlib(number):
    challenge = bytes(range(40))
    expected = independent_response(number, 0x2A, b"my-secret", challenge)
    assert chap_response(number, 0x2A, "my-secret", challenge) == expected
    assert chap_response(number, 0x2A, b"my-secret", challenge) == expected


def test_chap_response_known_vector_md5():
    # MD5(0x01 || "secret" || 0x00..0x0f), computed once and pinned.
    expected = hashlib.md5(b"\x01" + b"secret" + bytes(range(16))).hexdigest()
    assert chap_response("MD5", 1, "secret", bytes(range(16))).hex() == expected


def test_chap_response_rejects_bad_input():
    with pytest.raises(ValueError):
        chap_response(5, 256, "s", b"c")
    with pytest.raises(ValueError):
        chap_response(9, 1, "s", b"c")


@pytest.mark.parametrize("number", [5, 6, 7, 8])
def test_full_exchange_every_algorithm(number):
    auth = ChapAuthenticator(lookup, mutual_required=False)
    answer, challenge = respond(auth, offer=str(number))
    assert answer == [] and auth.complete and auth.user == "alice"
    assert auth.algorithm.number == number
    assert len(challenge) >= 16 and len(challenge) >= hashlib.new(HASHLIB[number]).digest_size


def test_algorithm_chosen_in_initiator_order():
    assert start(ChapAuthenticator(lookup, False), "7,5,8")[0] == 7
    assert start(ChapAuthenticator(lookup, False), "5,8")[0] == 5


def test_unknown_algorithms_skipped():
    assert start(ChapAuthenticator(lookup, False), "99,abc,6")[0] == 6


def test_algorithm_restricted_by_target():
    auth = ChapAuthenticator(lookup, False, algorithms=("MD5",))
    assert start(auth, "8,7,6,5")[0] == 5


@pytest.mark.parametrize("offer", ["7,8", "", "1,,5"])
def test_no_common_algorithm(offer):
    auth = ChapAuthenticator(lookup, False, algorithms=("MD5",))
    with pytest.raises(AuthError) as caught:
        auth.step({"CHAP_A": offer})
    assert caught.value.answer == [("CHAP_A", "Reject")]
    assert caught.value.status == 0x0201


def test_challenges_are_fresh():
    first = start(ChapAuthenticator(lookup, False))[2]
    second = start(ChapAuthenticator(lookup, False))[2]
    assert first != second


# -- one-way ------------------------------------------------------------------------------------


def test_base64_response_accepted():
    auth = ChapAuthenticator(lookup, False)
    answer, _ = respond(auth, encode=encode_base64)
    assert answer == [] and auth.complete


def test_wrong_secret():
    auth = ChapAuthenticator(lookup, False)
    with pytest.raises(AuthError, match="does not match"):
        respond(auth, secret="wrong")
    assert not auth.complete


def test_unknown_user():
    auth = ChapAuthenticator(lookup, False)
    start(auth)
    with pytest.raises(AuthError, match="not found"):
        auth.step({"CHAP_N": "mallory", "CHAP_R": "0x00"})


def test_user_name_is_case_sensitive_even_with_a_folding_lookup():
    auth = ChapAuthenticator(folding_lookup, False)
    number, identifier, challenge = start(auth)
    response = independent_response(number, identifier, USERS["alice"].secret.encode(), challenge)
    with pytest.raises(AuthError, match="not found"):
        auth.step({"CHAP_N": "ALICE", "CHAP_R": encode_hex(response)})


@pytest.mark.parametrize("bad", ["abcd", "0x", "0xgg", "0b***", ""])
def test_malformed_response(bad):
    auth = ChapAuthenticator(lookup, False)
    start(auth)
    with pytest.raises(AuthError, match="malformed CHAP_R"):
        auth.step({"CHAP_N": "alice", "CHAP_R": bad})


def test_truncated_response_fails():
    auth = ChapAuthenticator(lookup, False)
    number, identifier, challenge = start(auth)
    response = independent_response(number, identifier, b"alice-secret-12", challenge)
    with pytest.raises(AuthError):
        auth.step({"CHAP_N": "alice", "CHAP_R": encode_hex(response[:-1])})


# -- sequence -----------------------------------------------------------------------------------


def test_response_before_algorithm_is_sequence_error():
    with pytest.raises(AuthError, match="sequence"):
        ChapAuthenticator(lookup, False).step({"CHAP_N": "alice", "CHAP_R": "0x00"})


def test_algorithm_twice_is_sequence_error():
    auth = ChapAuthenticator(lookup, False)
    start(auth)
    with pytest.raises(AuthError, match="sequence"):
        auth.step({"CHAP_A": "5"})


def test_missing_response_is_sequence_error():
    auth = ChapAuthenticator(lookup, False)
    start(auth)
    with pytest.raises(AuthError, match="sequence"):
        auth.step({"CHAP_N": "alice"})


def test_empty_steps_wait():
    auth = ChapAuthenticator(lookup, False)
    assert auth.step({}) == []
    start(auth)
    assert auth.step({"AuthMethod": "CHAP"}) == []  # non-CHAP keys are ignored
    assert not auth.complete


def test_keys_after_completion_refused():
    auth = ChapAuthenticator(lookup, False)
    respond(auth)
    assert auth.step({}) == []
    with pytest.raises(AuthError):
        auth.step({"CHAP_A": "5"})


def test_failure_restarts_the_exchange():
    auth = ChapAuthenticator(lookup, False)
    with pytest.raises(AuthError):
        respond(auth, secret="wrong")
    answer, _ = respond(auth)
    assert answer == [] and auth.complete


# -- mutual -------------------------------------------------------------------------------------


def test_mutual_answer():
    auth = ChapAuthenticator(lookup, mutual_required=True)
    my_challenge = bytes(range(100, 132))
    answer, _ = respond(auth, extra={"CHAP_I": "77", "CHAP_C": encode_hex(my_challenge)})
    keys = dict(answer)
    assert keys["CHAP_N"] == "target1"
    expected = independent_response(5, 77, b"target-secret-1", my_challenge)
    assert decode_binary(keys["CHAP_R"]) == expected
    assert auth.complete and auth.mutual


def test_mutual_with_base64_challenge_and_sha256():
    auth = ChapAuthenticator(lookup, mutual_required=True)
    my_challenge = b"\x01" * 64
    extra = {"CHAP_I": "0x10", "CHAP_C": "0b" + base64.b64encode(my_challenge).decode()}
    answer, _ = respond(auth, extra=extra, offer="7")
    expected = independent_response(7, 16, b"target-secret-1", my_challenge)
    assert decode_binary(dict(answer)["CHAP_R"]) == expected


def test_mutual_required_but_not_offered():
    with pytest.raises(AuthError, match="mutual CHAP required"):
        respond(ChapAuthenticator(lookup, mutual_required=True))


def test_mutual_offered_without_credentials():
    with pytest.raises(AuthError, match="no mutual CHAP credentials"):
        respond(
            ChapAuthenticator(lookup, False), user="bob", extra={"CHAP_I": "1", "CHAP_C": "0x0102"}
        )


def test_mutual_secret_equal_to_secret_refused():
    with pytest.raises(AuthError, match="equals"):
        respond(
            ChapAuthenticator(lookup, False), user="same", extra={"CHAP_I": "1", "CHAP_C": "0x0102"}
        )


def test_reflected_challenge_refused():
    auth = ChapAuthenticator(lookup, False)
    number, identifier, challenge = start(auth)
    response = independent_response(number, identifier, b"alice-secret-12", challenge)
    with pytest.raises(AuthError, match="reflection"):
        auth.step(
            {
                "CHAP_N": "alice",
                "CHAP_R": encode_hex(response),
                "CHAP_I": str(identifier),
                "CHAP_C": encode_hex(challenge),
            }
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"CHAP_I": "256", "CHAP_C": "0x0102"}, "outside 0..255"),
        ({"CHAP_I": "-1", "CHAP_C": "0x0102"}, "malformed CHAP_I"),
        ({"CHAP_I": "1", "CHAP_C": "0x" + "ab" * 1025}, "outside 1..1024"),
        ({"CHAP_I": "1", "CHAP_C": "0xzz"}, "malformed CHAP_C"),
        ({"CHAP_I": "1"}, "both"),
        ({"CHAP_C": "0x0102"}, "both"),
    ],
)
def test_bad_mutual_challenge(extra, message):
    with pytest.raises(AuthError, match=message):
        respond(ChapAuthenticator(lookup, False), extra=extra)


def test_mutual_challenge_of_1024_bytes_accepted():
    answer, _ = respond(
        ChapAuthenticator(lookup, False), extra={"CHAP_I": "1", "CHAP_C": "0x" + "ab" * 1024}
    )
    assert dict(answer)["CHAP_N"] == "target1"


def test_construction_needs_an_algorithm():
    with pytest.raises(ValueError):
        ChapAuthenticator(lookup, False, algorithms=())
    with pytest.raises(ValueError):
        ChapAuthenticator(lookup, False, algorithms=("SHA-512",))


@given(
    number=st.sampled_from([5, 6, 7, 8]),
    secret=st.text(min_size=1, max_size=40),
    flip=st.integers(0, 255),
)
def test_only_the_exact_response_authenticates(number, secret, flip):
    users = {"u": SimpleNamespace(user="u", secret=secret, mutual_user=None, mutual_secret=None)}
    auth = ChapAuthenticator(users.get, False)
    _, identifier, challenge = challenge_of(auth.step({"CHAP_A": str(number)}))
    good = independent_response(number, identifier, secret.encode(), challenge)
    bad = bytearray(good)
    bad[flip % len(bad)] ^= 1 << (flip % 8)
    with pytest.raises(AuthError):
        auth.step({"CHAP_N": "u", "CHAP_R": encode_hex(bytes(bad))})
    _, identifier, challenge = challenge_of(auth.step({"CHAP_A": str(number)}))
    good = independent_response(number, identifier, secret.encode(), challenge)
    assert auth.step({"CHAP_N": "u", "CHAP_R": encode_base64(good)}) == []
    assert auth.complete
