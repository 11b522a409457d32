"""What the ingress says of the deployment: its health and stats (the controller's status with
the ingress's own section), answered to SDK clients here and to HTTP clients by the HTTP
endpoint, and systemd's READY=1 once the deployment is ready."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import msgspec

from common import sd_notify
from common.stats import ControllerStats, IngressStats
from common.wire.client_messages import (ErrorCode, ErrorReply, HealthReply, HealthRequest,
                                         StatsReply, StatsRequest)
from common.wire.framing import Message
from common.wire.internal_messages import StatusQuery
from common.zmq_io import PeerDisconnected
from services.ingress.client_request import ControllerUnavailable

if TYPE_CHECKING:
    from services.ingress.service import Ingress

STATUS_TIMEOUT_S = 5.0


async def deployment_status(ingress: Ingress) -> tuple[bool, str, ControllerStats]:
    """(ready, detail, stats with the ingress's section); ready is false while draining.
    Raises ControllerUnavailable when the controller does not answer."""
    try:
        status = await ingress.ctrl_rpc.call(lambda cid: StatusQuery(cid), STATUS_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ControllerUnavailable("the controller did not answer within "
                                    f"{STATUS_TIMEOUT_S:g}s") from None
    except PeerDisconnected as e:
        raise ControllerUnavailable(str(e)) from None
    own = IngressStats(active_requests=len(ingress.active),
                       awaiting_admission=ingress.admission.waiting,
                       queued_requests=ingress.bounds.requests,
                       queued_prompt_tokens=ingress.bounds.prompt_tokens,
                       rejected=dict(ingress.bounds.rejected),
                       disconnects=ingress.disconnects, draining=ingress.draining)
    stats = msgspec.structs.replace(status.stats, ingress=own)
    if ingress.draining:
        return False, "draining: the ingress is shutting down", stats
    return status.ready, status.detail, stats


async def status_reply(ingress: Ingress, msg: HealthRequest | StatsRequest) -> Message:
    """The answer to an SDK client's health or stats request."""
    try:
        ready, detail, stats = await deployment_status(ingress)
    except ControllerUnavailable as e:
        return ErrorReply(msg.id, ErrorCode.NOT_READY, str(e))
    if isinstance(msg, StatsRequest):
        return StatsReply(msg.id, stats.to_builtins())
    cfg = ingress.cfg
    return HealthReply(msg.id, ready, ingress.model_name, cfg.deployment.stages,
                       cfg.deployment.instances, cfg.scheduler.policy, cfg.model.max_model_len,
                       detail, cfg.ingress.max_frame_bytes)


async def report_ready(ingress: Ingress) -> None:
    """READY=1 to systemd once the deployment answers ready (its stages loaded), so that
    starting the units returns when prompts work; then idles (a task that ended would end
    the service)."""
    while True:
        try:
            if (await deployment_status(ingress))[0]:
                break
        except ControllerUnavailable:
            pass
        await asyncio.sleep(0.5)
    sd_notify.ready("the deployment is ready")
    await asyncio.Future()
