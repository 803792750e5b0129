"""Typed configuration: defaults, validation errors, sizes, netmasks, ACL."""

import dataclasses
import logging
import socket
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istgt.config import (
    AuthSpec,
    ConfigError,
    IscsiParams,
    Netmask,
    access_allowed,
    load_auth,
    load_config,
    load_control_config,
    parse_size,
    visible,
    visible_portal_groups,
)

MINIMAL = """\
[Global]
[UnitControl]
[PortalGroup1]
  Portal DA1 127.0.0.1:3260
[InitiatorGroup1]
  InitiatorName ALL
[LogicalUnit1]
  TargetName disk1
  Mapping PortalGroup1 InitiatorGroup1
  UnitType Disk
  LUN0 Storage /tmp/disk1.img 1GB
"""


@pytest.fixture
def write(tmp_path):
    def write(text, name="istgt.conf"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def load(write):
    def load(text):
        return load_config(write(text))

    return load


def with_lu_lines(*lines):
    return MINIMAL + "".join(f"  {line}\n" for line in lines)


def error_of(load, text):
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value


# --- defaults ------------------------------------------------------------------


def test_minimal_config_defaults(load, tmp_path):
    config = load(MINIMAL)
    g = config.global_
    assert g.node_base == "iqn.2007-09.jp.ne.peach.istgt"
    assert g.pid_file == "/var/run/istgt.pid"
    assert g.auth_file == str(tmp_path / "auth.conf")
    assert g.media_directory == "/var/istgt"
    assert g.log_facility == "local7"
    assert (g.timeout, g.nop_in_interval, g.max_r2t, g.max_sessions) == (60, 20, 16, 32)
    assert g.discovery_auth == AuthSpec("auto", False, None)
    assert g.iscsi == IscsiParams()
    assert g.iscsi.max_connections == 4
    assert config.unit_control.portals == ()
    assert config.unit_control.netmasks == ()
    assert config.unit_control.socket_path == "/var/run/istgt/istgt.sock"

    lu = config.logical_units[1]
    assert lu.name == "iqn.2007-09.jp.ne.peach.istgt:disk1"
    assert lu.alias is None
    assert lu.mappings == ((1, 1),)
    assert lu.auth == AuthSpec("auto", False, None)
    assert (lu.header_digest, lu.data_digest) == ("auto", "auto")
    assert (lu.read_only, lu.online, lu.unit_type) == (False, True, "disk")
    assert dataclasses.astuple(lu.inquiry) == ("FreeBSD", "iSCSI DISK", "0001", "10000001")
    assert (lu.block_length, lu.queue_depth) == (512, 32)
    lun = lu.luns[0]
    assert (lun.kind, lun.path, lun.size, lun.serial) == ("storage", "/tmp/disk1.img", 1 << 30, "10000001")
    assert (lun.rpm, lun.form_factor, lun.read_cache, lun.write_cache) == (7200, 2, True, True)
    assert lu.iscsi == g.iscsi


def test_objects_are_frozen(load):
    config = load(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.global_.timeout = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.logical_units[1].luns[0].path = "/x"


def test_global_values_and_lu_overrides_merge(load):
    text = MINIMAL.replace(
        "[Global]\n",
        "[Global]\n  Comment \"g\"\n  NodeBase iqn.2001-04.com.example\n  Timeout 30\n"
        "  MaxBurstLength 1048576\n  FirstBurstLength 262144\n  ImmediateData No\n"
        "  MaxConnections 8\n  LogFacility DAEMON\n  DiscoveryAuthMethod CHAP Mutual\n"
        "  DiscoveryAuthGroup AuthGroup9999\n  MaxSessions 0\n",
    ) + "  FirstBurstLength 8192\n  ImmediateData Yes\n  DefaultTime2Retain 0\n"
    config = load(text)
    g = config.global_
    assert g.timeout == 30 and g.log_facility == "daemon"
    assert g.max_sessions == 32  # < 1 gives the default, as in C
    assert g.discovery_auth == AuthSpec("chap", True, 9999)
    assert g.iscsi.max_burst_length == 1048576 and g.iscsi.immediate_data is False
    lu = config.logical_units[1]
    assert lu.name == "iqn.2001-04.com.example:disk1"
    assert lu.iscsi.first_burst_length == 8192
    assert lu.iscsi.max_burst_length == 1048576  # inherited
    assert lu.iscsi.immediate_data is True
    assert lu.iscsi.default_time2retain == 0
    assert lu.iscsi.max_connections == 8


def test_control_socket_and_unit_control(load):
    text = MINIMAL.replace(
        "[UnitControl]\n",
        "[UnitControl]\n  Comment x\n  ControlSocket var/istgt.sock\n  Portal UC1 [::1]:3261\n"
        "  Netmask [::1]\n  AuthMethod CHAP Mutual\n  AuthGroup AuthGroup10000\n",
    )
    uc = load(text).unit_control
    assert uc.socket_path == "var/istgt.sock"
    assert [(p.host, p.port, p.display) for p in uc.portals] == [("::1", 3261, "[::1]:3261")]
    assert uc.netmasks[0].matches("::1") and not uc.netmasks[0].matches("::2")
    assert uc.auth == AuthSpec("chap", True, 10000)


def test_unknown_keys_warn_but_load(load, caplog):
    text = MINIMAL.replace("[Global]\n", "[Global]\n  Luworkers 6\n") + "  LogFile /x\n"
    with caplog.at_level(logging.WARNING, logger="istgt.config"):
        load(text)
    messages = [record.getMessage() for record in caplog.records]
    assert any(":2: [Global] Luworkers: unknown key ignored" in m for m in messages)
    assert any(":13: [LogicalUnit1] LogFile: unknown key ignored" in m for m in messages)


def test_comment_accepted_everywhere(load, caplog):
    text = "".join(
        line + ("\n  Comment \"c\"" if line.startswith("[") else "") + "\n"
        for line in MINIMAL.splitlines()
    )
    with caplog.at_level(logging.WARNING, logger="istgt.config"):
        load(text)
    assert not caplog.records


def test_key_without_value_counts_as_unset(load):
    lu = load(with_lu_lines("AuthGroup ")).logical_units[1]
    assert lu.auth.group is None


# --- error messages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ("MaxR2T 257", "MaxR2T", "out of range 0..256"),
        ("Timeout abc", "Timeout", "expected an integer"),
        ("Timeout 99999999999999999999", "Timeout", "out of range 0..2147483647"),
        ("NopInInterval 2147483648", "NopInInterval", "out of range 0..2147483647"),
        ("InitialR2T Maybe", "InitialR2T", "expected Yes or No"),
        ("ImmediateData maybe", "ImmediateData", "expected Yes or No"),
        ("ErrorRecoveryLevel 1", "ErrorRecoveryLevel", "out of range 0..0"),
        ("MaxBurstLength 100", "MaxBurstLength", "out of range 512..16777215"),
        ("FirstBurstLength 524288", "FirstBurstLength", "exceeds MaxBurstLength 262144"),
        ("LogFacility kern", "LogFacility", "unknown syslog facility"),
        ("DiscoveryAuthMethod Auto Mutual", "DiscoveryAuthMethod", "Mutual requires CHAP"),
        ("DiscoveryAuthMethod Kerberos", "DiscoveryAuthMethod", "unknown auth method"),
        ("DiscoveryAuthGroup Group1", "DiscoveryAuthGroup", "expected AuthGroupN or None"),
        ("DiscoveryAuthGroup AuthGroup0", "DiscoveryAuthGroup", "AuthGroup0 is invalid"),
    ],
)
def test_global_errors_name_file_line_section_key(load, tmp_path, extra, key, fragment):
    text = MINIMAL.replace("[Global]\n", f"[Global]\n  Comment x\n  {extra}\n")
    error = error_of(load, text)
    assert (error.line, error.section, error.key) == (3, "Global", key)
    assert error.path == str(tmp_path / "istgt.conf")
    assert str(error) == f"{error.path}:3: [Global] {key}: {error.message}"
    assert fragment in error.message


