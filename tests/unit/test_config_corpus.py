"""Real-world istgt configs (tests/data/config-corpus, see SOURCES.md there).

Every entry either loads, or fails with a ConfigError naming file, line, section and
key.  The table below says which, and why.
"""

from pathlib import Path

import pytest

from istgt.config import (
    ConfigError,
    access_allowed,
    load_auth,
    load_config,
    load_control_config,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "config-corpus"
SHARED_CORPUS = Path("/work/shared/config-corpus")

LOADS = "loads"

# entry -> LOADS, or (line, section, key, message fragment) of the expected error
EXPECTED = {
    "01-debian-sample": LOADS,
    "02-debian-large-sample": LOADS,
    "03-upstream-sample-alternatives": LOADS,
    # fork sample: port 515500 does not fit in 16 bits (the Cloud LUN would fail next)
    "04-elastocloud-minimal": (9, "PortalGroup1", "Portal", "port 515500 is out of range 1..65535"),
    # OpenEBS/cStor: host-name portals are refused (C listens with AI_NUMERICHOST too)
    "05-openebs-src-sample": (27, "UnitControl", "Portal", "host 'localhost' is not a numeric IP"),
    "06-cstor-old": (27, "UnitControl", "Portal", "host 'localhost' is not a numeric IP"),
    "07-cstor-user-misc": (27, "UnitControl", "Portal", "host 'localhost' is not a numeric IP"),
    "08-openebs-init-sh-rendered": (28, "UnitControl", "Netmask", "invalid netmask 'localhost/8'"),
    # `Netmask "None"` can never match anything: an error rather than a silent deny
    "09-openebs-maya-rendered": (42, "InitiatorGroup2", "Netmask", "invalid netmask 'None'"),
    "10-freenas8-simple": LOADS,
    "11-freenas8-chap-multiportal": LOADS,
    "12-proxmox-zfs-over-iscsi": LOADS,
    "13-freenas8-dvd-extent": LOADS,
    "14-upstream-pass-through": LOADS,
}


def test_every_corpus_entry_has_an_expectation():
    entries = {path.name for path in CORPUS.iterdir() if path.is_dir()}
    assert entries == set(EXPECTED)


@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="shared corpus only on the dev host")
def test_repository_copy_matches_shared_corpus():
    shared = {
        path.relative_to(SHARED_CORPUS): path.read_bytes()
        for path in SHARED_CORPUS.rglob("*")
        if path.is_file()
    }
    copy = {path.relative_to(CORPUS): path.read_bytes() for path in CORPUS.rglob("*") if path.is_file()}
    assert copy == shared


@pytest.mark.parametrize("entry", sorted(EXPECTED))
def test_corpus_istgt_conf(entry):
    path = CORPUS / entry / "istgt.conf"
    expected = EXPECTED[entry]
    if expected == LOADS:
        config = load_config(path)
        assert config.logical_units
        return
    line, section, key, fragment = expected
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert (error.path, error.line, error.section, error.key) == (str(path), line, section, key)
    assert str(error).startswith(f"{path}:{line}: [{section}] {key}: ")
    assert fragment in str(error)


@pytest.mark.parametrize(
    "path", sorted(CORPUS.glob("*/auth.conf")), ids=lambda p: p.parent.name
)
def test_corpus_auth_conf_loads(path):
    load_auth(path)


@pytest.mark.parametrize(
    "path", sorted(CORPUS.glob("*/istgtcontrol.conf")), ids=lambda p: p.parent.name
)
def test_corpus_istgtcontrol_conf_loads(path):
    load_control_config(path)


def test_proxmox_before_file_loads():
    config = load_config(CORPUS / "12-proxmox-zfs-over-iscsi" / "istgt.conf.before")
    assert config.logical_units[1].luns[0].path == "/dev/zvol/tank/vm-100-disk-1"


# --- specific values ----------------------------------------------------------------


