"""istgtcontrol: placeholder until the control channel lands (issue 4).

It answers -V and -H like the real client and refuses every command honestly.
"""

from __future__ import annotations

import getopt
import sys

from istgt import EXTRA_VERSION, __version__

OPTIONS = "c:h:p:t:l:f:s:qvA:U:S:M:R:VH"
USAGE = (
    "Usage: istgtcontrol [options] <command> [<file>]\n"
    "commands: noop, version, list, load, unload, change, reset, info\n"
    "options: -c config -h host -p port -t target -l lun -f flags -s size -q -v\n"
    "         -A auth method -U user -S secret -M mutual user -R mutual secret\n"
    "         -V show version, -H show this usage\n"
)


def main(argv: list[str] | None = None) -> int:
    try:
        pairs, commands = getopt.getopt(sys.argv[1:] if argv is None else argv, OPTIONS)
    except getopt.GetoptError as exc:
        sys.stderr.write(f"istgtcontrol: {exc}\n{USAGE}")
        return 1
    flags = {flag for flag, _ in pairs}
    if "-H" in flags:
        sys.stdout.write(USAGE)
        return 0
    if "-V" in flags:
        sys.stdout.write(
            f"istgtcontrol version {__version__}\nistgtcontrol extra version {EXTRA_VERSION}\n"
        )
        return 0
    if not commands:
        sys.stderr.write(USAGE)
        return 1
    print("istgtcontrol: the control channel is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
