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