LU_LINE = 12  # first line appended by with_lu_lines


@pytest.mark.parametrize(
    ("line", "key", "fragment"),
    [
        ("AuthMethod Mutual", "AuthMethod", "Mutual requires CHAP"),
        ("UseDigest CRC", "UseDigest", "unknown digest"),
        ("ReadOnly perhaps", "ReadOnly", "expected Yes or No"),
        ("UnitOnline 1", "UnitOnline", "expected Yes or No"),
        ("QueueDepth 256", "QueueDepth", "out of range 0..255"),
        ("BlockLength 1000", "BlockLength", "not a power of two"),
        ("BlockLength 1048576", "BlockLength", "not a power of two"),
        ("Mapping PortalGroup2 InitiatorGroup1", "Mapping", "[PortalGroup2] is not defined"),
        ("Mapping PortalGroup1 InitiatorGroup9", "Mapping", "[InitiatorGroup9] is not defined"),
        ("Mapping PG1 IG1", "Mapping", "expected: Mapping PortalGroupN InitiatorGroupM"),
        ("LUN0 Storage /tmp/other 1GB", "LUN0", "duplicate LUN0 (already defined at line 11)"),
        ("LUN1 Storage /tmp/x 1.5GB", "LUN1", "invalid size '1.5GB'"),
        ("LUN1 Storage /tmp/x 0", "LUN1", "size 0 is not allowed"),
        ("LUN1 Storage /tmp/x", "LUN1", "expected: LUN1 Storage <path> <size|Auto>"),
        ("LUN1 Storage 1G 32k", "LUN1", "looks like a size"),
        ("LUN1 Storage /tmp/x 1G 32k", "LUN1", "got 3 values"),
        ("LUN1 Storage rbd:justimage 1GB", "LUN1", "expected rbd:pool/[namespace/]image"),
        ("LUN1 Storage rbd:pool/img:keyring=/k 1GB", "LUN1", "unknown rbd option 'keyring=/k'"),
        ("LUN64 Storage /tmp/x 1GB", "LUN64", "out of range 0..63"),
        ("LUNX Storage /tmp/x 1GB", "LUNX", "LUN keys are LUN0..LUN63"),
        ("LUN1 Device /dev/sg0", "LUN1", "does not take Device LUNs"),
        ("LUN1 Removable ro /tmp/x.iso 1GB", "LUN1", "does not take Removable LUNs"),
        ("LUN1 Cloud a b 4GB https", "LUN1", "Cloud LUN type"),
        ("LUN1 Slot0 ro /tmp/x 1GB", "LUN1", "not supported"),
        ("LUN1 Tape /tmp/x", "LUN1", "unknown LUN type"),
        ("LUN2 Option Serial 5", "LUN2", "has options but no Storage"),
        ("LUN0 Option WriteCache Off", "LUN0", "expected Enable or Disable"),
        ("LUN0 Option RPM fast", "LUN0", "expected an integer"),
        ("LUN0 Option Provisioning Thick", "LUN0", "expected Thin or Full, got 'Thick'"),
        ("LUN0 Option PhysicalBlockSize 1536", "LUN0", "not a power-of-two multiple of the BlockLength 512"),
        ("LUN0 Option PhysicalBlockSize 256", "LUN0", "not a power-of-two multiple"),
        ("LUN0 Option PhysicalBlockSize 33554432", "LUN0", "at most 16777216"),
        ("LUN0 Option PhysicalBlockSize 4k", "LUN0", "expected an integer"),
        ("LUN0 Option Removable maybe", "LUN0", "expected Yes or No, got 'maybe'"),
        ("UnitInquiry \"Caf\u00e9\"", "UnitInquiry", "printable ASCII"),
    ],
)
def test_logical_unit_errors_name_file_line_section_key(load, line, key, fragment):
    error = error_of(load, with_lu_lines(line))
    assert (error.line, error.section, error.key) == (LU_LINE, "LogicalUnit1", key)
    assert str(error) == f"{error.path}:{LU_LINE}: [LogicalUnit1] {key}: {error.message}"
    assert fragment in error.message


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ('"my disk"', "character ' ' is not allowed"),
        ("disk_1", "character '_' is not allowed"),
        ("iqn.2007.example:x", "iqn.YYYY-MM."),
        ("eui.12345", "16 hex digits"),
        ("naa.xyz", "16 or 32 hex digits"),
        ("a" * 200, "longer than 223 bytes"),
    ],
)
def test_invalid_target_names_are_errors(load, name, fragment):
    error = error_of(load, MINIMAL.replace("TargetName disk1", f"TargetName {name}"))
    assert (error.line, error.key) == (8, "TargetName")
    assert fragment in error.message


