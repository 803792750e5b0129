"""The login phase of one connection (RFC 7143 section 6): stages, authentication, TSIH.

`LoginProcess.handle(pdu)` turns one Login Request into one Login Response and says whether
the connection goes on logging in, enters full feature phase, or must close.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from istgt import chap
from istgt.config import access_allowed, load_auth
from istgt.iscsi import params, pdu as wire
from istgt.iscsi.session import LoginRefused, Session, DISCOVERY_WINDOW, EXCLUSIVE_WINDOW
from istgt.scsi.command import ITNexus

log = logging.getLogger("istgt.iscsi")

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
MAX_LOGIN_TEXT = 65536
REINSTATEMENT_WAIT = 10.0     # seconds for a reinstated session's connections to end

CONTINUE, ENTER_FFP, CLOSE = "continue", "ffp", "close"


@dataclass
class LoginResult:
    response: wire.Response
    outcome: str
    session: Session | None = None
    values: object = None


class LoginProcess:
    def __init__(self, server, conn):
        self.server = server          # istgt.server.Server: config, sessions, targets
        self.conn = conn              # Connection: peer, portal_group_tag, cid
        self.stage = None
        self.first = True
        self.text = bytearray()       # C-bit continuation of the initiator's keys
        self.initiator_name = ""
        self.initiator_alias = ""
        self.session_type = "Normal"
        self.target = None            # LogicalUnit
        self.target_name = ""
        self.auth_spec = None
        self.negotiator = None
        self.authenticator = None
        self.auth_method = None       # "CHAP" / "None" once negotiated
        self.authenticated = False
        self.tsih = 0
        self.isid = b""
        self.existing: Session | None = None
        self.sent_first_response = False

    # ------------------------------------------------------------------ entry
    def handle(self, req: wire.Pdu) -> LoginResult:
        try:
            return self._handle(req)
        except LoginRefused as e:
            log.warning("login from %s (%s) refused: %s (status 0x%04x)",
                        self.initiator_name or "?", self.conn.peer_ip, e, e.status)
            return LoginResult(self._response(req, False, b"", status=e.status), CLOSE)
        except (params.TextError, params.NegotiationError, chap.AuthError) as e:
            status = getattr(e, "status", 0x0200)
            log.warning("login from %s (%s) failed: %s",
                        self.initiator_name or "?", self.conn.peer_ip, e)
            return LoginResult(self._response(req, False, b"", status=status), CLOSE)

    def _handle(self, req: wire.Pdu) -> LoginResult:
        if req.transit and req.cont:
            raise LoginRefused(0x0200, "T and C bits both set")
        if self.first:
            self.isid = req.isid
            self.tsih = req.tsih
            if req.version_min > 0:
                raise LoginRefused(0x0205, f"unsupported version {req.version_min}")
        elif req.isid != self.isid or req.tsih != self.tsih:
            raise LoginRefused(0x0200, "ISID or TSIH changed during login")
        if req.csg not in (SECURITY, OPERATIONAL):
            raise LoginRefused(0x0200, f"login stage {req.csg} is not valid")
        if self.stage is not None and req.csg != self.stage:
            raise LoginRefused(0x0200, f"stage {req.csg} sent while in stage {self.stage}")
        self.text += req.data
        if len(self.text) > MAX_LOGIN_TEXT:
            raise LoginRefused(0x0200, "login text too long")
        if req.cont:
            # the initiator continues its keys in the next PDU: answer empty (RFC 7143 6.1.2)
            return LoginResult(self._response(req, False, b"", csg=req.csg), CONTINUE)
        pairs = params.parse_text(bytes(self.text))
        self.text.clear()
        keys = dict(pairs)
        if self.first:
            self._first_pdu(keys)
        self.stage = req.csg
        answers: list[tuple[str, str]] = []
        if not self.sent_first_response and not self.discovery:
            answers.append(("TargetPortalGroupTag", str(self.conn.portal_group_tag)))
            if self.target.config.alias:
                answers.append(("TargetAlias", self.target.config.alias))
        chap_keys = {k: v for k, v in pairs if k.startswith("CHAP_")}
        other = [(k, v) for k, v in pairs if not k.startswith("CHAP_")]
        answers += self.negotiator.negotiate(other, params.Phase(req.csg))
        self._note_auth_method(answers)
        transit = req.transit
        if req.csg == SECURITY:
            transit = self._security(chap_keys, answers, transit)
        elif chap_keys:
            raise LoginRefused(0x0200, "CHAP keys outside the security stage")
        else:
            self._require_authenticated()
        nsg = req.nsg
        if transit:
            if nsg <= req.csg or nsg == 2:
                raise LoginRefused(0x0200, f"invalid next stage {nsg} from stage {req.csg}")
            if req.csg == SECURITY:
                self._require_authenticated()
        if transit and nsg == FULL_FEATURE or req.csg == OPERATIONAL:
            answers += self.negotiator.declarations(params.Phase.OPERATIONAL)
        if transit and self.negotiator.awaiting_answer:
            # our proposals need an answer first: stay in (or step down to) the operational stage
            if req.csg == SECURITY:
                nsg = OPERATIONAL
            else:
                transit = False
        self.sent_first_response = True
        if transit and nsg == FULL_FEATURE:
            self.negotiator.check_ready()
            session = self._enter_full_feature()
            resp = self._response(req, True, params.encode_text(answers), nsg=nsg,
                                  tsih=session.tsih)
            return LoginResult(resp, ENTER_FFP, session, self.negotiator.result)
        if transit:
            self.stage = nsg
        return LoginResult(self._response(req, transit, params.encode_text(answers), nsg=nsg),
                           CONTINUE)

    # ------------------------------------------------------------------ steps
    @property
    def discovery(self) -> bool:
        return self.session_type == "Discovery"

    def _first_pdu(self, keys: dict) -> None:
        self.first = False
        cfg = self.server.config
        name = keys.get("InitiatorName")
        if not name:
            raise LoginRefused(0x0207, "InitiatorName missing")
        self.initiator_name = name.lower()
        self.initiator_alias = keys.get("InitiatorAlias", "")
        stype = keys.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            raise LoginRefused(0x0209, f"unknown SessionType {stype!r}")
        self.session_type = stype
        if self.tsih and self.discovery:
            raise LoginRefused(0x020A, "a discovery session cannot be joined")
        if self.discovery:
            self.auth_spec = cfg.global_.discovery_auth
            limits = cfg.global_.iscsi
            header = data = ("CRC32C", "None")
        else:
            tname = keys.get("TargetName")
            if not tname:
                raise LoginRefused(0x0207, "TargetName missing")
            target = self.server.find_target(tname, self.conn.portal_group_tag)
            if target is None:
                raise LoginRefused(0x0203, f"target {tname} not found")
            if not access_allowed(cfg, target.config, self.conn.portal_group_tag,
                                  self.initiator_name, self.conn.peer_ip):
                # answered as if it did not exist: SendTargets hides it too, and a login
                # must not tell a stranger which target names are there (issue 7)
                log.warning("login to %s from %s (%s) refused by its ACL (answered 'not "
                            "found')", tname, self.initiator_name, self.conn.peer_ip)
                raise LoginRefused(0x0203, f"target {tname} not found")
            self.target = target
            self.target_name = target.name
            self.auth_spec = target.config.auth
            limits = target.config.iscsi
            header = _digest_choices(target.config.header_digest)
            data = _digest_choices(target.config.data_digest)
            if self.tsih:
                self.existing = self.server.sessions.find(
                    self.tsih, self.isid, self.initiator_name, self.target_name,
                    self.conn.portal_group_tag)
                if self.existing is None:
                    raise LoginRefused(0x020A, f"no session with TSIH {self.tsih}")
        methods = {"none": ("None",), "chap": ("CHAP",),
                   "auto": ("CHAP", "None")}[self.auth_spec.method]
        if self.auth_spec.mutual:
            methods = ("CHAP",)
        self.negotiator = params.Negotiator(
            limits, session_type=self.session_type, header_digests=header,
            data_digests=data, leading=self.tsih == 0, auth_methods=methods)

    def _note_auth_method(self, answers) -> None:
        for k, v in answers:
            if k == "AuthMethod" and v in ("CHAP", "None"):
                self.auth_method = v

    def _auth_required(self) -> bool:
        return self.auth_spec.method == "chap" or self.auth_spec.mutual

    def _security(self, chap_keys: dict, answers: list, transit: bool) -> bool:
        if self.auth_method == "CHAP" and not self.authenticated:
            if self.authenticator is None:
                group = self.auth_spec.group
                self.authenticator = chap.ChapAuthenticator(
                    self._lookup(group), mutual_required=self.auth_spec.mutual)
            if chap_keys:
                answers += self.authenticator.step(chap_keys)
            if self.authenticator.complete:
                self.authenticated = True
                log.info("CHAP authentication of %s succeeded", self.initiator_name)
            else:
                return False       # T=0 until CHAP is done
        elif chap_keys:
            raise chap.AuthError("CHAP keys without AuthMethod=CHAP")
        return transit

    def _lookup(self, group):
        path = self.server.config.global_.auth_file

        def lookup(user: str):
            if group is None:
                return None
            return load_auth(path).lookup(group, user)   # re-read at every attempt, as istgt
        return lookup

    def _require_authenticated(self) -> None:
        if self.authenticated:
            return
        if self.auth_method == "CHAP" or self._auth_required():
            raise LoginRefused(0x0201, "authentication required")
        self.authenticated = True      # AuthMethod None accepted

    def _enter_full_feature(self) -> Session:
        values = self.negotiator.result
        conn = self.conn
        if self.existing is not None:
            self.existing.add_connection(conn, self.existing.values.max_connections)
            return self.existing
        if self.discovery:
            window = DISCOVERY_WINDOW
            target_port = f"discovery,t,0x{conn.portal_group_tag:04x}"
        else:
            depth = self.target.queue_depth
            window = depth if depth > 0 else EXCLUSIVE_WINDOW
            target_port = f"{self.target_name},t,0x{conn.portal_group_tag:04x}"
        nexus = ITNexus(f"{self.initiator_name},i,0x{self.isid.hex()}", target_port,
                        conn.portal_group_tag)
        session = Session(isid=self.isid, initiator_name=self.initiator_name,
                          initiator_alias=self.initiator_alias, target=self.target,
                          target_name=self.target_name,
                          portal_group_tag=conn.portal_group_tag,
                          discovery=self.discovery, values=values, window=window,
                          first_cmdsn=conn.writer.login_cmdsn, nexus=nexus)
        replaced = self.server.sessions.register(session)
        for old in replaced:
            log.warning("session reinstatement: closing TSIH %d of %s", old.tsih,
                        old.initiator_port)
            old.close_all("session reinstated", force=True)
        for old in replaced:
            # the old I_T nexus must be gone (its tasks aborted, SPC-2 reservation released)
            # before the new session, which has the same nexus, runs a command
            for member in old.members():
                member.finished.wait(REINSTATEMENT_WAIT)
        session.add_connection(conn, values.max_connections)
        return session

    # ------------------------------------------------------------------ response
    def _response(self, req: wire.Pdu, transit: bool, data: bytes, *, status: int = 0,
                  csg: int | None = None, nsg: int = 0, tsih: int | None = None):
        return wire.login_response(
            req, transit, req.csg if csg is None else csg, nsg,
            self.tsih if tsih is None else tsih, status >> 8, status & 0xFF, data)


def _digest_choices(policy: str) -> tuple[str, ...]:
    return ("CRC32C",) if policy == "required" else ("CRC32C", "None")
