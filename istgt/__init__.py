"""istgt for Python: an iSCSI target compatible with istgt's configuration and tools."""

__version__ = "0.5.0"
EXTRA_VERSION = "py-20261125"
