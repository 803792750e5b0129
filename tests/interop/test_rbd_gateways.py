"""Two gateways (target processes on different portals) exporting one RBD image as one LU
(issue 8): libiscsi's persistent reservation and multipath tests with one path through each
gateway, ALUA states across the gateways, and a multipath failover that loses no
acknowledged write."""
from __future__ import annotations

import os
import struct
import time

import pytest

from tests.functional.initiator import Initiator
from tests.interop import conformance_runner as runner
from tests.interop.conftest import (
    MIB, InteropTarget, LuSpec, require_tool, start_target, stop_target,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

SIZE = 64 * MIB
GOOD = 0
RTPG = bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
SHARED_TESTS = ("ALL.Prin", "ALL.Prout", "ALL.MultipathIO")


def gateway(tmp_path, cluster, image, portal_group, name):
    unit = LuSpec("gw", SIZE, portal_group=portal_group, extra=("AuthMethod None",),
                  image=f"rbd:rbd/{image}:conf={cluster.conf}")
    target = start_target(tmp_path / name, (unit,))
    return target, InteropTarget(target, {"gw": unit}).lun_url("gw"), unit


@pytest.fixture
def two_gateways(ceph_cluster, tmp_path, request):
    image = request.node.name.split("[")[0][-40:].replace("_", "-")
    first = gateway(tmp_path, ceph_cluster, image, 1, "gateway1")
    second = gateway(tmp_path, ceph_cluster, image, 2, "gateway2")
    yield first, second
    for target, _, _ in (second, first):
        if target.process.poll() is None:
            stop_target(target)


def session_to(target, unit, name):
    port = target.layout.port if unit.portal_group == 1 else target.layout.chap_port
    initiator = Initiator("127.0.0.1", port, initiator_name=name, timeout=10)
    initiator.login(unit.iqn)
    for _ in range(4):                                   # the nexus's power-on attention
        if initiator.tur().status == GOOD:
            break
    return initiator


def port_group_states(initiator) -> dict[int, int]:
    result = initiator.scsi(RTPG, read_length=4096)
    assert result.status == GOOD, result.sense.hex()
    states, position = {}, 4
    while position + 8 <= 4 + struct.unpack_from(">I", result.data)[0]:
        state, _, group = result.data[position] & 0x0F, result.data[position + 1], \
            struct.unpack_from(">H", result.data, position + 2)[0]
        states[group] = state
        position += 8 + 4 * result.data[position + 7]
    return states


def test_persistent_reservation_and_multipath_tests_pass_across_two_gateways(two_gateways):
    require_tool("iscsi-test-cu")
    (_, url1, _), (_, url2, _) = two_gateways
    tests = [t for t in runner.list_tests() if t.startswith(SHARED_TESTS)]
    assert len(tests) > 20, tests
    failures = []
    for test in tests:
        outcome = runner.run_one(test, url1, mpath_url=url2)
        if outcome.result is not runner.Result.PASS:
            failures.append(f"{test}: {outcome.result.name} {outcome.reason}")
    assert not failures, "\n".join(failures)


def test_alua_names_one_optimized_gateway_and_fails_over(two_gateways):
    (target1, _, unit1), (target2, _, unit2) = two_gateways
    one = session_to(target1, unit1, "iqn.2024-01.org.example:mpath")
    two = session_to(target2, unit2, "iqn.2024-01.org.example:mpath")
    assert port_group_states(one) == {1: 0, 2: 1} == port_group_states(two)   # AO, ANO
    acknowledged = {}
    for index in range(200):                      # I/O through the optimized gateway
        payload = os.urandom(4096)
        assert one.write10(index * 8, payload).status == GOOD
        acknowledged[index * 8] = payload
    target1.kill()                                # gateway 1 dies without a word
    deadline = time.monotonic() + 15
    while port_group_states(two) != {2: 0} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert port_group_states(two) == {2: 0}       # gateway 2 is the optimized one now
    for index in range(200, 300):                 # I/O continues through gateway 2
        payload = os.urandom(4096)
        assert two.write10(index * 8, payload).status == GOOD
        acknowledged[index * 8] = payload
    lost = [lba for lba, payload in acknowledged.items() if two.read10(lba, 8).data != payload]
    assert not lost, f"{len(lost)} acknowledged writes lost, first at LBA {lost[0]}"
