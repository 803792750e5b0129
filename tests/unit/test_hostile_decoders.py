"""Property tests: the decoders that read what a peer sends never raise anything but their
own protocol error, whatever the bytes (issue 7: login keys, CHAP, PDU headers)."""

from hypothesis import given, settings, strategies as st

from istgt.chap import AuthError, ChapAuthenticator
from istgt.config import AuthEntry
from istgt.iscsi import params, pdu

KEY = st.from_regex(r"[A-Za-z][A-Za-z0-9.\-+@_#]{0,19}", fullmatch=True)   # RFC 7143 6.1
VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@given(st.binary(max_size=512))
@settings(max_examples=400)
def test_text_keys_parse_or_raise_text_error(data):
    try:
        pairs = params.parse_text(data)
    except params.TextError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in pairs)


@given(st.lists(st.tuples(KEY, VALUE), max_size=8, unique_by=lambda kv: kv[0]))
def test_text_keys_round_trip(pairs):
    assert params.parse_text(params.encode_text(pairs)) == pairs


def lookup(user):
    return AuthEntry("alice", "a-secret-of-16b!", "target", "other-secret-16b")


CHAP_KEYS = st.dictionaries(
    st.sampled_from(["CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "CHAP_X"]),
    st.one_of(VALUE, st.from_regex(r"0x[0-9a-fA-F]{0,80}", fullmatch=True),
              st.from_regex(r"0b[A-Za-z0-9+/=]{0,60}", fullmatch=True),
              st.sampled_from(["5", "6", "7", "8", "5,6,7,8", "", "-1", "256"])),
    max_size=5)


@given(st.lists(CHAP_KEYS, min_size=1, max_size=4), st.booleans())
@settings(max_examples=300)
def test_chap_exchange_answers_or_raises_auth_error(steps, mutual):
    auth = ChapAuthenticator(lookup, mutual_required=mutual)
    for keys in steps:
        try:
            answer = auth.step(keys)
        except AuthError:
            return
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in answer)
    assert not auth.complete or auth.user == "alice"   # never complete for anyone else


@given(st.binary(min_size=48, max_size=48), st.binary(max_size=64))
@settings(max_examples=400)
def test_any_header_decodes_without_raising(bhs, data):
    p = pdu.Pdu(bhs, b"", data)
    for name in ("opcode", "data_length", "itt", "ttt", "cmdsn", "exp_statsn", "final",
                 "immediate", "lun_field"):
        getattr(p, name)
    pdu.decode_lun(int.from_bytes(bhs[8:16], "big"))


# --- the wire codec: our encoders read back by the test initiator's independent decoder ----

from tests.functional.initiator import Pdu as PeerPdu   # noqa: E402

U32 = st.integers(0, 0xFFFFFFFF)


@given(U32, st.integers(0, 0xFF), st.binary(max_size=252), st.sampled_from([0, 0x02, 0x04]), U32,
       U32)
def test_scsi_response_round_trips(itt, status, sense, residual_flags, residual, exp_data_sn):
    r = pdu.scsi_response(itt, status, sense, residual_flags, residual, exp_data_sn)
    peer = PeerPdu(bytes(r.bhs), b"", bytes(r.data))
    assert (peer.itt, peer.status, peer.residual, peer.exp_data_sn) == (itt, status, residual,
                                                                          exp_data_sn)
    assert (peer.overflow, peer.underflow) == (residual_flags == 0x04, residual_flags == 0x02)
    assert int.from_bytes(peer.bhs[5:8], "big") == len(r.data)
    if sense:
        assert peer.data[:2] == len(sense).to_bytes(2, "big") and peer.data[2:] == sense


@given(U32, st.integers(0, (1 << 64) - 1), U32, U32, U32, st.integers(1, (1 << 24) - 1))
def test_r2t_round_trips(itt, lun_field, ttt, r2t_sn, offset, length):
    peer = PeerPdu(bytes(pdu.r2t(itt, lun_field, ttt, r2t_sn, offset, length).bhs))
    assert (peer.itt, peer.ttt, peer.r2t_sn, peer.buffer_offset, peer.desired_length) == (
        itt, ttt, r2t_sn, offset, length)
    assert int.from_bytes(peer.bhs[8:16], "big") == lun_field


@given(U32, st.binary(max_size=600), U32, U32, st.booleans())
def test_data_in_round_trips(itt, data, data_sn, offset, final):
    r = pdu.data_in(itt, 0, data, data_sn, offset, final)
    peer = PeerPdu(bytes(r.bhs), b"", bytes(r.data))
    assert (peer.itt, peer.data_sn, peer.buffer_offset, peer.final) == (itt, data_sn, offset,
                                                                         final)
    assert int.from_bytes(peer.bhs[5:8], "big") == len(data) and peer.data == data


# --- the config reader: a mutated real config loads or names file, line and key ------------

import pathlib  # noqa: E402
import tempfile  # noqa: E402

from istgt.conf import ConfigError  # noqa: E402
from istgt.config import load_config  # noqa: E402

SAMPLE = (pathlib.Path(__file__).resolve().parents[1] / "data" / "config-corpus"
          / "02-debian-large-sample" / "istgt.conf").read_text()
SAMPLE_LINES = SAMPLE.splitlines()
HOSTILE_WORDS = st.sampled_from([
    "", "0", "-1", "99999999999999999999999", "0x", "Yes", "No", "Auto", "[", "]", "\"", "\\",
    "LUN0", "Storage", "AuthGroup0", "AuthGroup99999999999", "PortalGroup1", "1GB", "9EB",
    "127.0.0.1:0", "[::1]:3260", "ALL", "\x00", "é", "Mapping", "Section", "[Global]",
])


@given(st.lists(st.tuples(st.integers(0, len(SAMPLE_LINES) - 1),
                          st.lists(HOSTILE_WORDS, min_size=1, max_size=3),
                          st.sampled_from(["replace", "append", "insert"])),
                min_size=1, max_size=4))
@settings(max_examples=200, deadline=None)
def test_a_mutated_config_loads_or_names_file_and_line(edits):
    lines = list(SAMPLE_LINES)
    for index, words, how in edits:
        text = " ".join(words)
        if how == "replace":
            lines[index] = text
        elif how == "append":
            lines[index] += " " + text
        else:
            lines.insert(index, text)
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "istgt.conf"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.path == str(path) and str(exc).startswith(f"{path}:")
            assert exc.line is None or 1 <= exc.line <= len(lines) + 1
