"""A stranger cannot reach the control plane. One real deployment (tiny dummy model, 2 stages)
with the deployment's CURVE keys: the controller on ipc:// in the private run directory, the
kv-cache manager on tcp://. While a greedy stream runs, peers without the keys, with keys of
their own, and with a role's key but the wrong role try to submit, abort, free blocks, inject
tokens and register as the ingress: nothing acts on their messages, each attempt is logged, and
the stream's tokens are exactly those of the same request run alone."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import zmq
import zmq.auth

from common.ports import free_port
from common.security import CurveClient, KeyPair, load_key
from common.wire import decode, encode
from common.wire.client_messages import CancelRequest
from common.wire.internal_messages import (AbortRequests, FreeBlocks, Hello, PoolStats,
                                           PoolStatsQuery, RequestSampling, StatusQuery,
                                           StepDone, SubmitRequest)
from conveyor.local_deployment import start_deployment, stop_deployment

PROMPT = "Tell me about the sea."
GREEDY = dict(max_tokens=64, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys") / "deployment"
    out = subprocess.run([sys.executable, "-m", "conveyor.cli", "keys", str(folder)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{r}.{ext}" for r in ("controller", "kvcache", "ingress", "stage")
        for ext in ("key", "key_secret"))
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in folder.glob("*.key_secret"))
    again = subprocess.run([sys.executable, "-m", "conveyor.cli", "keys", str(folder)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "already holds keys" in again.stderr
    return folder


@pytest.fixture(scope="module")
def deployment(keys_dir):
    dep = start_deployment(sets=("model.source=tiny", "model.load_format=dummy",
                                 f"endpoints.kvcache=\"tcp://127.0.0.1:{free_port()}\"",
                                 f"security.keys_dir=\"{keys_dir}\""))
    yield dep
    assert stop_deployment(dep) == 0, dep.log_tail()


def _peer(address: str, curve: CurveClient | None = None, identity: bytes | None = None):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if curve:
        curve.apply(sock)
    sock.connect(address)
    return ctx, sock


def _answers(sock, msg, timeout_ms: int = 1500):
    """Sends `msg`; the decoded reply, or None when none comes."""
    sock.send_multipart(encode(msg))
    return decode(sock.recv_multipart()) if sock.poll(timeout_ms) else None


def _req_id_of_last_finished(deployment) -> int:
    ids = re.findall(r"request finished .*?req_id=(\d+)", deployment.log_tail(400))
    return int(ids[-1])


def _listening_addresses(pid: int) -> set[str]:
    """host:port of every TCP socket the process listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, size in (("tcp", 8), ("tcp6", 32)):
        for line in open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                host, port = fields[1].split(":")
                if size == 8:
                    host = socket.inet_ntoa(bytes.fromhex(host)[::-1])
                found.add(f"{host}:{int(port, 16)}")
    return found


