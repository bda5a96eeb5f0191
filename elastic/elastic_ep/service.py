"""How an API server reaches the orchestrator.

- One API server: it owns the launcher (inside its engine client), so the orchestrator lives in the same
  process and publishes membership records by a plain call (`LocalScaler`).
- Several API servers (--api-server-count K): the launcher lives in their parent process, and so does the
  orchestrator. A /scale request landing on any API server is forwarded over ZMQ (`RemoteScaler` -> the
  parent's `ScaleServer`, msgspec messages), and membership records reach every API server on its output
  queue (relayed like EngineDead).
Both answer (HTTP status, JSON body).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from elastic.elastic_ep.metrics import ScaleMetrics
from elastic.elastic_ep.operation import ScaleError
from elastic.elastic_ep.orchestrator import ScaleOrchestrator
from elastic.frontend.async_llm import AsyncLLM
from elastic.protocol.scaling import MembershipUpdate, ScaleCall, ScaleReply, ScaleRequest, StatusRequest

logger = logging.getLogger(__name__)

_REMOTE_STATUS_TIMEOUT_S = 10.0


class Scaler(Protocol):
    async def scale(self, request: ScaleRequest) -> tuple[int, dict[str, Any]]: ...

    async def status(self) -> dict[str, Any]: ...


async def run_scale(orchestrator: ScaleOrchestrator, request: ScaleRequest) -> tuple[int, dict[str, Any]]:
    try:
        summary = await orchestrator.scale(request.new_data_parallel_size, request.drain_timeout,
                                           request.operation_id)
    except ScaleError as e:
        return e.status, {"error": str(e), "status": orchestrator.status()}
    return (200 if summary["result"] != "failed" else 500), {**summary, "status": orchestrator.status()}


class LocalScaler:
    """The orchestrator beside the engine client of the only API server (created once the engines run)."""

    def __init__(self, engine: AsyncLLM, metrics: ScaleMetrics | None = None) -> None:
        self.engine, self.metrics = engine, metrics
        self._orchestrator: ScaleOrchestrator | None = None
        engine.client.orchestrator_factory = self._get  # ranks joining or leaving from other nodes scale too
        if metrics is not None:
            metrics.set_size(engine.config.parallel.data_parallel_size)

    def _get(self) -> ScaleOrchestrator | None:
        client = self.engine.client
        if self._orchestrator is None and client.launcher is not None and self.engine.is_ready:
            def publish(update: MembershipUpdate) -> None:
                client.apply_membership(update.membership, update.coordinator_frontend_pub)
                client.launcher.remote.publish(update)  # API servers of other nodes (external/hybrid LB)

            self._orchestrator = ScaleOrchestrator(client.launcher, self.engine.config, publish, self.metrics)
        return self._orchestrator

    def orchestrator(self) -> ScaleOrchestrator | None:
        """The orchestrator, once the engines run (fault recovery drives it too: elastic/fault/)."""
        return self._get()

    async def scale(self, request: ScaleRequest) -> tuple[int, dict[str, Any]]:
        orchestrator, reason = self._get(), self.engine.status()
        if orchestrator is None or reason is not None:  # starting, shutting down, or an engine died
            return 503, {"error": reason or "the engines are not ready"}
        return await run_scale(orchestrator, request)

    async def status(self) -> dict[str, Any]:
        orchestrator = self._get()
        if orchestrator is not None:
            return orchestrator.status()
        size = len(self.engine.client.engines)
        return {"state": "idle", "data_parallel_size": size, "target": None, "operation_id": None,
                "started_at": None, "last": None}


class ScaleServer:
    """In the launcher's process (several API servers): answers ScaleRequest / StatusRequest on a ROUTER."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, orchestrator: ScaleOrchestrator) -> None:
        self.orchestrator = orchestrator
        self.ready = False  # set once the engines run
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.decoder = msgspec.msgpack.Decoder(ScaleCall)
        self.encoder = msgspec.msgpack.Encoder()
        self.tasks: set[asyncio.Task] = set()
        self.loop_task = asyncio.get_running_loop().create_task(self._serve(), name="scale-server")

    async def _serve(self) -> None:
        while True:
            identity, payload = await self.sock.recv_multipart()
            task = asyncio.get_running_loop().create_task(self._answer(identity, payload))
            self.tasks.add(task)  # a scale takes seconds: status calls are answered meanwhile
            task.add_done_callback(self.tasks.discard)

    async def _answer(self, identity: bytes, payload: bytes) -> None:
        try:
            call = self.decoder.decode(payload)
            if isinstance(call, StatusRequest):
                reply = ScaleReply(200, self.orchestrator.status())
            elif not self.ready:
                reply = ScaleReply(503, {"error": "the engines are not ready"})
            else:
                reply = ScaleReply(*await run_scale(self.orchestrator, call))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            reply = ScaleReply(400, {"error": f"malformed scale call: {e}"})
        except Exception as e:  # the caller must hear back whatever happened
            logger.exception("scale call failed")
            reply = ScaleReply(500, {"error": f"{type(e).__name__}: {e}"})
        await self.sock.send_multipart([identity, self.encoder.encode(reply)])

    def close(self) -> None:
        self.loop_task.cancel()
        for task in self.tasks:
            task.cancel()
        self.sock.close(linger=0)


class RemoteScaler:
    """In each of several API servers: one DEALER per call to the launcher's ScaleServer. The API server
    whose call ran an operation records it in the metrics (they add up over the API servers)."""

    def __init__(self, address: str, metrics: ScaleMetrics | None = None, size: int = 1) -> None:
        self.address, self.metrics = address, metrics
        if metrics is not None:
            metrics.set_size(size)
        self.ctx = zmq.asyncio.Context.instance()
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(ScaleReply)

    async def _call(self, call: Any, timeout: float | None) -> ScaleReply:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.address)
            await sock.send(self.encoder.encode(call))
            raw = await asyncio.wait_for(sock.recv(), timeout)
            return self.decoder.decode(raw)
        finally:
            sock.close(linger=0)

    async def scale(self, request: ScaleRequest) -> tuple[int, dict[str, Any]]:
        reply = await self._call(request, None)  # as long as the scale takes (its phases have deadlines)
        body = reply.body
        if self.metrics is not None and "status" in body:
            self.metrics.set_size(body["status"]["data_parallel_size"])
            if body.get("joined") is False and body.get("result") != "noop":
                self.metrics.record(body["direction"], body["result"], body["prepare_s"], body["blocking_s"],
                                    body["total_s"])
        return reply.status, body

    async def status(self) -> dict[str, Any]:
        try:
            return (await self._call(StatusRequest(), _REMOTE_STATUS_TIMEOUT_S)).body
        except asyncio.TimeoutError:
            raise ScaleError(503, "the launcher process did not answer") from None
