"""Data round trips through libiscsi itself where qemu-img cannot go: mutual CHAP together
with CRC32C header digests (qemu's iscsi driver never sends target credentials)."""

import hashlib
import os

import pytest

from tests.interop.conftest import MIB, MUTUAL_SECRET, MUTUAL_USER, TARGET_SECRET, TARGET_USER
from tests.interop.libiscsi_client import LibiscsiError, Session

CHUNK = MIB


def mutual_session(interop_target, target_secret=TARGET_SECRET, header_digest=True):
    unit = interop_target.units["mutual"]
    return Session(f"127.0.0.1:{interop_target.chap_port}", unit.iqn, user=MUTUAL_USER,
                   secret=MUTUAL_SECRET, target_user=TARGET_USER, target_secret=target_secret,
                   header_digest=header_digest)


def test_mutual_chap_and_header_digest_round_trip_is_byte_identical(interop_target):
    size = interop_target.units["mutual"].size_bytes
    data = os.urandom(size)
    with mutual_session(interop_target) as session:
        for offset in range(0, size, CHUNK):
            session.write16(offset // 512, data[offset:offset + CHUNK])
    with mutual_session(interop_target) as session:     # a new session reads it back
        digest = hashlib.sha256()
        for offset in range(0, size, CHUNK):
            digest.update(session.read16(offset // 512, CHUNK))
    assert digest.digest() == hashlib.sha256(data).digest()
    log = interop_target.log_text()
    assert "mutual" in log and "HeaderDigest=on" in log


def test_target_that_answers_with_the_wrong_secret_is_refused_by_libiscsi(interop_target):
    # The initiator checks the target's CHAP_R: a wrong target secret must fail the login.
    with pytest.raises(LibiscsiError, match="(?i)chap|auth"):
        mutual_session(interop_target, target_secret="not-the-secret")
