"""ImageBackend's mapping of SCSI durability and provisioning onto NBD requests (issue 8):
SYNCHRONIZE CACHE is FLUSH, FUA is the FUA flag, UNMAP is WRITE_ZEROES that may deallocate
(every format reads zeros after it), WRITE SAME zero keeps the blocks allocated."""

from types import SimpleNamespace

import pytest

from istgt.lu import nbd
from istgt.lu.images import FORMATS, ImageBackend, image_format


class RecordingClient:
    def __init__(self, flags):
        self.export = SimpleNamespace(flags=flags, size=1 << 20)
        self.requests = []

    def request(self, command, offset, length, flags=0, payload=None, into=None):
        self.requests.append((command, offset, length, flags))
        if into is not None:
            into[:] = bytes(len(into))


ALL = nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_FUA | nbd.FLAG_SEND_WRITE_ZEROES | nbd.FLAG_SEND_TRIM


def backend(flags=ALL, read_only=False):
    client = RecordingClient(flags)
    return ImageBackend("/x/disk.qcow2", None, client, 1 << 20, read_only), client


def test_durable_write_is_one_fua_write():
    store, client = backend()
    store.write_durable(4096, b"x" * 512)
    assert client.requests == [(nbd.CMD_WRITE, 4096, 512, nbd.CMD_FLAG_FUA)]


def test_durable_write_without_fua_support_is_write_then_flush():
    store, client = backend(ALL & ~nbd.FLAG_SEND_FUA)
    store.write_durable(0, b"x" * 512)
    assert [r[0] for r in client.requests] == [nbd.CMD_WRITE, nbd.CMD_FLUSH]


def test_flush_and_stable_read():
    store, client = backend()
    store.flush()
    store.read_stable(512, 1024)
    assert client.requests == [(nbd.CMD_FLUSH, 0, 0, 0), (nbd.CMD_FLUSH, 0, 0, 0),
                               (nbd.CMD_READ, 512, 1024, 0)]


def test_unmap_may_deallocate_and_write_zeroes_may_not():
    store, client = backend()
    assert store.supports_unmap and store.unmap_zeroes
    store.unmap(0, 8192)
    store.write_zeroes(8192, 4096, durable=True)
    assert client.requests == [(nbd.CMD_WRITE_ZEROES, 0, 8192, 0),
                               (nbd.CMD_WRITE_ZEROES, 8192, 4096,
                                nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)]


def test_huge_zeroing_is_split_into_32_bit_lengths():
    store, client = backend()
    store.unmap(0, 3 << 30)
    assert [r[2] for r in client.requests] == [1 << 30] * 3


def test_no_unmap_without_write_zeroes_or_when_read_only():
    assert not backend(nbd.FLAG_SEND_FLUSH)[0].supports_unmap
    assert not backend(read_only=True)[0].supports_unmap


@pytest.mark.parametrize("path, driver", [("a.VHD", "vpc"), ("b.qcow", "qcow"),
                                          ("c.qcow2", "qcow2"), ("d.img", None), ("e", None)])
def test_format_follows_the_extension(path, driver):
    assert image_format(path) == driver
    assert len(FORMATS) == 7


@pytest.mark.parametrize("path, nodes", [
    ("rbd:rbd/disk0", {"pool": "rbd", "image": "disk0", "read-only": False}),
    ("rbd:rbd/ns1/disk0@snap1:id=gw:conf=/etc/ceph/a\\:b.conf",
     {"pool": "rbd", "namespace": "ns1", "image": "disk0", "snapshot": "snap1", "user": "gw",
      "conf": "/etc/ceph/a:b.conf", "read-only": True}),
])
def test_rbd_locations_in_qemus_form(path, nodes):
    from istgt.lu.images import RbdImage, image_location
    location = image_location(path)
    assert isinstance(location, RbdImage) and location.key == path
    (node,) = location.nodes(read_only=False)
    assert node["driver"] == "rbd" and {k: node[k] for k in nodes} == nodes
    assert location.forced_read_only == ("@" in path)
