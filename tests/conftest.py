"""Fixtures shared by the functional and interop suites."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ceph_one_node import Cluster  # noqa: E402


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory):
    """One one-node Ceph cluster (mon + memstore OSD on loopback, pool "rbd") for the whole
    run, started on first use and killed by pid at the end. CI installs Ceph (make test):
    a missing daemon is a failure, never a skip."""
    for tool in ("ceph-mon", "ceph-osd", "ceph", "rbd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make test` (it installs ceph-mon, "
                        "ceph-osd and ceph-common)", pytrace=False)
    cluster = Cluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start(memory_mib=768)
        yield cluster
    finally:
        cluster.stop()
