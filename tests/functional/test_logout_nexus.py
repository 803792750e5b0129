"""A Logout that ends a session ends its I_T nexus before the Logout Response goes out, so
an initiator that got the response can rely on what SAM-5 ties to the nexus being gone
(libiscsi's Sanitize.Reservations and Reserve6.Logout log in again at once and expect it)."""

from __future__ import annotations

from tests.functional.conftest import GOOD

RESERVE_6 = bytes([0x16, 0, 0, 0, 0, 0])
RELEASE_6 = bytes([0x17, 0, 0, 0, 0, 0])
HOLDER = ("iqn.2024-01.org.example:holder", bytes.fromhex("80000000d001"))
OTHER = ("iqn.2024-01.org.example:other", bytes.fromhex("80000000d002"))
CLOSE_SESSION, CLOSE_CONNECTION = 0, 1


def test_reservation_is_gone_when_the_logout_response_arrives(target):
    other = target.session(initiator_name=OTHER[0], isid=OTHER[1])
    for reason in (CLOSE_SESSION, CLOSE_CONNECTION) * 10:
        holder = target.session(initiator_name=HOLDER[0], isid=HOLDER[1])
        assert holder.scsi(RESERVE_6).status == GOOD
        assert holder.logout(reason).response == 0     # closed successfully
        # No wait: the nexus ended before the response, so the reservation went with it.
        assert other.scsi(RESERVE_6).status == GOOD, f"still reserved after logout {reason}"
        assert other.scsi(RELEASE_6).status == GOOD
        holder.close()