@pytest.mark.parametrize(
    "name",
    ["iqn.2001-04.com.example:storage.disk2", "eui.02004567A425678D", "naa.52004567BA64678D",
     "naa.52004567BA64678D52004567BA64678D", "Disk-1.a"],
)
def test_valid_target_names(load, name):
    lu = load(MINIMAL.replace("TargetName disk1", f"TargetName {name}")).logical_units[1]
    assert lu.name.endswith(name)


def test_missing_required_lu_keys_point_at_the_section(load):
    for key in ("TargetName", "Mapping", "UnitType"):
        text = "\n".join(line for line in MINIMAL.splitlines() if key not in line) + "\n"
        error = error_of(load, text)
        assert (error.line, error.section, error.key) == (7, "LogicalUnit1", key)
    text = MINIMAL.replace("LUN0", "LUN1")
    error = error_of(load, text)
    assert (error.section, error.key) == ("LogicalUnit1", "LUN0")


@pytest.mark.parametrize(
    ("portal", "fragment"),
    [
        ("localhost:3260", "not a numeric IP address"),
        ("[::]:515500", "out of range 1..65535"),
        ("127.0.0.1:0", "out of range 1..65535"),
        ("127.0.0.1:http", "is not a number"),
        ("::1:3260", "must be written in brackets"),
        ("[127.0.0.1]:3260", "brackets are for IPv6"),
        ("[::1", "missing ']'"),
        ("[::1]3260", "expected ':port'"),
        ("300.1.1.1", "not a numeric IP address"),
    ],
)
def test_portal_errors(load, portal, fragment):
    error = error_of(load, MINIMAL.replace("127.0.0.1:3260", portal))
    assert (error.line, error.section, error.key) == (4, "PortalGroup1", "Portal")
    assert fragment in error.message


