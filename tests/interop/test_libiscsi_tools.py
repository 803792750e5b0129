"""libiscsi's command-line initiators against the Python target: discovery, INQUIRY, capacity,
with no authentication, one-way CHAP, mutual CHAP and header digests."""
from __future__ import annotations

import re
import uuid

import pytest

from tests.interop.conftest import (CHAP_SECRET, CHAP_USER, MIB, MUTUAL_SECRET, MUTUAL_USER,
                                    NODE_BASE, TARGET_SECRET, TARGET_USER, InteropTarget,
                                    run_tool)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

CHAP_CREDENTIALS = f"{CHAP_USER}%{CHAP_SECRET}"
MUTUAL_CREDENTIALS = f"{MUTUAL_USER}%{MUTUAL_SECRET}"
MUTUAL_ENV = {"LIBISCSI_CHAP_TARGET_USERNAME": TARGET_USER,
              "LIBISCSI_CHAP_TARGET_PASSWORD": TARGET_SECRET}


def unique_initiator(tag: str) -> str:
    """An initiator name that finds this test's login line in the target's log."""
    return f"iqn.2024-01.org.example.interop:{tag}-{uuid.uuid4().hex[:8]}"


def login_lines(target: InteropTarget, initiator: str) -> list[str]:
    return [line for line in target.log_text().splitlines()
            if "Login from" in line and initiator in line]


