"""istgtcontrol: istgt's control client, with its flags, istgtcontrol.conf and output.

    istgtcontrol [options] <command> [<file>]

Talks to the target's Unix control socket by default, or to a `[UnitControl]` TCP portal
with `-h`/`-p` (or an istgtcontrol.conf that names Host/Port and no ControlSocket), so it
drives the C istgt as well as this one. Prints what the C tool prints; exit status 0 on
success, 1 on any failure.
"""

from __future__ import annotations

import getopt
import os
import socket
import sys
from dataclasses import dataclass
from typing import TextIO

from istgt import EXTRA_VERSION, __version__
from istgt.config import ConfigError, ControlClientConfig, load_control_config
from istgt.control.auth import ControlAuthError, check_mutual_answer, client_response
from istgt.control.protocol import LineBuffer, quote, split_line
from istgt.listen import connect_unix

OPTIONS = "c:h:p:t:l:f:s:qvA:U:S:M:R:VH"
DEFAULT_CONFIG = "/etc/istgt/istgtcontrol.conf"
COMMANDS = ("noop", "version", "list", "load", "unload", "change", "reset", "info", "resize",
            "refresh", "stats")
NEEDS_TARGET = ("load", "unload", "change", "reset", "resize")
USAGE = (
    "Usage: istgtcontrol [options] <command> [<file>]\n"
    "options:\n"
    "    default may be changed by configuration file\n"
    "    -c config  config file (default /etc/istgt/istgtcontrol.conf)\n"
    "    -h host    target host name or IP (TCP; default: the Unix control socket)\n"
    "    -p port    port number (default 3261)\n"
    "    -t target  target iqn\n"
    "    -l lun     target lun (default 0)\n"
    "    -f flags   media flags (ro, rw, extend, dynamic)\n"
    "    -s size    media size for extend\n"
    "    -q         quiet mode\n"
    "    -v         verbose mode\n"
    "    -A method  authentication method (CHAP/Mutual CHAP/Auto)\n"
    "    -U user    auth user\n"
    "    -S secret  auth secret\n"
    "    -M muser   mutual auth user\n"
    "    -R msecret mutual auth secret\n"
    "    -V         display version\n"
    "    -H         display this usage\n"
    "command:\n"
    "    noop       no operation\n"
    "    version    display target version\n"
    "    list       list all or specified unit information\n"
    "    load       load media to specified unit\n"
    "    unload     unload media from specified unit\n"
    "    change     change media with <file> at specified unit\n"
    "    reset      reset specified lun of unit\n"
    "    info       display connection information\n"
    "    resize     grow the disk at specified lun to -s size (auto: its file's size)\n"
    "    refresh    reload the target's configuration now (-v: show what changed)\n"
    "    stats      I/O counters per LUN and session (all targets, or -t target)\n"
)


class ControlError(Exception):
    """A failure that ends the run with exit status 1 (message for stderr)."""


class AuthFailed(ControlError):
    """Authentication did not succeed; `reply` is the target's ERR line, if it sent one."""

    def __init__(self, reply: str = "") -> None:
        super().__init__("AUTH failed")
        self.reply = reply


@dataclass
class Request:
    command: str
    target: str | None
    lun: int
    flags: str
    size: str
    file: str | None
    verbose: bool = False


@dataclass
class Credentials:
    method: str            # "none", "chap", "auto"
    mutual: bool
    user: str | None
    secret: str | None
    mutual_user: str | None
    mutual_secret: str | None