@pytest.mark.parametrize(
    ("text", "host", "port", "display", "family"),
    [
        ("127.0.0.1", "127.0.0.1", 3260, "127.0.0.1:3260", socket.AF_INET),
        ("10.0.0.1:3270", "10.0.0.1", 3270, "10.0.0.1:3270", socket.AF_INET),
        ("*", "0.0.0.0", 3260, "0.0.0.0:3260", socket.AF_INET),
        ("*:3261", "0.0.0.0", 3261, "0.0.0.0:3261", socket.AF_INET),
        ("[::1]:3272", "::1", 3272, "[::1]:3272", socket.AF_INET6),
        ("[2001:db8::5]", "2001:db8::5", 3260, "[2001:db8::5]:3260", socket.AF_INET6),
        ("[::]:3260", "::", 3260, "[::]:3260", socket.AF_INET6),
        ("[*]:3260", "::", 3260, "[::]:3260", socket.AF_INET6),
    ],
)
def test_portal_forms(load, text, host, port, display, family):
    portal = load(MINIMAL.replace("127.0.0.1:3260", text)).portal_groups[1].portals[0]
    assert (portal.label, portal.host, portal.port, portal.display, portal.family) == (
        "DA1", host, port, display, family,
    )


def test_group_and_unit_numbers(load):
    error = error_of(load, MINIMAL.replace("[PortalGroup1]", "[PortalGroup]"))
    assert (error.line, error.section) == (3, "PortalGroup")
    assert "out of range 1..65535" in error.message
    error = error_of(load, MINIMAL.replace("[LogicalUnit1]", "[LogicalUnit4096]"))
    assert "out of range 1..4095" in error.message
    error = error_of(load, MINIMAL + "[LogicalUnit01]\n")
    assert (error.line, error.section) == (12, "LogicalUnit01")
    assert "duplicate LogicalUnit1" in error.message


def test_duplicate_target_names(load):
    second = MINIMAL[MINIMAL.index("[LogicalUnit1]"):].replace("LogicalUnit1", "LogicalUnit2")
    error = error_of(load, MINIMAL + second.replace("TargetName disk1", "TargetName DISK1"))
    assert (error.section, error.key, error.line) == ("LogicalUnit2", "TargetName", 13)


def test_missing_global_and_empty_file(load):
    error = error_of(load, "")
    assert str(error) == f"{error.path}: missing [Global] section"
    error = error_of(load, "[Global\n")
    assert error.line == 1


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.conf")
    assert "cannot read" in str(caught.value)


# --- logical unit details ----------------------------------------------------


def test_lun_forms_and_options(load):
    lu = load(
        with_lu_lines(
            "UnitInquiry \"ACME\" \"\" \"0123\" \"\"",
            "LUN0 Option Serial \"S-0\"",
            "LUN0 Option RPM 70000",
            "LUN0 Option FormFactor 99",
            "LUN0 Option Unmap Disable",
            "lun2 storage /dev/zvol/tank/v AUTO",
            "LUN2 Option ReadCache Disable",
            "LUN2 Option WriteCache disable",
            "LUN3 Storage /tmp/big 20GB-1MB",
        )
    ).logical_units[1]
    assert (lu.inquiry.vendor, lu.inquiry.product, lu.inquiry.revision, lu.inquiry.serial) == (
        "ACME", "iSCSI DISK", "0123", "10000001",
    )
    assert sorted(lu.luns) == [0, 2, 3]
    assert (lu.luns[0].serial, lu.luns[0].rpm, lu.luns[0].form_factor) == ("S-0", 0xFFFE, 15)
    assert (lu.luns[2].size, lu.luns[2].serial) == (None, "10000001L2")
    assert (lu.luns[2].read_cache, lu.luns[2].write_cache) == (False, False)
    assert lu.luns[3].size == 20 * 2**30 - 2**20


def test_provisioning_physical_block_size_and_removable_options(load):
    lu = load(
        with_lu_lines(
            "LUN0 Option Provisioning full",
            "LUN0 Option PhysicalBlockSize 4096",
            "LUN0 Option Removable Yes",
            "LUN1 Storage /tmp/other 1GB",
            "LUN1 Option Provisioning Thin",
        )
    ).logical_units[1]
    first, second = lu.luns[0], lu.luns[1]
    assert (first.provisioning, first.physical_block_size, first.removable_disk) == ("full", 4096, True)
    assert (second.provisioning, second.physical_block_size, second.removable_disk) == ("thin", None, False)