def assert_ok(result) -> str:
    assert result.returncode == 0, (f"{result.args} exited {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result.stdout


def readcapacity(url: str, **kwargs) -> dict[str, str]:
    output = assert_ok(run_tool(["iscsi-readcapacity16", url], **kwargs))
    fields = dict(re.findall(r"^([A-Z][A-Z _]+):\s*(\S+)\s*$", output, re.MULTILINE))
    fields["Total size"] = re.search(r"Total size:(\d+)", output).group(1)
    return fields


# -- discovery --------------------------------------------------------------------------

def test_iscsi_ls_lists_every_target_with_its_portals(interop_target):
    output = assert_ok(run_tool(["iscsi-ls", interop_target.portal_url()]))
    targets = set(re.findall(r"^Target:(\S+) Portal:", output, re.MULTILINE))
    assert targets == {f"{NODE_BASE}:disk", f"{NODE_BASE}:hdigest"}, output


def test_iscsi_ls_on_the_chap_portal_lists_only_its_targets(interop_target):
    output = assert_ok(run_tool(["iscsi-ls", interop_target.portal_url(chap_portal=True)]))
    targets = set(re.findall(r"^Target:(\S+) Portal:", output, re.MULTILINE))
    assert targets == {f"{NODE_BASE}:chap", f"{NODE_BASE}:mutual", f"{NODE_BASE}:digest"}
    # the portal group tag is the TPGT
    assert f"127.0.0.1:{interop_target.chap_port},2" in output


def test_iscsi_ls_over_ipv6_shows_luns(interop_target):
    output = assert_ok(run_tool(["iscsi-ls", "-s", interop_target.portal_url("[::1]")]))
    # SendTargets answers every portal of the group, IPv4 and IPv6; iscsi-ls lists the LUNs
    # behind each (target, portal) pair after a normal login.
    listed = re.findall(r"^Target:(\S+) Portal:(\S+)\n\s*Lun:(\d+)\s+Type:(\S+)", output,
                        re.MULTILINE)
    port = interop_target.port
    assert sorted(listed) == sorted(
        (f"{NODE_BASE}:{name}", portal, "0", "DIRECT_ACCESS")
        for name in ("disk", "hdigest")
        for portal in (f"127.0.0.1:{port},1", f"[::1]:{port},1")), output


# -- INQUIRY --------------------------------------------------------------------------

def test_standard_inquiry(interop_target):
    output = assert_ok(run_tool(["iscsi-inq", interop_target.lun_url("disk")]))
    assert "Peripheral Device Type:DIRECT_ACCESS" in output
    assert "Peripheral Qualifier:CONNECTED" in output
    assert "Removable:0" in output
    assert re.search(r"^Vendor:\S", output, re.MULTILINE), output
    assert re.search(r"^Product:\S", output, re.MULTILINE), output


def vpd(interop_target, page: int, unit: str = "disk") -> str:
    return assert_ok(run_tool(["iscsi-inq", "-e", "1", "-c", str(page),
                               interop_target.lun_url(unit)]))


def test_vpd_supported_pages_lists_the_mandatory_pages(interop_target):
    output = vpd(interop_target, 0x00)
    for page in ("0x00", "0x80", "0x83", "0xb0"):
        assert f"Page:{page} " in output, output


def serial_number(interop_target, unit: str) -> str:
    output = vpd(interop_target, 0x80, unit)
    found = re.search(r"^Unit Serial Number:\[(.+)\]$", output, re.MULTILINE)
    assert found and found.group(1).strip(), output
    return found.group(1)


def test_vpd_unit_serial_numbers_differ_between_logical_units(interop_target):
    assert serial_number(interop_target, "disk") != serial_number(interop_target, "hdigest")


def test_vpd_device_identification(interop_target):
    output = vpd(interop_target, 0x83)
    designators = re.findall(r"^Association:\(\d\) (\S+)\nDesignator Type:\(\d+\) (\S+)\n"
                             r"Designator:\[(.*)\]$", output, re.MULTILINE)
    by_kind = {(association, kind): value for association, kind, value in designators}
    # SPC-4 7.8.6: the target device and the target port by SCSI name, and the LU itself.
    assert by_kind.get(("TARGET_DEVICE", "SCSI_NAME_STRING")) == f"{NODE_BASE}:disk", output
    assert by_kind.get(("TARGET_PORT", "SCSI_NAME_STRING")) == f"{NODE_BASE}:disk,t,0x0001"
    assert any(association == "LOGICAL_UNIT" for association, _, _ in designators), output


def test_vpd_block_limits(interop_target):
    output = vpd(interop_target, 0xB0)
    limits = dict(re.findall(r"^([a-z ]+):(\d+)$", output, re.MULTILINE))
    assert int(limits["maximum transfer length"]) > 0, output
    assert int(limits["optimal transfer length granularity"]) > 0, output


# -- READ CAPACITY (16) -------------------------------------------------------------------

def test_readcapacity16_matches_the_configured_size(interop_target):
    fields = readcapacity(interop_target.lun_url("disk"))
    assert fields["LOGICAL BLOCK LENGTH IN BYTES"] == "512"
    assert int(fields["RETURNED LOGICAL BLOCK ADDRESS"]) == 256 * MIB // 512 - 1
    assert int(fields["Total size"]) == 256 * MIB


def test_readcapacity16_over_ipv6(interop_target):
    fields = readcapacity(interop_target.lun_url("disk", host="[::1]"))
    assert int(fields["Total size"]) == 256 * MIB


# -- CHAP -----------------------------------------------------------------------------

def test_chap_login_succeeds_with_the_right_secret(interop_target):
    url = interop_target.lun_url("chap", credentials=CHAP_CREDENTIALS)
    assert int(readcapacity(url)["Total size"]) == 256 * MIB
    assert "DIRECT_ACCESS" in assert_ok(run_tool(["iscsi-inq", url]))


def test_chap_credentials_from_the_environment(interop_target):
    env = {"LIBISCSI_CHAP_USERNAME": CHAP_USER, "LIBISCSI_CHAP_PASSWORD": CHAP_SECRET}
    fields = readcapacity(interop_target.lun_url("chap"), env=env)
    assert int(fields["Total size"]) == 256 * MIB


@pytest.mark.parametrize("credentials", [
    f"{CHAP_USER}%wrongsecret123",
    f"nosuchuser%{CHAP_SECRET}",
    "",
])
def test_chap_login_is_refused_without_the_right_credentials(interop_target, credentials):
    result = run_tool(["iscsi-readcapacity16",
                       interop_target.lun_url("chap", credentials=credentials)])
    assert result.returncode != 0
    assert "Total size" not in result.stdout
    assert re.search(r"[Aa]uthentication|[Ll]og ?in", result.stdout + result.stderr)


def test_mutual_chap_with_target_credentials_in_the_environment(interop_target):
    url = interop_target.lun_url("mutual", credentials=MUTUAL_CREDENTIALS)
    fields = readcapacity(url, env=MUTUAL_ENV)
    assert int(fields["Total size"]) == 64 * MIB
    assert "DIRECT_ACCESS" in assert_ok(run_tool(["iscsi-inq", url], env=MUTUAL_ENV))


def test_mutual_chap_with_target_credentials_in_the_url(interop_target):
    url = interop_target.lun_url(
        "mutual", credentials=MUTUAL_CREDENTIALS,
        query=f"target_user={TARGET_USER}&target_password={TARGET_SECRET}")
    assert int(readcapacity(url)["Total size"]) == 64 * MIB


def test_mutual_chap_refuses_a_one_way_login(interop_target):
    url = interop_target.lun_url("mutual", credentials=MUTUAL_CREDENTIALS)
    result = run_tool(["iscsi-readcapacity16", url])
    assert result.returncode != 0
    assert "Total size" not in result.stdout


def test_mutual_chap_initiator_rejects_a_target_with_the_wrong_secret(interop_target):
    # The initiator checks the target's answer: a wrong target secret on our side must fail.
    url = interop_target.lun_url("mutual", credentials=MUTUAL_CREDENTIALS)
    env = dict(MUTUAL_ENV, LIBISCSI_CHAP_TARGET_PASSWORD="notthesecret12")
    result = run_tool(["iscsi-readcapacity16", url], env=env)
    assert result.returncode != 0
    assert "Total size" not in result.stdout


def test_mutual_chap_refuses_a_wrong_initiator_secret(interop_target):
    url = interop_target.lun_url("mutual", credentials=f"{MUTUAL_USER}%wrongsecret123")
    result = run_tool(["iscsi-readcapacity16", url], env=MUTUAL_ENV)
    assert result.returncode != 0


# -- digests --------------------------------------------------------------------------

def test_header_digest_required_by_the_target_is_negotiated(interop_target):
    # libiscsi's tools offer "None,CRC32C" whatever the URL says (1.19 overrides the URL's
    # header_digest); a target that allows only CRC32C must pick it.
    initiator = unique_initiator("hdigest")
    url = interop_target.lun_url("hdigest")
    output = assert_ok(run_tool(["iscsi-inq", "-i", initiator, url]))
    assert "DIRECT_ACCESS" in output
    fields = readcapacity(url)
    assert int(fields["Total size"]) == 256 * MIB
    lines = login_lines(interop_target, initiator)
    assert lines and all("HeaderDigest=on" in line for line in lines), lines


def test_no_digest_by_default_on_an_auto_unit(interop_target):
    initiator = unique_initiator("nodigest")
    assert_ok(run_tool(["iscsi-inq", "-i", initiator, interop_target.lun_url("disk")]))
    lines = login_lines(interop_target, initiator)
    assert lines and all("HeaderDigest=off" in line for line in lines), lines


def test_data_digest_required_refuses_an_initiator_without_it(interop_target):
    # libiscsi 1.19 only ever offers DataDigest=None; UseDigest Data allows only CRC32C.
    result = run_tool(["iscsi-inq", interop_target.lun_url("digest")])
    assert result.returncode != 0
    assert "DIRECT_ACCESS" not in result.stdout
