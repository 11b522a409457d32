"""Who may send the controller what: its trust rules, checked as each message arrives.

Only the registered ingress submits and aborts requests; only the stage registered for an
instance's stage reports that stage's steps; a Hello must come from the routing identity of the
role it claims (`ingress`, `stage-I-S`), so a second peer claiming to be the ingress, or a stage
already connected, is refused. With CURVE (common/security.py) the connection's role, which the
deployment's keys prove, must match as well. Every refusal is logged and nothing else happens.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.log import get_logger
from common.security import INGRESS_IDENTITY, peer_is, stage_identity
from common.wire.internal_messages import Hello
from common.zmq_io import Incoming
from services.controller.instance import ServedInstance

log = get_logger()


def refused(inc: Incoming, reason: str) -> bool:
    """Logs a refused message; returns False, for `return refused(...)`."""
    log.warning("refused a message", type=type(inc.message).__name__, peer=inc.identity,
                peer_role=inc.role, reason=reason)
    return False


def from_ingress(inc: Incoming) -> bool:
    """The ingress is the peer connected as `ingress` (one at a time: ZeroMQ refuses a second
    connection under a connected identity), so a controller restarted under a running ingress
    still takes its requests."""
    if inc.identity == INGRESS_IDENTITY and peer_is(inc.role, "ingress"):
        return True
    return refused(inc, "only the registered ingress may submit or abort requests")


def from_stage(inc: Incoming, instances: Sequence[ServedInstance], instance: int,
               stage: int) -> bool:
    if (peer_is(inc.role, "stage") and 0 <= instance < len(instances)
            and instances[instance].stage_identities.get(stage) == inc.identity):
        return True
    return refused(inc, f"not the registered stage {instance}.{stage}")


def hello_allowed(inc: Incoming) -> bool:
    """A Hello of a known role, from that role's identity. The ingress's identity is fixed,
    so a restarted ingress takes its place again while another claimant is refused."""
    msg: Hello = inc.message
    if msg.role == "ingress":
        if inc.identity == INGRESS_IDENTITY and peer_is(inc.role, "ingress"):
            return True
        return refused(inc, "a second ingress: the ingress is the peer named 'ingress'")
    want = stage_identity(msg.instance, msg.stage)
    if msg.role == "stage" and (inc.identity != want or not peer_is(inc.role, "stage")):
        return refused(inc, f"stage {msg.instance}.{msg.stage} must connect as {want.decode()}")
    return True