def test_physical_block_size_is_checked_against_the_block_length(load):
    error = error_of(load, with_lu_lines("BlockLength 4096", "LUN0 Option PhysicalBlockSize 2048"))
    assert error.key == "LUN0" and "BlockLength 4096" in error.message
    lu = load(with_lu_lines("BlockLength 4096", "LUN0 Option PhysicalBlockSize 16384"))
    assert lu.logical_units[1].luns[0].physical_block_size == 16384


def test_inquiry_fields_are_truncated_with_a_warning(load, caplog):
    with caplog.at_level(logging.WARNING, logger="istgt.config"):
        lu = load(with_lu_lines('UnitInquiry "CloudByte" "a-very-long-product-name" "12345" "s"'))
    inquiry = lu.logical_units[1].inquiry
    assert (inquiry.vendor, inquiry.product, inquiry.revision) == ("CloudByt", "a-very-long-prod", "1234")
    assert "truncated" in caplog.text


def unit(load, unit_type, *lun_lines, extra=()):
    text = MINIMAL.replace("UnitType Disk", f"UnitType {unit_type}").replace(
        "  LUN0 Storage /tmp/disk1.img 1GB\n", ""
    )
    return load(text + "".join(f"  {line}\n" for line in (*extra, *lun_lines))).logical_units[1]


def test_dvd_tape_pass_units(load):
    dvd = unit(load, "DVD", "LUN0 Removable ro /tmp/dvd1.iso auto", extra=["BlockLength 512"])
    assert (dvd.unit_type, dvd.block_length, dvd.queue_depth) == ("dvd", 2048, 0)
    assert dvd.inquiry.product == "iSCSI DVD"
    lun = dvd.luns[0]
    assert (lun.kind, lun.flags, lun.path, lun.size, lun.read_only_media) == (
        "removable", ("ro",), "/tmp/dvd1.iso", None, True,
    )

    tape = unit(load, "tape", 'LUN0 Removable "rw,extend" /tmp/t.vt 1GB', extra=["QueueDepth 8"])
    assert (tape.unit_type, tape.queue_depth, tape.block_length) == ("tape", 0, 512)
    assert (tape.inquiry.product, tape.inquiry.revision, tape.inquiry.serial) == (
        "DLT8000", "C001", "CX10000001",
    )
    assert tape.luns[0].flags == ("rw", "extend") and tape.luns[0].size == 1 << 30

    empty = unit(load, "DVD", "LUN0 Removable ro /dev/null auto")
    assert empty.luns[0].no_media

    small = unit(load, "Tape", "LUN0 Removable rw,dynamic /tmp/t.vt 1k")
    assert small.luns[0].size == 1 << 20
    with pytest.raises(ConfigError, match="needs the 'dynamic' flag"):
        unit(load, "Tape", "LUN0 Removable rw /tmp/t.vt 1k")
    with pytest.raises(ConfigError, match="unknown media flag 'wo'"):
        unit(load, "Tape", "LUN0 Removable wo /tmp/t.vt 1GB")

    passthrough = unit(load, "Pass", "LUN0 Device /dev/sg1")
    assert (passthrough.unit_type, passthrough.inquiry.product) == ("pass", "iSCSI UNIT")
    assert (passthrough.luns[0].kind, passthrough.luns[0].path) == ("device", "/dev/sg1")
    assert passthrough.queue_depth == 0                 # none unless asked for, as istgt
    queued = unit(load, "Pass", "LUN0 Device /dev/sg1", extra=["QueueDepth 16"])
    assert queued.queue_depth == 16                     # istgt ignores it; a disk queues

    with pytest.raises(ConfigError, match="unknown unit type 'Changer'"):
        unit(load, "Changer", "LUN0 Device /dev/sg1")


def test_storage_lun_on_dvd_becomes_loaded_read_only_media(load):
    dvd = unit(load, "DVD", "LUN0 Storage /tmp/x.iso auto")
    assert (dvd.luns[0].kind, dvd.luns[0].flags) == ("removable", ("ro",))


def test_use_digest_and_auth(load):
    lu = load(with_lu_lines("UseDigest Header Data", "AuthMethod None CHAP Mutual", "AuthGroup authgroup2")).logical_units[1]
    assert (lu.header_digest, lu.data_digest) == ("required", "required")
    assert lu.auth == AuthSpec("chap", True, 2)
    lu = load(with_lu_lines("UseDigest Data Auto", "AuthMethod None")).logical_units[1]
    assert (lu.header_digest, lu.data_digest) == ("auto", "required")
    assert lu.auth.method == "none"


