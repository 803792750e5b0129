"""Text codec and negotiation rules of istgt.iscsi.params (RFC 7143 sections 6 and 13)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istgt.config import IscsiParams
from istgt.iscsi.params import (
    IRRELEVANT,
    NOT_UNDERSTOOD,
    REJECT,
    STATUS_INITIATOR_ERROR,
    STATUS_MISSING_PARAMETER,
    NegotiationError,
    Negotiator,
    OperationalValues,
    Phase,
    SessionType,
    TextError,
    decode_binary,
    encode_base64,
    encode_hex,
    encode_text,
    format_boolean,
    is_valid_iscsi_name,
    parse_boolean,
    parse_list,
    parse_number,
    parse_text,
    read_login_identity,
)


def Limits(**overrides) -> IscsiParams:
    """The target's configured values; the tests' default receive limit is 256 KiB."""
    return IscsiParams(**{"max_recv_data_segment_length": 262144, **overrides})


OP = Phase.OPERATIONAL


def negotiator(**kwargs) -> Negotiator:
    limits = kwargs.pop("limits", Limits())
    return Negotiator(limits, **kwargs)


def answer(key: str, value: str, **kwargs) -> str | None:
    answers = dict(negotiator(**kwargs).negotiate([(key, value)], OP))
    return answers.get(key)


# -- text codec ---------------------------------------------------------------------------------


class TestParseText:
    def test_pairs_in_order(self):
        data = b"InitiatorName=iqn.a:b\x00SessionType=Normal\x00"
        assert parse_text(data) == [("InitiatorName", "iqn.a:b"), ("SessionType", "Normal")]

    def test_rfc_key_with_lower_case_initial(self):
        assert parse_text(b"iSCSIProtocolLevel=1\x00") == [("iSCSIProtocolLevel", "1")]

    def test_missing_final_nul_and_padding_tolerated(self):
        assert parse_text(b"A=1\x00B=2") == [("A", "1"), ("B", "2")]
        assert parse_text(b"A=1\x00\x00\x00\x00") == [("A", "1")]

    def test_empty_data(self):
        assert parse_text(b"") == []
        assert parse_text(b"\x00\x00") == []

    def test_value_may_contain_equals_and_be_empty(self):
        assert parse_text(b"X-a=b=c\x00SendTargets=\x00") == [("X-a", "b=c"), ("SendTargets", "")]

    def test_utf8_value(self):
        assert parse_text("InitiatorAlias=h\u00f4te\x00".encode()) == [
            ("InitiatorAlias", "h\u00f4te")
        ]

    @pytest.mark.parametrize(
        "data, message",
        [
            (b"NoEquals\x00", "without '='"),
            (b"A=1\x00\x00B=2\x00", "empty"),
            (b"K" * 64 + b"=1\x00", "longer than 63"),
            (b"A=" + b"v" * 8193 + b"\x00", "longer than 8192"),
            (b"A=\xff\xfe\x00", "UTF-8"),
            (b"A=1\x00A=1\x00", "twice"),
            (b"=1\x00", "invalid key"),
            (b"1Key=1\x00", "invalid key"),
            (b"Bad Key=1\x00", "invalid key"),
        ],
    )
    def test_errors(self, data, message):
        with pytest.raises(TextError, match=message):
            parse_text(data)

    def test_limits_are_inclusive(self):
        key = "K" * 63
        assert parse_text(f"{key}={'v' * 8192}".encode()) == [(key, "v" * 8192)]

    def test_encode(self):
        assert encode_text([("A", "1"), ("B", "")]) == b"A=1\x00B=\x00"

    def test_encode_refuses_bad_input(self):
        with pytest.raises(ValueError):
            encode_text([("A", "x\x00y")])
        with pytest.raises(ValueError):
            encode_text([("A=B", "1")])

    @given(
        st.dictionaries(
            st.from_regex(r"[A-Z][A-Za-z0-9.\-+@_]{0,62}", fullmatch=True),
            st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=50),
            max_size=8,
        )
    )
    def test_round_trip(self, pairs):
        items = list(pairs.items())
        assert parse_text(encode_text(items)) == items


# -- value helpers ------------------------------------------------------------------------------


class TestValues:
    @pytest.mark.parametrize(
        "text, number", [("0", 0), ("8192", 8192), ("0x2000", 8192), ("0X1f", 31), ("007", 7)]
    )
    def test_numbers(self, text, number):
        assert parse_number(text) == number

    @pytest.mark.parametrize("text", ["", "-1", "1.5", "0x", "0xg", "12a", " 1", "0b AA==", "Yes"])
    def test_bad_numbers(self, text):
        with pytest.raises(ValueError):
            parse_number(text)

    def test_binary_hex_and_base64(self):
        assert decode_binary("0x0102ff") == b"\x01\x02\xff"
        assert decode_binary("0XAB") == b"\xab"
        assert decode_binary("0x123") == b"\x01\x23"  # odd count: leading zero nibble
        assert decode_binary("0bAQL/") == b"\x01\x02\xff"
        assert decode_binary("0BAQI=") == b"\x01\x02"

    @pytest.mark.parametrize("text", ["", "0x", "0xzz", "12", "0b", "0b!!!!", "0bAQI", "x0AB"])
    def test_bad_binary(self, text):
        with pytest.raises(ValueError):
            decode_binary(text)

    @given(st.binary(min_size=1, max_size=64))
    def test_binary_round_trip(self, data):
        assert decode_binary(encode_hex(data)) == data
        assert decode_binary(encode_base64(data)) == data

    def test_booleans_are_case_sensitive(self):
        assert parse_boolean("Yes") is True and parse_boolean("No") is False
        assert format_boolean(True) == "Yes" and format_boolean(False) == "No"
        for text in ("yes", "NO", "true", "1", ""):
            with pytest.raises(ValueError):
                parse_boolean(text)

    def test_lists(self):
        assert parse_list("CRC32C,None") == ["CRC32C", "None"]
        for text in ("", "a,,b", "a,"):
            with pytest.raises(ValueError):
                parse_list(text)

    def test_iscsi_names(self):
        assert is_valid_iscsi_name("iqn.1993-08.org.debian:01:abc")
        assert is_valid_iscsi_name("eui.02004567A425678D")
        assert is_valid_iscsi_name("naa.52004567BA64678D")
        assert not is_valid_iscsi_name("")
        assert not is_valid_iscsi_name("host1")
        assert not is_valid_iscsi_name("iqn.2000-01.a:with space")
        assert not is_valid_iscsi_name("iqn." + "a" * 220)


# -- login identity -----------------------------------------------------------------------------


class TestLoginIdentity:
    def test_normal(self):
        identity = read_login_identity(
            [("InitiatorName", "iqn.a:i"), ("InitiatorAlias", "host"), ("TargetName", "iqn.a:t")]
        )
        assert identity.session_type is SessionType.NORMAL  # default when omitted
        assert (identity.initiator_name, identity.initiator_alias) == ("iqn.a:i", "host")
        assert identity.target_name == "iqn.a:t"

    def test_discovery_needs_no_target(self):
        identity = read_login_identity([("InitiatorName", "iqn.a:i"), ("SessionType", "Discovery")])
        assert identity.session_type is SessionType.DISCOVERY and identity.target_name is None

    @pytest.mark.parametrize(
        "pairs, status",
        [
            ([("TargetName", "iqn.a:t")], STATUS_MISSING_PARAMETER),
            ([("InitiatorName", "iqn.a:i")], STATUS_MISSING_PARAMETER),
            ([("InitiatorName", "iqn.a:i"), ("SessionType", "Bogus")], STATUS_MISSING_PARAMETER),
            ([("InitiatorName", "bad name"), ("TargetName", "iqn.a:t")], STATUS_INITIATOR_ERROR),
        ],
    )
    def test_errors(self, pairs, status):
        with pytest.raises(NegotiationError) as caught:
            read_login_identity(pairs)
        assert caught.value.status == status


# -- negotiation: defaults and key types --------------------------------------------------------


def test_result_defaults_are_rfc_defaults():
    result = negotiator().result
    assert result == OperationalValues(
        header_digest=False,
        data_digest=False,
        max_recv_data_segment_length_initiator=8192,
        max_recv_data_segment_length_target=8192,
        max_burst_length=262144,
        first_burst_length=65536,
        initial_r2t=True,
        immediate_data=True,
        max_outstanding_r2t=1,
        data_pdu_in_order=True,
        data_sequence_in_order=True,
        default_time2wait=2,
        default_time2retain=20,
        error_recovery_level=0,
        max_connections=1,
        task_reporting="RFC3720",
        iscsi_protocol_level=0,
        auth_method=None,
        session_type=SessionType.NORMAL,
    )


class TestListKeys:
    def test_first_initiator_value_the_target_allows(self):
        assert answer("HeaderDigest", "CRC32C,None") == "CRC32C"
        assert answer("HeaderDigest", "None,CRC32C") == "None"
        assert answer("DataDigest", "None,CRC32C", data_digests=("CRC32C",)) == "CRC32C"

    def test_nothing_acceptable_is_reject_and_default_kept(self):
        n = negotiator(header_digests=("CRC32C",))
        assert n.negotiate([("HeaderDigest", "None")], OP) == [("HeaderDigest", REJECT)]
        assert n.result.header_digest is False

    def test_unknown_items_skipped(self):
        assert answer("DataDigest", "Adler32,CRC32C") == "CRC32C"

    def test_malformed_list_rejected(self):
        assert answer("HeaderDigest", "CRC32C,,None") == REJECT

    def test_digest_results(self):
        n = negotiator()
        n.negotiate([("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C,None")], OP)
        assert n.result.header_digest and n.result.data_digest

    def test_auth_method(self):
        n = negotiator(auth_methods=("CHAP", "None"))
        assert n.negotiate([("AuthMethod", "KRB5,CHAP,None")], Phase.SECURITY) == [
            ("AuthMethod", "CHAP")
        ]
        assert n.result.auth_method == "CHAP"

    def test_auth_method_reject_then_retry(self):
        n = negotiator(auth_methods=("CHAP",))
        assert n.negotiate([("AuthMethod", "None")], Phase.SECURITY) == [("AuthMethod", REJECT)]
        assert n.result.auth_method is None
        assert n.negotiate([("AuthMethod", "CHAP")], Phase.SECURITY) == [("AuthMethod", "CHAP")]

    def test_auth_method_outside_security_stage_rejected(self):
        assert answer("AuthMethod", "None") == REJECT

    def test_task_reporting(self):
        assert answer("TaskReporting", "FastAbort,RFC3720") == "RFC3720"
        assert answer("TaskReporting", "FastAbort") == REJECT


NUMERIC_MIN = [
    ("MaxConnections", "max_connections", 1, 65535),
    ("MaxBurstLength", "max_burst_length", 512, 2**24 - 1),
    ("FirstBurstLength", "first_burst_length", 512, 2**24 - 1),
    ("DefaultTime2Retain", "default_time2retain", 0, 3600),
    ("MaxOutstandingR2T", "max_outstanding_r2t", 1, 65535),
]
RESULT_FIELD = {
    "MaxConnections": "max_connections",
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "DefaultTime2Retain": "default_time2retain",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "DefaultTime2Wait": "default_time2wait",
}


class TestNumericKeys:
    @pytest.mark.parametrize("key, attribute, low, high", NUMERIC_MIN)
    def test_minimum(self, key, attribute, low, high):
        target = getattr(Limits(), attribute)
        assert answer(key, str(high)) == str(min(high, target))
        assert answer(key, str(low)) == str(low)

    @pytest.mark.parametrize("key, attribute, low, high", NUMERIC_MIN)
    def test_out_of_range_is_reject_and_default_kept(self, key, attribute, low, high):
        for bad in (str(high + 1), "-1", "abc", "") + ((str(low - 1),) if low else ()):
            n = negotiator()
            assert n.negotiate([(key, bad)], OP) == [(key, REJECT)]
            assert getattr(n.result, RESULT_FIELD[key]) == getattr(
                negotiator().result, RESULT_FIELD[key]
            )

    def test_hex_values_accepted(self):
        assert answer("MaxBurstLength", "0x4000") == "16384"

    def test_default_time2wait_is_maximum(self):
        assert answer("DefaultTime2Wait", "0") == "2"
        assert answer("DefaultTime2Wait", "5") == "5"
        assert answer("DefaultTime2Wait", "3601") == REJECT

    def test_error_recovery_level_is_always_zero(self):
        for offer in ("0", "1", "2"):
            assert answer("ErrorRecoveryLevel", offer) == "0"
        assert answer("ErrorRecoveryLevel", "3") == REJECT

    def test_protocol_level(self):
        assert answer("iSCSIProtocolLevel", "2") == "1"
        assert answer("iSCSIProtocolLevel", "0") == "0"
        assert answer("iSCSIProtocolLevel", "32") == REJECT

    def test_max_connections_capped_by_config(self):
        n = negotiator(limits=Limits(max_connections=2))
        assert n.negotiate([("MaxConnections", "8")], OP) == [("MaxConnections", "2")]
        assert n.result.max_connections == 2

    @given(
        key_attribute=st.sampled_from([(k, a) for k, a, _, _ in NUMERIC_MIN]),
        offer=st.integers(0, 2**24 + 10),
        target=st.integers(512, 65535),
    )
    def test_minimum_law(self, key_attribute, offer, target):
        key, attribute = key_attribute
        spec_low = {"MaxConnections": 1, "MaxOutstandingR2T": 1, "DefaultTime2Retain": 0}.get(
            key, 512
        )
        spec_high = {
            "MaxConnections": 65535,
            "MaxOutstandingR2T": 65535,
            "DefaultTime2Retain": 3600,
        }.get(key, 2**24 - 1)
        target = min(target, spec_high)
        limits = dataclasses.replace(Limits(), **{attribute: target})
        got = dict(Negotiator(limits).negotiate([(key, str(offer))], OP))[key]
        if spec_low <= offer <= spec_high:
            assert int(got) == min(offer, target)
            assert int(got) <= offer and int(got) <= target
        else:
            assert got == REJECT

    @given(offer=st.integers(0, 3600), target=st.integers(0, 3600))
    def test_maximum_law(self, offer, target):
        n = Negotiator(Limits(default_time2wait=target))
        got = int(dict(n.negotiate([("DefaultTime2Wait", str(offer))], OP))["DefaultTime2Wait"])
        assert got == max(offer, target) and n.result.default_time2wait == got


BOOLEANS = [
    ("InitialR2T", "initial_r2t", "OR"),
    ("ImmediateData", "immediate_data", "AND"),
    ("DataPDUInOrder", "data_pdu_in_order", "OR"),
    ("DataSequenceInOrder", "data_sequence_in_order", "OR"),
]


class TestBooleanKeys:
    @pytest.mark.parametrize("key, attribute, function", BOOLEANS)
    @pytest.mark.parametrize("offer", [True, False])
    @pytest.mark.parametrize("mine", [True, False])
    def test_truth_tables(self, key, attribute, function, offer, mine):
        n = Negotiator(dataclasses.replace(Limits(), **{attribute: mine}))
        expected = (offer and mine) if function == "AND" else (offer or mine)
        assert n.negotiate([(key, format_boolean(offer))], OP) == [(key, format_boolean(expected))]
        assert getattr(n.result, attribute) is expected

    @pytest.mark.parametrize("key, attribute, function", BOOLEANS)
    def test_malformed_boolean_rejected(self, key, attribute, function):
        for bad in ("yes", "True", "", "Yes,No"):
            assert answer(key, bad) == REJECT


class TestFirstBurst:
    def test_capped_by_max_burst_of_same_request_even_if_later(self):
        n = negotiator()
        got = n.negotiate([("FirstBurstLength", "262144"), ("MaxBurstLength", "16384")], OP)
        assert got == [("FirstBurstLength", "16384"), ("MaxBurstLength", "16384")]

    def test_capped_by_earlier_max_burst(self):
        n = negotiator()
        n.negotiate([("MaxBurstLength", "8192")], OP)
        assert n.negotiate([("FirstBurstLength", "65536")], OP) == [("FirstBurstLength", "8192")]

    def test_result_clamped_when_max_burst_comes_later(self):
        n = negotiator()
        n.negotiate([("FirstBurstLength", "65536")], OP)
        n.negotiate([("MaxBurstLength", "4096")], OP)
        assert n.result.first_burst_length == 4096 and n.result.max_burst_length == 4096

    @given(
        first=st.integers(512, 2**24 - 1),
        burst=st.integers(512, 2**24 - 1),
        cfg_first=st.integers(512, 2**20),
        cfg_burst=st.integers(512, 2**20),
        burst_first=st.booleans(),
    )
    def test_first_burst_never_exceeds_max_burst(
        self, first, burst, cfg_first, cfg_burst, burst_first
    ):
        n = Negotiator(Limits(first_burst_length=cfg_first, max_burst_length=cfg_burst))
        pairs = [("FirstBurstLength", str(first)), ("MaxBurstLength", str(burst))]
        answers = dict(n.negotiate(pairs[::-1] if burst_first else pairs, OP))
        assert int(answers["FirstBurstLength"]) <= int(answers["MaxBurstLength"])
        assert n.result.first_burst_length <= n.result.max_burst_length
        assert n.result.first_burst_length <= min(first, cfg_first)


class TestDeclarativeKeys:
    def test_no_answer_and_recorded(self):
        n = negotiator()
        pairs = [
            ("InitiatorName", "iqn.2000-01.com.example:i"),
            ("InitiatorAlias", "host"),
            ("TargetName", "iqn.2000-01.com.example:t"),
            ("SessionType", "Normal"),
            ("MaxRecvDataSegmentLength", "65536"),
        ]
        assert n.negotiate(pairs, Phase.SECURITY) == []
        result = n.result
        assert result.initiator_name == "iqn.2000-01.com.example:i"
        assert result.initiator_alias == "host"
        assert result.target_name == "iqn.2000-01.com.example:t"
        assert result.max_recv_data_segment_length_initiator == 65536
        # The initiator's limit is not the target's: the target has not declared yet.
        assert result.max_recv_data_segment_length_target == 8192

    @pytest.mark.parametrize("bad", ["511", "16777216", "big"])
    def test_bad_mrdsl_rejected(self, bad):
        n = negotiator()
        assert n.negotiate([("MaxRecvDataSegmentLength", bad)], OP) == [
            ("MaxRecvDataSegmentLength", REJECT)
        ]
        assert n.result.max_recv_data_segment_length_initiator == 8192

    def test_session_type_mismatch_is_error(self):
        with pytest.raises(NegotiationError):
            negotiator().negotiate([("SessionType", "Discovery")], Phase.SECURITY)
        with pytest.raises(NegotiationError) as caught:
            negotiator().negotiate([("SessionType", "Other")], Phase.SECURITY)
        assert caught.value.status == STATUS_MISSING_PARAMETER

    def test_invalid_initiator_name_is_error(self):
        with pytest.raises(NegotiationError):
            negotiator().negotiate([("InitiatorName", "not a name")], Phase.SECURITY)

    def test_long_alias_rejected(self):
        assert answer("InitiatorAlias", "a" * 256) == REJECT

    @pytest.mark.parametrize("key", ["TargetAlias", "TargetAddress", "TargetPortalGroupTag"])
    def test_target_only_keys_rejected(self, key):
        assert answer(key, "1") == REJECT


class TestSpecialAnswers:
    def test_unknown_keys(self):
        n = negotiator()
        got = n.negotiate([("Foo", "1"), ("X-com.example.x", "1"), ("X#y", "2")], OP)
        assert got == [
            ("Foo", NOT_UNDERSTOOD),
            ("X-com.example.x", NOT_UNDERSTOOD),
            ("X#y", NOT_UNDERSTOOD),
        ]
        assert n.not_understood == ["Foo"]  # extension keys are legitimate: not reported

    def test_markers(self):
        got = negotiator().negotiate(
            [
                ("OFMarker", "Yes"),
                ("IFMarker", "No"),
                ("OFMarkInt", "2048"),
                ("IFMarkInt", "1~65535"),
            ],
            OP,
        )
        assert got == [
            ("OFMarker", "No"),
            ("IFMarker", "No"),
            ("OFMarkInt", REJECT),
            ("IFMarkInt", REJECT),
        ]

    def test_send_targets_rejected_during_login(self):
        assert answer("SendTargets", "All") == REJECT

    def test_chap_keys_skipped_in_security_rejected_elsewhere(self):
        n = negotiator()
        assert n.negotiate([("CHAP_A", "5")], Phase.SECURITY) == []
        assert negotiator().negotiate([("CHAP_N", "u")], OP) == [("CHAP_N", REJECT)]

    def test_answers_keep_arrival_order(self):
        pairs = [
            ("MaxBurstLength", "65536"),
            ("Foo", "x"),
            ("InitialR2T", "No"),
            ("HeaderDigest", "None"),
        ]
        assert [key for key, _ in negotiator().negotiate(pairs, OP)] == [
            "MaxBurstLength",
            "Foo",
            "InitialR2T",
            "HeaderDigest",
        ]


DISCOVERY_IRRELEVANT = [
    ("MaxConnections", "2"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "65536"),
    ("FirstBurstLength", "512"),
    ("MaxOutstandingR2T", "2"),
    ("DataPDUInOrder", "No"),
    ("DataSequenceInOrder", "No"),
    ("TaskReporting", "RFC3720"),
]


class TestDiscovery:
    @pytest.mark.parametrize("key, value", DISCOVERY_IRRELEVANT)
    def test_irrelevant_keys(self, key, value):
        assert answer(key, value, session_type="Discovery") == IRRELEVANT

    def test_irrelevant_keys_keep_defaults(self):
        n = negotiator(session_type=SessionType.DISCOVERY)
        n.negotiate(DISCOVERY_IRRELEVANT, OP)
        result = n.result
        assert (result.max_connections, result.max_burst_length, result.first_burst_length) == (
            1,
            262144,
            65536,
        )
        assert result.initial_r2t and result.data_pdu_in_order and result.max_outstanding_r2t == 1

    @pytest.mark.parametrize(
        "key, value, expected",
        [
            ("HeaderDigest", "CRC32C", "CRC32C"),
            ("DefaultTime2Wait", "0", "2"),
            ("DefaultTime2Retain", "0", "0"),
            ("ErrorRecoveryLevel", "1", "0"),
        ],
    )
    def test_relevant_keys_negotiated(self, key, value, expected):
        assert answer(key, value, session_type="Discovery") == expected

    def test_discovery_makes_no_session_proposals(self):
        n = negotiator(
            session_type="Discovery",
            limits=Limits(immediate_data=False, max_burst_length=4096, first_burst_length=4096),
        )
        assert n.declarations(OP) == [("MaxRecvDataSegmentLength", "262144")]


class TestNonLeadingConnection:
    def test_session_keys_irrelevant(self):
        n = negotiator(leading=False)
        got = n.negotiate(
            [("MaxBurstLength", "4096"), ("ImmediateData", "No"), ("HeaderDigest", "CRC32C")], OP
        )
        assert got == [
            ("MaxBurstLength", IRRELEVANT),
            ("ImmediateData", IRRELEVANT),
            ("HeaderDigest", "CRC32C"),
        ]

    def test_session_type_still_read_without_answer(self):
        assert (
            negotiator(leading=False).negotiate([("SessionType", "Normal")], Phase.SECURITY) == []
        )


class TestRenegotiationDuringLogin:
    def test_negotiated_key_twice_is_protocol_error(self):
        n = negotiator()
        n.negotiate([("MaxBurstLength", "65536")], OP)
        with pytest.raises(NegotiationError) as caught:
            n.negotiate([("MaxBurstLength", "65536")], OP)
        assert caught.value.status == STATUS_INITIATOR_ERROR

    def test_identical_declaration_tolerated_changed_one_refused(self):
        n = negotiator()
        n.negotiate([("InitiatorName", "iqn.2000-01.a:i")], Phase.SECURITY)
        assert n.negotiate([("InitiatorName", "iqn.2000-01.a:i")], OP) == []
        with pytest.raises(NegotiationError):
            n.negotiate([("InitiatorName", "iqn.2000-01.a:other")], OP)


class TestDeclarations:
    def test_receive_limit_declared_once_in_operational_stage(self):
        n = negotiator()
        assert n.declarations(Phase.SECURITY) == []
        assert n.declarations(OP) == [("MaxRecvDataSegmentLength", "262144")]
        assert n.declarations(OP) == []
        assert n.result.max_recv_data_segment_length_target == 262144

    def test_declared_even_when_the_initiator_declared_its_own(self):
        n = negotiator()
        n.negotiate([("MaxRecvDataSegmentLength", "8192")], OP)
        assert n.declarations(OP) == [("MaxRecvDataSegmentLength", "262144")]
        assert n.result.max_recv_data_segment_length_initiator == 8192

    def test_no_proposals_when_defaults_fit(self):
        n = negotiator()
        assert n.declarations(OP) == [("MaxRecvDataSegmentLength", "262144")]
        assert n.awaiting_answer == frozenset()

    def test_proposals_where_defaults_do_not_fit(self):
        limits = Limits(
            immediate_data=False,
            initial_r2t=False,
            max_burst_length=131072,
            first_burst_length=16384,
        )
        n = negotiator(limits=limits, header_digests=("CRC32C",))
        # InitialR2T=No makes FirstBurstLength relevant although ImmediateData will be No.
        assert n.negotiate([("InitialR2T", "No")], OP) == [("InitialR2T", "No")]
        assert n.declarations(OP) == [
            ("MaxRecvDataSegmentLength", "262144"),
            ("HeaderDigest", "CRC32C"),
            ("ImmediateData", "No"),
            ("MaxBurstLength", "131072"),
            ("FirstBurstLength", "16384"),
        ]
        assert n.awaiting_answer == {
            "HeaderDigest",
            "ImmediateData",
            "MaxBurstLength",
            "FirstBurstLength",
        }
        # The initiator's answers are not answered again.
        got = n.negotiate(
            [
                ("HeaderDigest", "CRC32C"),
                ("ImmediateData", "No"),
                ("MaxBurstLength", "65536"),
                ("FirstBurstLength", "8192"),
            ],
            OP,
        )
        assert got == []
        assert n.awaiting_answer == frozenset()
        result = n.result
        assert result.header_digest and not result.immediate_data
        assert (result.max_burst_length, result.first_burst_length) == (65536, 8192)
        assert n.declarations(OP) == []

    def test_first_burst_not_proposed_when_irrelevant(self):
        limits = Limits(immediate_data=False, initial_r2t=True, first_burst_length=4096)
        assert ("FirstBurstLength", "4096") not in negotiator(limits=limits).declarations(OP)

    def test_keys_the_initiator_already_offered_are_not_proposed(self):
        n = negotiator(limits=Limits(immediate_data=False), header_digests=("CRC32C",))
        n.negotiate([("ImmediateData", "Yes"), ("HeaderDigest", "CRC32C")], OP)
        assert n.declarations(OP) == [("MaxRecvDataSegmentLength", "262144")]
        assert n.result.immediate_data is False

    @pytest.mark.parametrize(
        "key, bad",
        [
            ("HeaderDigest", "None"),
            ("HeaderDigest", REJECT),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("ImmediateData", NOT_UNDERSTOOD),
        ],
    )
    def test_invalid_or_refused_answer_is_error(self, key, bad):
        n = negotiator(
            limits=Limits(immediate_data=False, max_burst_length=65536), header_digests=("CRC32C",)
        )
        n.declarations(OP)
        with pytest.raises(NegotiationError):
            n.negotiate([(key, bad)], OP)

    def test_irrelevant_first_burst_answer_accepted(self):
        n = negotiator(limits=Limits(first_burst_length=4096))
        assert ("FirstBurstLength", "4096") in n.declarations(OP)
        assert n.negotiate([("FirstBurstLength", IRRELEVANT)], OP) == []


class TestFullFeaturePhase:
    def test_only_all_keys_renegotiable(self):
        n = negotiator()
        n.negotiate([("MaxRecvDataSegmentLength", "8192"), ("HeaderDigest", "None")], OP)
        got = n.negotiate(
            [
                ("MaxRecvDataSegmentLength", "65536"),
                ("InitiatorAlias", "renamed"),
                ("HeaderDigest", "CRC32C"),
                ("MaxBurstLength", "512"),
                ("InitiatorName", "iqn.2000-01.a:b"),
                ("TargetAlias", "x"),
                ("X-vendor", "1"),
            ],
            Phase.FULL_FEATURE,
        )
        assert got == [
            ("HeaderDigest", REJECT),
            ("MaxBurstLength", REJECT),
            ("InitiatorName", REJECT),
            ("TargetAlias", REJECT),
            ("X-vendor", NOT_UNDERSTOOD),
        ]
        assert n.result.max_recv_data_segment_length_initiator == 65536
        assert n.result.initiator_alias == "renamed"
        assert n.result.header_digest is False and n.result.max_burst_length == 262144

    def test_repeated_text_requests_allowed(self):
        n = negotiator()
        for size in ("16384", "32768"):
            assert n.negotiate([("MaxRecvDataSegmentLength", size)], Phase.FULL_FEATURE) == []
        assert n.result.max_recv_data_segment_length_initiator == 32768

    def test_send_targets_left_to_discovery(self):
        assert negotiator().negotiate([("SendTargets", "All")], Phase.FULL_FEATURE) == []


class TestConstruction:
    def test_bad_digest_list(self):
        with pytest.raises(ValueError):
            negotiator(header_digests=("MD5",))
        with pytest.raises(ValueError):
            negotiator(data_digests=())

    def test_limits_outside_rfc_ranges(self):
        with pytest.raises(ValueError):
            negotiator(limits=Limits(max_burst_length=100))
        with pytest.raises(ValueError):
            negotiator(limits=Limits(default_time2wait=4000))


class TestCheckReady:
    def test_defaults_fit_default_configuration(self):
        negotiator().check_ready()

    def test_refused_required_digest(self):
        n = negotiator(data_digests=("CRC32C",))
        assert n.negotiate([("DataDigest", "None")], OP) == [("DataDigest", REJECT)]
        with pytest.raises(NegotiationError, match="DataDigest"):
            n.check_ready()

    def test_unanswered_proposal(self):
        n = negotiator(header_digests=("CRC32C",))
        n.declarations(OP)
        with pytest.raises(NegotiationError, match="no answer"):
            n.check_ready()
        n.negotiate([("HeaderDigest", "CRC32C")], OP)
        n.check_ready()

    @pytest.mark.parametrize(
        "limits, message",
        [
            (Limits(immediate_data=False), "ImmediateData"),
            (Limits(max_burst_length=65536), "MaxBurstLength"),
            (Limits(first_burst_length=4096), "FirstBurstLength"),
        ],
    )
    def test_skipped_operational_stage_leaves_unfit_defaults(self, limits, message):
        n = negotiator(limits=limits)
        with pytest.raises(NegotiationError, match=message):
            n.check_ready()

    def test_irrelevant_first_burst_is_not_checked(self):
        n = negotiator(limits=Limits(first_burst_length=4096, immediate_data=False))
        n.negotiate([("ImmediateData", "No")], OP)
        n.check_ready()

    def test_session_values_not_checked_on_discovery_or_non_leading(self):
        negotiator(
            limits=Limits(max_burst_length=4096, first_burst_length=4096), leading=False
        ).check_ready()
        negotiator(limits=Limits(immediate_data=False), session_type="Discovery").check_ready()

    def test_proposals_make_it_ready(self):
        n = negotiator(
            limits=Limits(
                immediate_data=False,
                initial_r2t=False,
                max_burst_length=65536,
                first_burst_length=4096,
            )
        )
        n.negotiate([("InitialR2T", "No")], OP)
        proposals = dict(n.declarations(OP))
        n.negotiate(
            [
                (key, proposals[key])
                for key in ("ImmediateData", "MaxBurstLength", "FirstBurstLength")
            ],
            OP,
        )
        n.check_ready()


def test_open_iscsi_style_login():
    """The key set open-iscsi sends, with the exact answers and the resulting values."""
    n = negotiator(limits=Limits(initial_r2t=False, max_burst_length=1048576))
    security = [
        ("InitiatorName", "iqn.1993-08.org.debian:01:abcdef"),
        ("InitiatorAlias", "client"),
        ("SessionType", "Normal"),
        ("TargetName", "iqn.2007-09.jp.ne.peach.istgt:disk1"),
        ("AuthMethod", "None"),
    ]
    assert n.negotiate(security, Phase.SECURITY) == [("AuthMethod", "None")]
    assert n.declarations(Phase.SECURITY) == []
    operational = [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]
    assert n.negotiate(operational, OP) == [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "1048576"),
        ("FirstBurstLength", "65536"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
    ]
    assert n.declarations(OP) == [("MaxRecvDataSegmentLength", "262144")]
    assert n.awaiting_answer == frozenset()
    n.check_ready()
    result = n.result
    assert (result.initial_r2t, result.immediate_data) == (False, True)
    assert (result.max_burst_length, result.first_burst_length) == (1048576, 65536)
    assert result.default_time2retain == 0 and result.auth_method == "None"
    assert result.max_recv_data_segment_length_initiator == 262144
    assert result.max_recv_data_segment_length_target == 262144


NUMERIC_RANGES = {
    "MaxConnections": (1, 65535),
    "MaxBurstLength": (512, 2**24 - 1),
    "FirstBurstLength": (512, 2**24 - 1),
    "DefaultTime2Wait": (0, 3600),
    "DefaultTime2Retain": (0, 3600),
    "MaxOutstandingR2T": (1, 65535),
    "ErrorRecoveryLevel": (0, 2),
    "iSCSIProtocolLevel": (0, 31),
}
ANY_KEY = st.sampled_from(
    sorted(
        {
            *NUMERIC_RANGES,
            "HeaderDigest",
            "DataDigest",
            "AuthMethod",
            "InitialR2T",
            "ImmediateData",
            "DataPDUInOrder",
            "DataSequenceInOrder",
            "MaxRecvDataSegmentLength",
            "InitiatorName",
            "InitiatorAlias",
            "TargetName",
            "SessionType",
            "TargetAlias",
            "SendTargets",
            "OFMarker",
            "OFMarkInt",
            "TaskReporting",
            "CHAP_A",
            "X-vendor",
            "Unknown",
        }
    )
)
ANY_VALUE = st.one_of(
    st.sampled_from(["Yes", "No", "CRC32C", "None", "CRC32C,None", "Reject", "", "0x10", "0b"]),
    st.integers(-5, 2**25).map(str),
    st.text(max_size=300),
)


@given(
    requests=st.lists(
        st.dictionaries(ANY_KEY, ANY_VALUE, max_size=6).map(lambda d: list(d.items())),
        max_size=4,
    ),
    phase=st.sampled_from(list(Phase)),
    session_type=st.sampled_from(list(SessionType)),
    leading=st.booleans(),
)
def test_never_crashes_and_answers_stay_in_range(requests, phase, session_type, leading):
    n = Negotiator(Limits(), session_type=session_type, leading=leading)
    for pairs in requests:
        try:
            answers = n.negotiate(pairs, phase)
        except NegotiationError:
            return
        assert [key for key, _ in answers] == [key for key, _ in pairs if key in dict(answers)]
        for key, value in answers:
            if key in NUMERIC_RANGES and value not in (REJECT, IRRELEVANT):
                low, high = NUMERIC_RANGES[key]
                assert low <= int(value) <= high
        n.declarations(phase)
    result = n.result
    assert result.first_burst_length <= result.max_burst_length
    assert result.error_recovery_level == 0
