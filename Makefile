# The two commands of the README: `make run` and `make test`. Both are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DISK := var/disk1.img
CONFIG := etc/istgt.conf
# Debian packages that give the test suite real initiators and the C istgt to compare with.
TEST_PACKAGES := libiscsi-bin qemu-utils qemu-block-extra istgt tgt strace
# qemu-storage-daemon (serves disk image and RBD LUs), a one-node Ceph for the RBD tests
# (tools/ceph_one_node.py), and the QEMU guest with SCSI devices for the pass-through tests
# (tools/guest.py); their recommends would pull in a hundred more packages.
IMAGE_PACKAGES := qemu-system-common ceph-mon ceph-osd ceph-common qemu-system-x86 debootstrap \
	e2fsprogs
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: run test venv test-venv test-tools

run: venv $(DISK)
	exec $(BIN)/istgt -D -c $(CONFIG)

test: test-tools test-venv
	$(BIN)/python -m pytest tests
	$(BIN)/python bench/run_bench.py --smoke
	$(BIN)/python bench/digest_bench.py --smoke
	$(BIN)/python bench/login_storm.py --smoke

# pip runs again only when the packaging files change (stamp files).
venv: $(VENV)/.installed
test-venv: $(VENV)/.installed-test

# Debian's python3 creates venvs only with python3-venv installed: install it on failure.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(APT_GET) update \
		&& $(APT_GET) install -y python3-venv && $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -e '.[test]'
	touch $@ $(VENV)/.installed

$(DISK):
	mkdir -p $(dir $@)
	truncate -s 1G $@

# Installs the Debian test tools only when one of them is missing.
test-tools:
	@if ! command -v iscsi-test-cu >/dev/null || ! command -v qemu-img >/dev/null \
		|| ! command -v strace >/dev/null || ! command -v qemu-storage-daemon >/dev/null \
		|| ! command -v ceph-mon >/dev/null || ! command -v ceph-osd >/dev/null \
		|| ! command -v qemu-system-x86_64 >/dev/null || ! command -v debootstrap >/dev/null \
		|| ! test -x /usr/sbin/istgt || ! test -x /usr/sbin/tgtd \
		|| ! dpkg-query -W -f='$${Status}' qemu-block-extra 2>/dev/null | grep -q 'ok installed'; \
	then \
		echo "installing $(TEST_PACKAGES) $(IMAGE_PACKAGES)"; \
		$(APT_GET) update && $(APT_GET) install -y $(TEST_PACKAGES) \
		&& $(APT_GET) install -y --no-install-recommends $(IMAGE_PACKAGES); \
	fi