def test_yes_no_case_insensitive(load):
    lu = load(with_lu_lines("ReadOnly YES", "UnitOnline no")).logical_units[1]
    assert (lu.read_only, lu.online) == (True, False)


def test_find_target(load):
    config = load(MINIMAL)
    assert config.find_target("IQN.2007-09.jp.ne.peach.istgt:DISK1") is config.logical_units[1]
    assert config.find_target("iqn.2007-09.jp.ne.peach.istgt:disk2") is None


# --- sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("512", 512),
        ("1k", 1024),
        ("1KB", 1024),
        ("10GB", 10 * 2**30),
        ("10g", 10 * 2**30),
        ("512MB", 512 * 2**20),
        ("2TB", 2 * 2**40),
        ("1P", 2**50),
        ("20GB-1MB", 20 * 2**30 - 2**20),
        ("8EB-1", 8 * 2**60 - 1),
        ("1GB+512", 2**30 + 512),
        ("1GB - 1MB", 2**30 - 2**20),
        ("1MB-1GB", 0),  # underflow clamps to 0
        ("16EB", 2**64 - 1),  # overflow clamps to UINT64_MAX
        ("1ZB", 2**64 - 1),
        ("1b", 1),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "1.5GB", "1XB", "-1", "1GB-", "auto", "1GB-1MB-1", "1 GB 2"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


# --- netmasks ----------------------------------------------------------------------


def mask(load, text):
    config = load(MINIMAL.replace("InitiatorName ALL", f"InitiatorName ALL\n  Netmask {text}"))
    return config.initiator_groups[1].netmasks[0]


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("ALL", ["1.2.3.4", "::1", "fe80::1%eth0"], []),
        ("192.168.2.0/24", ["192.168.2.1", "192.168.2.255", "::ffff:192.168.2.7"], ["192.168.3.1", "::1", "junk"]),
        ("127.0.0.1", ["127.0.0.1", "::ffff:127.0.0.1"], ["127.0.0.2"]),
        ("10.43.201.13/8", ["10.1.1.1"], ["11.0.0.1"]),
        ("0.0.0.0/0", ["127.0.0.1", "8.8.8.8", "::1"], []),
        ("[::]/0", ["::1", "127.0.0.1"], []),
        ("[::1]", ["::1", "[::1]"], ["::2", "127.0.0.1"]),
        ("[2001:3e0:6cf:2::]/64", ["2001:3e0:6cf:2::99", "2001:3e0:6cf:2:1:2:3:4"], ["2001:3e0:6cf:3::1"]),
        ("[fe80::]/10", ["fe80::1%eth0"], ["fec0::1"]),
        ("2001:db8::/32", ["2001:db8::1"], ["2001:db9::1"]),
    ],
)
def test_netmask_matching(load, text, inside, outside):
    netmask = mask(load, text)
    assert netmask.text == text
    for ip in inside:
        assert netmask.matches(ip), ip
    for ip in outside:
        assert not netmask.matches(ip), ip


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("localhost/8", "invalid netmask"),
        ("None", "invalid netmask"),
        ("10.0.0.0/33", "prefix length 33 > 32"),
        ("[::1]/129", "prefix length 129 > 128"),
        ("10.0.0.0/255.0.0.0", "prefix length must be a number"),
        ("[10.0.0.1]", "brackets are for IPv6 only"),
    ],
)
def test_netmask_errors(load, text, fragment):
    error = error_of(load, MINIMAL.replace("InitiatorName ALL", f"InitiatorName ALL\n  Netmask {text}"))
    assert (error.line, error.section, error.key) == (7, "InitiatorGroup1", "Netmask")
    assert fragment in error.message


def test_netmask_all_object():
    assert Netmask("ALL", None).matches("anything at all")


# --- ACL ----------------------------------------------------------------------------

ACL = """\
[Global]
[PortalGroup1]
  Portal A 127.0.0.1:3260
[PortalGroup2]
  Portal B 127.0.0.1:3261
[InitiatorGroup1]
  InitiatorName "!iqn.1991-05.com.microsoft:moon"
  InitiatorName iqn.1991-05.com.microsoft:saturn
  InitiatorName iqn.1991-05.com.microsoft:venus
  Netmask 192.168.2.0/24
[InitiatorGroup2]
  InitiatorName iqn.1991-05.com.microsoft:venus
  InitiatorName ALL
[InitiatorGroup3]
  InitiatorName "!ALL"
[LogicalUnit1]
  TargetName disk1
  Mapping PortalGroup1 InitiatorGroup1
  Mapping PortalGroup1 InitiatorGroup2
  UnitType Disk
  LUN0 Storage /tmp/d 1GB
[LogicalUnit2]
  TargetName disk2
  Mapping PortalGroup2 InitiatorGroup3
  Mapping PortalGroup2 InitiatorGroup2
  Mapping PortalGroup1 InitiatorGroup2
  UnitType Disk
  LUN0 Storage /tmp/d2 1GB
"""


