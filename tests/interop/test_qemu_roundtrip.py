"""Data round trips through QEMU's iSCSI block driver (libiscsi): 256 MiB of seeded random data
written with `qemu-img convert`, read back the same way, compared byte for byte with what was
sent and with the target's backing file."""
from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.conftest import (CHAP_SECRET, CHAP_USER, MIB, MUTUAL_SECRET, MUTUAL_USER,
                                    InteropTarget, run_tool)

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(300)]

IMAGE_BYTES = 256 * MIB
QEMU_TIMEOUT_S = 180.0


def write_seeded_image(path: Path, size: int, seed: int) -> str:
    """Fill `path` with reproducible random bytes; returns their SHA-256."""
    generator = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as image:
        for _ in range(size // MIB):
            chunk = generator.randbytes(MIB)
            digest.update(chunk)
            image.write(chunk)
    return digest.hexdigest()


def sha256_of(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = limit if limit is not None else float("inf")
    with open(path, "rb") as image:
        while remaining > 0:
            chunk = image.read(int(min(MIB, remaining)))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Route:
    """How qemu-img reaches a LU: a plain libiscsi URL, or driver options (--image-opts)."""
    unit: str
    host: str = "127.0.0.1"
    chap: bool = False
    header_digest: bool = False

    def initiator_name(self) -> str:
        return f"iqn.2024-01.org.example.qemu:{self.unit}-{uuid.uuid4().hex[:8]}"

    def uses_options(self) -> bool:
        return self.header_digest

    def url(self, target: InteropTarget) -> str:
        credentials = f"{CHAP_USER}%{CHAP_SECRET}" if self.chap else ""
        return target.lun_url(self.unit, host=self.host, credentials=credentials)

    def options(self, target: InteropTarget, initiator: str) -> str:
        unit = target.units[self.unit]
        port = target.port if unit.portal_group == 1 else target.chap_port
        parts = ["driver=iscsi", "transport=tcp", f"portal={self.host}:{port}",
                 f"target={unit.iqn}", "lun=0", f"initiator-name={initiator}"]
        if self.header_digest:
            parts.append("header-digest=crc32c")
        if self.chap:
            parts += [f"user={CHAP_USER}", "password-secret=chapsecret"]
        return ",".join(parts)

    def secret_objects(self) -> list[str]:
        return ["--object", f"secret,id=chapsecret,data={CHAP_SECRET}"] if self.chap else []


def qemu_write(route: Route, target: InteropTarget, source: Path, initiator: str) -> None:
    command = ["qemu-img", "convert", *route.secret_objects(), "-n", "-f", "raw"]
    if route.uses_options():
        command += ["--target-image-opts", str(source), route.options(target, initiator)]
    else:
        command += ["-O", "raw", str(source), route.url(target)]
    result = run_tool(command, timeout=QEMU_TIMEOUT_S)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"


def qemu_read(route: Route, target: InteropTarget, destination: Path, initiator: str) -> None:
    command = ["qemu-img", "convert", *route.secret_objects(), "-O", "raw"]
    if route.uses_options():
        command += ["--image-opts", route.options(target, initiator), str(destination)]
    else:
        command += ["-f", "raw", route.url(target), str(destination)]
    result = run_tool(command, timeout=QEMU_TIMEOUT_S)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"


ROUTES = {
    "plain": Route("disk"),
    "ipv6": Route("disk", host="[::1]"),
    "chap": Route("chap", chap=True),
    "header-digest-asked-by-initiator": Route("disk", header_digest=True),
    "header-digest-required-by-target": Route("hdigest", header_digest=True),
    "chap-and-header-digest": Route("chap", chap=True, header_digest=True),
}


def route_seed(name: str) -> int:
    """A distinct, stable seed per route so one route's data can never pass for another's."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


@pytest.mark.parametrize("name", list(ROUTES))
def test_qemu_round_trip(interop_target, tmp_path, name):
    route = ROUTES[name]
    source, copy = tmp_path / "source.img", tmp_path / "copy.img"
    seed = route_seed(name)
    sent = write_seeded_image(source, IMAGE_BYTES, seed)
    initiator = route.initiator_name()
    try:
        qemu_write(route, interop_target, source, initiator)
        backing = interop_target.target.layout.disk_path(interop_target.units[route.unit])
        assert sha256_of(backing, IMAGE_BYTES) == sent, "the backing file differs from the data sent"
        qemu_read(route, interop_target, copy, initiator)
        assert copy.stat().st_size == IMAGE_BYTES
        assert sha256_of(copy) == sent, "the data read back differs from the data written"
    finally:
        source.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)
    logins = [line for line in interop_target.log_text().splitlines()
              if "Login from" in line and initiator in line]
    if route.header_digest:
        assert logins and all("HeaderDigest=on" in line for line in logins), logins


def test_qemu_without_mutual_chap_is_refused_by_a_mutual_unit(interop_target, tmp_path):
    # QEMU's iSCSI driver has no option for the target's CHAP secret, so it can only do one-way
    # CHAP: a LU that requires mutual CHAP must refuse it.
    url = interop_target.lun_url("mutual", credentials=f"{MUTUAL_USER}%{MUTUAL_SECRET}")
    result = run_tool(["qemu-img", "info", "-f", "raw", url], timeout=60)
    assert result.returncode != 0
    assert "virtual size" not in result.stdout


def test_qemu_with_a_wrong_chap_secret_is_refused(interop_target):
    url = interop_target.lun_url("chap", credentials=f"{CHAP_USER}%wrongsecret123")
    result = run_tool(["qemu-img", "info", "-f", "raw", url], timeout=60)
    assert result.returncode != 0
    assert "virtual size" not in result.stdout


def test_qemu_info_reports_the_configured_size(interop_target):
    result = run_tool(["qemu-img", "info", "-f", "raw", interop_target.lun_url("disk")])
    assert result.returncode == 0, result.stderr
    assert f"({IMAGE_BYTES} bytes)" in result.stdout, result.stdout