def test_strangers_and_wrong_roles_cannot_act(deployment, keys_dir):
    cfg = deployment.config()
    controller, kvcache = cfg.endpoints.controller, cfg.endpoints.kvcache
    assert controller.startswith("ipc://") and kvcache.startswith("tcp://")
    with deployment.client(timeout=120) as client:
        reference = client.generate(PROMPT, **GREEDY)
        victim = _req_id_of_last_finished(deployment) + 1  # ids count up per request
        stream = client.stream(PROMPT, **GREEDY)
        tokens = iter(stream)
        first = next(tokens)

        sampling = RequestSampling(0.0, 1.0, 0, None)
        forged = [Hello("ingress"), SubmitRequest(victim + 7, [1, 2, 3], 4, sampling, [], True,
                                                  time.time()),
                  AbortRequests([victim], "forged"),
                  StepDone(0, 0, 1, 0.0, 0.0, [5]), StepDone(1, 0, 1, 0.0, 0.0, [5, 5]),
                  StepDone(2, 99, 0, 0.0, 0.0, [5])]  # an instance that does not exist
        own = zmq.auth.create_certificates(keys_dir.parent, "stranger")
        stranger = KeyPair(*zmq.auth.load_certificate(own[1]))
        servers = {"controller": load_key(keys_dir, "controller", False).public,
                   "kvcache": load_key(keys_dir, "kvcache", False).public}
        # 1. No CURVE at all, and 2. CURVE with a key of its own: never let in.
        for curve in (None, "own"):
            for address, server in ((controller, "controller"), (kvcache, "kvcache")):
                c = CurveClient(stranger, servers[server]) if curve else None
                ctx, sock = _peer(address, c, identity=b"controller" if server == "kvcache"
                                  else b"ingress")
                try:
                    msgs = forged if server == "controller" else [FreeBlocks(1, 0, [victim])]
                    for msg in msgs:
                        sock.send_multipart(encode(msg))
                    query = StatusQuery(9) if server == "controller" else PoolStatsQuery(9)
                    assert _answers(sock, query) is None, (curve, server)
                finally:
                    sock.close()
                    ctx.term()
        # 3. A real role's key (a stage's, say, stolen) with another role's messages.
        stage_key = load_key(keys_dir, "stage", True)
        ctx, sock = _peer(controller, CurveClient(stage_key, servers["controller"]),
                          identity=b"intruder")
        try:
            for msg in forged:
                sock.send_multipart(encode(msg))
            assert _answers(sock, StatusQuery(9)).ready  # it is in, and refused by role
        finally:
            sock.close()
            ctx.term()
        ingress_key = load_key(keys_dir, "ingress", True)
        ctx, sock = _peer(controller, CurveClient(ingress_key, servers["controller"]),
                          identity=b"ingress-2")
        try:
            for msg in forged[:3]:
                sock.send_multipart(encode(msg))
            assert _answers(sock, StatusQuery(10)).ready
        finally:
            sock.close()
            ctx.term()
        # The controller's key held by another peer may read the pools, never change them.
        ctx, sock = _peer(kvcache, CurveClient(load_key(keys_dir, "controller", True),
                                               servers["kvcache"]), identity=b"not-controller")
        try:
            refusal = _answers(sock, FreeBlocks(11, 0, [victim]))
            assert not refusal.ok and "only the controller may change the pools" in refusal.error
            assert isinstance(_answers(sock, PoolStatsQuery(12)), PoolStats)
        finally:
            sock.close()
            ctx.term()
        rest = list(tokens)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == reference.token_ids
    assert stream.result.finish_reason == "length" and len(reference.token_ids) == 64
    assert all(p.free_blocks == p.total_blocks for p in deployment.wait_kv_free())
    log = deployment.log_tail(600)
    for service in ("controller", "kvcache"):
        # (the reason is libzmq's: a mechanism mismatch, or a broken pipe when the peer left)
        assert re.search(rf"refused a connection: its handshake failed .*service={service}",
                         log), service
        assert re.search(rf"refused a connection: its CURVE key is not one of the "
                         rf"deployment's .*service={service}", log), service
    for kind, reason in [("Hello", "a second ingress"), ("SubmitRequest", "only the registered "
                         "ingress"), ("AbortRequests", "only the registered ingress"),
                         ("StepDone", "not the registered stage 0.1")]:
        for peer, role in (("intruder", "stage"), ("ingress-2", "ingress")):
            if kind == "StepDone" and role == "ingress":
                continue
            assert re.search(rf"refused a message .*peer=b'{peer}' peer_role={role} "
                             rf"reason=.{reason}.* type={kind}", log), (kind, peer)
    assert re.search(r"refused a message .*peer=b'intruder' peer_role=stage reason=.not the "
                     r"registered stage 99\.0.* type=StepDone", log)
    assert re.search(r"refused a message .*peer=b'not-controller'.*type=FreeBlocks", log)
    assert "ingress connected" in log and log.count("ingress connected") == 1


def test_the_rendezvous_listens_on_dist_host_only(deployment):
    cfg = deployment.config()
    stage0 = _listening_addresses(deployment.process_pid("stage", 0, 0))
    assert f"127.0.0.1:{cfg.endpoints.dist_base_port}" in stage0
    assert all(a.startswith("127.0.0.1:") for a in stage0), stage0
    assert all(a.startswith("127.0.0.1:")
               for a in _listening_addresses(deployment.process_pid("stage", 0, 1)))


@pytest.mark.skipif(os.getuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to act as another user) and /usr/bin/python3")
def test_another_user_cannot_open_the_ipc_sockets(deployment):
    """The run directory is 0700: another user gets EACCES before any ZeroMQ handshake."""
    path = deployment.config().endpoints.controller[len("ipc://"):]
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
    probe = ("import socket\ns = socket.socket(socket.AF_UNIX)\n"
             f"try:\n    s.connect({path!r}); print('connected')\n"
             "except PermissionError as e:\n    print('refused', e.errno)\n")
    # The system's python: the venv's may live under a folder only root may enter.
    out = subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True, text=True,
                         user=65534, group=65534)
    assert out.stdout.strip() == "refused 13", out.stdout + out.stderr


def test_one_client_cannot_cancel_anothers_request(deployment):
    """Cancels are looked up by (the sender's connection, its request id): the same id from
    another connection finds nothing. The SDK's connection identity is a random UUID, and
    ZeroMQ refuses a second connection under an identity that is connected."""
    with deployment.client(timeout=120) as victim, deployment.client(timeout=30) as other:
        reference = victim.generate(PROMPT, **GREEDY)
        stream = victim.stream(PROMPT, **GREEDY)
        tokens = iter(stream)
        first = next(tokens)
        ctx, sock = _peer(deployment.address)
        try:
            for rid in range(0, 64):  # every id the victim's client has used or will use
                sock.send_multipart(encode(CancelRequest(rid)))
            time.sleep(0.5)
        finally:
            sock.close()
            ctx.term()
        assert other.health().ready
        rest = list(tokens)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == reference.token_ids
    assert stream.result.finish_reason == "length"