@pytest.mark.parametrize(
    ("lu_number", "pg", "name", "ip", "allowed"),
    [
        # named allow + matching netmask
        (1, 1, "iqn.1991-05.com.microsoft:saturn", "192.168.2.5", True),
        (1, 1, "IQN.1991-05.COM.MICROSOFT:SATURN", "192.168.2.5", True),
        # named allow but netmask misses: continue to IG2 (ALL, no netmask) -> allow
        (1, 1, "iqn.1991-05.com.microsoft:saturn", "10.0.0.1", True),
        # explicit deny wins immediately, before IG2's ALL
        (1, 1, "iqn.1991-05.com.microsoft:moon", "192.168.2.5", False),
        (1, 1, "iqn.1991-05.com.microsoft:Moon", "10.0.0.1", False),
        # unknown name: IG1 no match, IG2 ALL
        (1, 1, "iqn.2000-01.org.other:x", "10.0.0.1", True),
        # wrong portal group: no mapping for PG2
        (1, 2, "iqn.1991-05.com.microsoft:saturn", "192.168.2.5", False),
        # !ALL in the first mapped group denies everyone on PG2
        (2, 2, "iqn.1991-05.com.microsoft:venus", "10.0.0.1", False),
        # on PG1 only IG2 applies
        (2, 1, "iqn.1991-05.com.microsoft:venus", "10.0.0.1", True),
    ],
)
def test_access_allowed(load, lu_number, pg, name, ip, allowed):
    config = load(ACL)
    lu = config.logical_units[lu_number]
    assert access_allowed(config, lu, pg, name, ip) is allowed
    assert visible(config, lu, pg, name, ip) is allowed


def test_netmask_miss_without_other_allow_is_deny(load):
    config = load(ACL.replace("Mapping PortalGroup1 InitiatorGroup2\n  UnitType", "UnitType", 1))
    lu = config.logical_units[1]
    assert access_allowed(config, lu, 1, "iqn.1991-05.com.microsoft:saturn", "192.168.2.9")
    assert access_allowed(config, lu, 1, "iqn.1991-05.com.microsoft:saturn", "::ffff:192.168.2.9")
    assert not access_allowed(config, lu, 1, "iqn.1991-05.com.microsoft:saturn", "10.0.0.1")
    # SendTargets hides it too (C showed it: bug B31)
    assert not visible(config, lu, 1, "iqn.1991-05.com.microsoft:saturn", "10.0.0.1")


def test_visible_portal_groups(load):
    config = load(ACL)
    lu2 = config.logical_units[2]
    assert visible_portal_groups(config, lu2, "iqn.x:y", "10.0.0.1") == (1,)
    lu1 = config.logical_units[1]
    assert visible_portal_groups(config, lu1, "iqn.x:y", "10.0.0.1") == (1,)
    assert visible_portal_groups(config, lu1, "iqn.1991-05.com.microsoft:moon", "10.0.0.1") == ()


def test_initiator_group_helpers(load):
    group = load(ACL).initiator_groups[1]
    assert group.name_verdict("iqn.1991-05.com.microsoft:MOON") is False
    assert group.name_verdict("iqn.1991-05.com.microsoft:saturn") is True
    assert group.name_verdict("iqn.other:x") is None
    assert group.address_allowed("192.168.2.1") and not group.address_allowed("10.0.0.1")


def test_initiator_group_needs_names(load):
    error = error_of(load, MINIMAL.replace("  InitiatorName ALL\n", "  Netmask ALL\n"))
    assert (error.section, error.key) == ("InitiatorGroup1", "InitiatorName")


# --- auth.conf ----------------------------------------------------------------------