def test_debian_sample_values():
    config = load_config(CORPUS / "01-debian-sample" / "istgt.conf")
    g = config.global_
    assert (g.node_base, g.pid_file, g.auth_file, g.log_facility) == (
        "iqn.2007-09.jp.ne.peach.istgt", "/var/run/istgt.pid", "/etc/istgt/auth.conf", "local7",
    )
    assert (g.timeout, g.max_sessions, g.max_r2t, g.iscsi.max_connections) == (30, 16, 32, 4)
    assert (g.iscsi.first_burst_length, g.iscsi.max_burst_length) == (262144, 1048576)
    assert g.iscsi.default_time2retain == 60
    uc = config.unit_control
    assert [p.display for p in uc.portals] == ["127.0.0.1:3261"]
    assert (uc.auth.method, uc.auth.mutual, uc.auth.group) == ("chap", True, 10000)
    assert [p.display for p in config.portal_groups[1].portals] == ["192.168.2.36:3260"]
    lu = config.logical_units[1]
    assert lu.name == "iqn.2007-09.jp.ne.peach.istgt:disk1"
    assert lu.alias == "Data Disk1"
    assert lu.mappings == ((1, 1),)
    assert (lu.auth.method, lu.auth.group) == ("auto", 1)
    assert lu.luns[0].size == 10 * 2**30
    assert access_allowed(config, lu, 1, "iqn.1991-05.com.microsoft:saturn", "192.168.2.10")
    assert not access_allowed(config, lu, 1, "iqn.1991-05.com.microsoft:saturn", "192.168.3.10")

    auth = load_auth(CORPUS / "01-debian-sample" / "auth.conf")
    saturn = auth.lookup(1, "iqn.1991-05.com.microsoft:saturn")
    assert (saturn.secret, saturn.mutual_user, saturn.mutual_secret) == (
        "1234567890abcdef", "iqn.2007-09.jp.ne.peach:disk1", "mutualtestxx",
    )
    assert auth.lookup(10000, "onlysingle").mutual_user is None


def test_debian_large_sample_values():
    config = load_config(CORPUS / "02-debian-large-sample" / "istgt.conf")
    assert list(config.portal_groups) == [1, 2, 3, 10]
    assert len(config.portal_groups[1].portals) == 4
    assert [p.host for p in config.portal_groups[2].portals] == [
        "2001:03e0:06cf:0003:021b:21ff:fe04:f405",
        "2001:03e0:06cf:0004:021f:d0ff:fe16:38bd",
    ]
    assert config.portal_groups[2].portals[0].display == "[2001:03e0:06cf:0003:021b:21ff:fe04:f405]:3260"
    assert list(config.initiator_groups) == [1, 2, 3, 4, 5, 6, 256]
    assert config.initiator_groups[2].netmasks[0].matches("2001:3e0:6cf:2::1")
    assert list(config.logical_units) == [1, 2, 3, 4, 10, 11]

    disk1 = config.logical_units[1]
    assert disk1.mappings == ((3, 1), (1, 1))
    assert (disk1.header_digest, disk1.data_digest) == ("required", "required")
    assert (disk1.auth.method, disk1.auth.mutual) == ("chap", False)
    assert sorted(disk1.luns) == [0, 2]
    assert (disk1.luns[0].rpm, disk1.luns[0].form_factor) == (7200, 2)
    assert disk1.luns[2].serial == "10000001L2"

    disk2 = config.logical_units[2]
    assert disk2.name == "iqn.1994-04.org.netbsd.iscsi-target:target11"
    assert disk2.mappings == ((1, 5), (2, 5), (3, 5))
    assert disk2.auth.group is None
    assert disk2.luns[0].size == 20 * 2**30 - 2**20

    dvd = config.logical_units[3]
    assert (dvd.unit_type, dvd.read_only, dvd.block_length) == ("dvd", True, 2048)
    assert (dvd.luns[0].kind, dvd.luns[0].flags, dvd.luns[0].size) == ("removable", ("ro",), None)

    tape = config.logical_units[4]
    assert tape.unit_type == "tape"
    assert (tape.luns[0].flags, tape.luns[0].size) == (("rw",), 2**30)
    assert tape.inquiry.serial == "CX10000004"
    assert config.logical_units[10].inquiry.serial == "10000010"