class Channel:
    """One control connection: request lines out, reply lines in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lines = LineBuffer()
        self._ready: list[str] = []

    def read_line(self) -> str:
        while not self._ready:
            data = self.sock.recv(4096)
            if not data:
                raise ControlError("connection closed by target")
            self._ready.extend(self._lines.feed(data))
        return self._ready.pop(0)

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")

    def exchange(self, line: str) -> tuple[list[str], str]:
        """(data lines, final `OK ...`/`ERR ...` line) of one request."""
        self.send(line)
        data: list[str] = []
        while True:
            reply = self.read_line()
            if reply.startswith(("OK ", "ERR ")) or reply in ("OK", "ERR"):
                return data, reply
            data.append(reply)


def _parse_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    pairs, rest = getopt.getopt(argv, OPTIONS)
    options: dict[str, str] = {}
    for flag, value in pairs:
        options[flag] = value
    return options, rest


def _auth_from_option(value: str) -> tuple[str, bool] | None:
    folded = " ".join(value.split()).lower()
    if folded == "chap":
        return "chap", False
    if folded in ("mutual", "mutual chap", "chap mutual"):
        return "chap", True
    if folded == "auto":
        return "auto", False
    return None


def _connect(config: ControlClientConfig, options: dict[str, str], verbose: TextIO | None,
             ) -> socket.socket:
    timeout = config.timeout or None
    if "-h" in options or "-p" in options or config.tcp:
        host = options.get("-h", config.host)
        port = int(options["-p"]) if "-p" in options else config.port
        if verbose:
            verbose.write(f"connect to {host}:{port}\n")
        sock = socket.create_connection((host, port), timeout=timeout)
        return sock
    path = config.socket_path
    if verbose:
        verbose.write(f"connect to {path}\n")
    return connect_unix(path, timeout)


def _authenticate(channel: Channel, credentials: Credentials) -> None:
    """The AUTH exchange, retried once with mutual CHAP when the target asks for it (as
    the C tool does: `-A CHAP` works against a target that requires mutual CHAP)."""
    try:
        _chap_exchange(channel, credentials)
    except AuthFailed as failure:
        if credentials.mutual or failure.reply != "ERR CHAP sequence error":
            raise
        credentials.mutual = True
        _chap_exchange(channel, credentials)


def _chap_exchange(channel: Channel, credentials: Credentials) -> None:
    if not credentials.user or not credentials.secret:
        raise AuthFailed()
    mutual = credentials.mutual
    channel.send("AUTH CHAP_A 5")
    challenge = channel.read_line()        # the challenge line alone, no OK after it
    if not challenge.upper().startswith("AUTH "):
        raise AuthFailed(challenge)
    args = split_line(challenge)[1:]
    if mutual and not (credentials.mutual_user and credentials.mutual_secret):
        raise AuthFailed()
    try:
        line, expected = client_response(args, credentials.user, credentials.secret, mutual)
    except (ControlAuthError, ValueError):
        raise AuthFailed() from None
    data, final = channel.exchange(line)
    if not final.startswith("OK"):
        raise AuthFailed(final)
    if expected is not None:
        answer = split_line(data[0])[1:] if data else []
        if not check_mutual_answer(answer, expected, credentials.mutual_secret or ""):
            raise AuthFailed()


def _request_line(request: Request) -> str:
    command = request.command
    target = quote(request.target) if request.target else None
    if command in ("noop", "version"):
        return command.upper()
    if command == "refresh":
        return "REFRESH VERBOSE" if request.verbose else "REFRESH"
    if command in ("list", "info", "stats"):
        if target is None:
            return command.upper()
        return f"LIST {target} {request.lun}" if command == "list" else \
            f"{command.upper()} {target}"
    if command == "resize":
        return f"RESIZE {target} {request.lun} {quote(request.size)}"
    if command == "change":
        return (f"CHANGE {target} {request.lun} {quote('-')} {quote(request.flags)} "
                f"{quote(request.file or '')} {quote(request.size)}")
    return f"{command.upper()} {target} {request.lun}"


def _print_data(request: Request, data: list[str], out: TextIO) -> None:
    for line in data:
        word, _, rest = line.partition(" ")
        if request.command == "version":
            out.write(f"target version {rest}\n")
        elif request.command == "list" and request.target is None:
            out.write(f"{rest.split(' ')[0]}\n")
        elif word.upper() == request.command.upper():
            out.write(f"{rest}\n")


def run(request: Request, config: ControlClientConfig, options: dict[str, str],
        credentials: Credentials, quiet: bool, verbose: bool, out: TextIO, err: TextIO) -> int:
    name = request.command.upper()
    try:
        sock = _connect(config, options, out if verbose else None)
    except OSError as exc:
        err.write(f"connect error: {exc.strerror or exc}\n")
        return 1
    channel = Channel(sock)
    try:
        banner = channel.read_line()
        if verbose:
            out.write(f'target banner "{banner}"\n')
        if credentials.method == "chap":
            _authenticate(channel, credentials)
        line = _request_line(request)
        data, final = channel.exchange(line)
        if final == "ERR auth required" and credentials.method != "chap":
            credentials.method = "chap"          # as the C tool: authenticate, then retry
            _authenticate(channel, credentials)
            data, final = channel.exchange(line)
        if final.startswith("OK"):
            _print_data(request, data, out)
            if not quiet:
                out.write(f"DONE {name} command\n")
            status = 0
        else:
            err.write(f"ERROR {final[4:] if final.startswith('ERR ') else final}\n")
            if not quiet:
                out.write(f"ABORT {name} command\n")
            status = 1
        try:
            channel.exchange("QUIT")
        except (OSError, ControlError):
            err.write("QUIT failed\n")
        return status
    except AuthFailed:
        if not quiet:
            out.write("AUTH failed\n")
        return 1
    except ControlError as exc:
        err.write(f"{exc}\n")
        return 1
    except OSError as exc:
        err.write(f"control connection failed: {exc.strerror or exc}\n")
        return 1
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        options, rest = _parse_options(sys.argv[1:] if argv is None else argv)
    except getopt.GetoptError:
        out.write(USAGE)
        return 0
    if "-H" in options:
        out.write(USAGE)
        return 0
    if "-V" in options:
        out.write(f"istgtcontrol version {__version__} ({EXTRA_VERSION})\n")
        return 0
    if not rest:
        out.write(USAGE)
        return 1
    config_path = options.get("-c", DEFAULT_CONFIG)
    try:
        if "-c" in options or os.path.exists(config_path):
            config = load_control_config(config_path)
        else:
            config = ControlClientConfig()      # no file: built-in defaults
    except (ConfigError, OSError) as exc:
        err.write(f"config error: {exc}\n")
        return 1
    command = rest[0].lower()
    if command not in COMMANDS:
        err.write(f"unknown command {rest[0].upper()}\n")
        return 1
    method, mutual = config.auth.method, config.auth.mutual
    if "-A" in options:
        chosen = _auth_from_option(options["-A"])
        if chosen is None:
            out.write(USAGE)
            return 0
        method, mutual = chosen
    entry = config.auth_entry
    credentials = Credentials(
        method=method, mutual=mutual,
        user=options.get("-U", entry.user if entry else None),
        secret=options.get("-S", entry.secret if entry else None),
        mutual_user=options.get("-M", entry.mutual_user if entry else None),
        mutual_secret=options.get("-R", entry.mutual_secret if entry else None))
    target = options.get("-t", config.target_name)
    if target is not None and target.upper() == "ALL":
        target = None
    try:
        lun = int(options["-l"]) if "-l" in options else config.lun
        if not 0 <= lun <= 16383:
            raise ValueError
        if "-p" in options and not 0 <= int(options["-p"]) <= 65535:
            raise ValueError
    except ValueError:
        err.write("invalid lun or port\n")
        return 1
    request = Request(command, target, lun, options.get("-f", config.flags),
                      options.get("-s", config.size), rest[1] if len(rest) > 1 else None,
                      verbose="-v" in options)
    if command in NEEDS_TARGET and request.target is None:
        out.write(USAGE)
        return 1
    if command == "change" and request.file is None:
        out.write(USAGE)
        return 1
    verbose = "-v" in options
    if verbose:
        out.write(f"iqn={request.target or 'NULL'}, lun={request.lun}\n")
        out.write(f"media file={request.file or 'NULL'}, flags={request.flags}, "
                  f"size={request.size}\n")
    return run(request, config, options, credentials, "-q" in options, verbose, out, err)


if __name__ == "__main__":
    raise SystemExit(main())