def test_load_auth(write):
    path = write(
        """\
        [AuthGroup1]
          Comment "g"
          Auth "iqn.1991-05.com.microsoft:saturn" "1234567890abcdef" \\
               "iqn.2007-09.jp.ne.peach:disk1" "mutualtestxx"
          Auth "athena" "abcdefghijklmnop"
          Auth "Athena" "shadowed"
          Auth "empty" "s" "" ""
        [AuthGroup2]
        """,
        "auth.conf",
    )
    auth = load_auth(path)
    entry = auth.lookup(1, "IQN.1991-05.com.microsoft:SATURN")
    assert (entry.secret, entry.mutual_user, entry.mutual_secret) == (
        "1234567890abcdef", "iqn.2007-09.jp.ne.peach:disk1", "mutualtestxx",
    )
    assert auth.lookup(1, "ATHENA").secret == "abcdefghijklmnop"
    assert auth.lookup(1, "empty").mutual_user is None
    assert auth.lookup(1, "nobody") is None
    assert auth.lookup(2, "athena") is None
    assert auth.lookup(3, "athena") is None


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('[AuthGroup1]\n  Auth "u" "s" "m"\n', 2, "got 3 values"),
        ('[AuthGroup1]\n  Auth "u"\n', 2, "got 1 values"),
        ('[AuthGroup1]\n  Auth "" "s"\n', 2, "empty user name"),
        ("[AuthGroup]\n", 1, "out of range"),
    ],
)
def test_auth_errors(write, text, line, fragment):
    with pytest.raises(ConfigError) as caught:
        load_auth(write(text, "auth.conf"))
    assert caught.value.line == line and fragment in str(caught.value)
    assert str(caught.value).startswith(f"{caught.value.path}:{line}: [AuthGroup")


def test_empty_auth_file(write):
    assert load_auth(write("", "auth.conf")).groups == {}


# --- istgtcontrol.conf ---------------------------------------------------------------


def test_load_control_config(write):
    config = load_control_config(
        write(
            """\
            [Global]
              Timeout 30
              AuthMethod CHAP Mutual
              Auth "user" "secret" "muser" "msecret"
              Host 127.0.0.1
              Port 3262
              ControlSocket var/istgt.sock
              TargetName "iqn.2007-09.jp.ne.peach:dvd1"
              Lun 1
              Flags "rw"
              Size "1GB"
            """,
            "istgtcontrol.conf",
        )
    )
    assert (config.host, config.port, config.timeout, config.lun) == ("127.0.0.1", 3262, 30, 1)
    assert config.socket_path == "var/istgt.sock"
    assert config.target_name == "iqn.2007-09.jp.ne.peach:dvd1"
    assert (config.flags, config.size) == ("rw", "1GB")
    assert config.auth == AuthSpec("chap", True, None)
    assert config.auth_entry.mutual_secret == "msecret"
    defaults = load_control_config(write("\n", "empty.conf"))
    assert (defaults.host, defaults.port, defaults.auth.method, defaults.auth_entry) == (
        "localhost", 3261, "none", None,
    )


# --- the project's own etc/ files ---------------------------------------------------

ETC = Path(__file__).resolve().parents[2] / "etc"


def test_default_config_of_make_run():
    config = load_config(ETC / "istgt.conf")
    assert (config.global_.pid_file, config.global_.auth_file) == ("var/istgt.pid", "etc/auth.conf")
    assert config.unit_control.socket_path == "var/istgt.sock"
    assert (config.global_.nop_in_interval, config.global_.timeout) == (20, 30)
    assert [p.display for p in config.portal_groups[1].portals] == ["127.0.0.1:3260", "[::1]:3260"]
    lu = config.logical_units[1]
    assert lu.name == "iqn.2007-09.jp.ne.peach.istgt:disk1"
    assert (lu.mappings, lu.auth.method, lu.unit_type, lu.queue_depth) == (((1, 1),), "auto", "disk", 32)
    assert (lu.luns[0].path, lu.luns[0].size) == ("var/disk1.img", 1 << 30)
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert access_allowed(config, lu, 1, "iqn.2000-01.org.any:host", peer)
    assert not access_allowed(config, lu, 1, "iqn.2000-01.org.any:host", "127.0.0.2")
    assert load_auth(ETC / "auth.conf").groups == {}
    assert load_control_config(ETC / "istgtcontrol.conf").socket_path == "var/istgt.sock"


def test_repeated_single_value_key_uses_first_and_warns_once(load, caplog):
    with caplog.at_level(logging.WARNING, logger="istgt.config"):
        lu = load(with_lu_lines("ReadOnly Yes", "ReadOnly No")).logical_units[1]
    assert lu.read_only is True
    assert caplog.text.count("ReadOnly: repeated key ignored (line 12 is used)") == 1


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["", "k", "M", "g", "T", "p", "E"]),
    st.sampled_from(["", "b", "B"]),
)
def test_parse_size_units_property(number, unit, suffix):
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}[unit.lower()]
    assert parse_size(f"{number}{unit}{suffix}") == min(number << shift, 2**64 - 1)


@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_parse_size_arithmetic_property(a, b):
    assert parse_size(f"{a}+{b}") == a + b
    assert parse_size(f"{a}-{b}") == max(a - b, 0)