def test_alternatives_sample_values():
    config = load_config(CORPUS / "03-upstream-sample-alternatives" / "istgt.conf")
    assert config.global_.discovery_auth.group == 9999
    assert [p.display for p in config.unit_control.portals] == ["[::1]:3261"]
    group = config.initiator_groups[1]
    assert group.names == ("!iqn.1991-05.com.microsoft:moon", "iqn.1991-05.com.microsoft:saturn")
    lu = config.logical_units[1]
    assert not access_allowed(config, lu, 1, "iqn.1991-05.com.microsoft:moon", "192.168.2.1")
    assert access_allowed(config, lu, 1, "iqn.1991-05.com.microsoft:saturn", "2001:3e0:6cf:3::7")
    assert lu.queue_depth == 32
    assert (lu.luns[1].size, lu.luns[1].read_cache, lu.luns[1].write_cache) == (None, False, False)
    assert lu.luns[1].serial == "10000001L1"


def test_freenas_values():
    simple = load_config(CORPUS / "10-freenas8-simple" / "istgt.conf")
    lu = simple.logical_units[1]
    assert lu.name == "iqn.2011-03.example.org.istgt:target0"
    assert (lu.inquiry.product, lu.luns[0].serial, lu.luns[0].size) == ("iSCSI Disk", "100000010", 20 * 2**30)
    assert simple.portal_groups[1].portals[0].is_wildcard

    chap = load_config(CORPUS / "11-freenas8-chap-multiportal" / "istgt.conf")
    assert [p.display for p in chap.portal_groups[1].portals] == [
        "192.168.10.5:3260", "[2001:db8:10::5]:3260",
    ]
    assert chap.global_.discovery_auth.method == "chap"
    hyperv = chap.logical_units[1]
    assert (hyperv.auth.method, hyperv.auth.mutual, hyperv.auth.group) == ("chap", True, 2)
    assert (hyperv.luns[0].size, hyperv.luns[1].size) == (None, 512 * 2**20)
    backup = chap.logical_units[2]
    assert (backup.read_only, backup.block_length, backup.queue_depth) == (True, 4096, 0)
    assert access_allowed(chap, hyperv, 1, "iqn.1998-01.com.vmware:esx01-1b2c3d4e", "10.1.2.3")
    assert not access_allowed(chap, hyperv, 2, "iqn.1998-01.com.vmware:esx01-1b2c3d4e", "10.1.2.3")
    auth = load_auth(CORPUS / "11-freenas8-chap-multiportal" / "auth.conf")
    assert auth.lookup(1, "discover").mutual_user is None

    dvd = load_config(CORPUS / "13-freenas8-dvd-extent" / "istgt.conf").logical_units[1]
    assert (dvd.unit_type, dvd.luns[0].kind, dvd.luns[0].flags) == ("dvd", "removable", ("ro",))


def test_proxmox_values():
    lu = load_config(CORPUS / "12-proxmox-zfs-over-iscsi" / "istgt.conf").logical_units[1]
    assert lu.auth.group is None  # `AuthGroup ` with no value
    assert lu.auth.method == "auto"
    assert [lun.size for lun in lu.luns.values()] == [None, None]
    assert (lu.luns[0].write_cache, lu.luns[1].write_cache) == (True, False)
    assert (lu.luns[0].serial, lu.luns[1].serial) == ("100000010", "10000001L1")


def test_pass_through_values():
    config = load_config(CORPUS / "14-upstream-pass-through" / "istgt.conf")
    passthrough = config.logical_units[2]
    assert (passthrough.unit_type, passthrough.queue_depth) == ("pass", 0)
    assert (passthrough.luns[0].kind, passthrough.luns[0].path) == ("device", "/dev/da0")


@pytest.mark.parametrize(
    ("entry", "line", "fragment"),
    [
        ("05-openebs-src-sample", 60, "looks like a size"),
        ("06-cstor-old", 60, "got 3 values"),
        ("08-openebs-init-sh-rendered", 60, "looks like a size"),
    ],
)
def test_openebs_lun_line_is_refused_once_portals_are_numeric(tmp_path, entry, line, fragment):
    text = (CORPUS / entry / "istgt.conf").read_text()
    text = text.replace("localhost", "127.0.0.1").replace('Netmask "None"', "Netmask ALL")
    path = tmp_path / "istgt.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.line, caught.value.section, caught.value.key) == (line, "LogicalUnit2", "LUN0")
    assert fragment in str(caught.value)
