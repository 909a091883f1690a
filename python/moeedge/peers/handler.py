"""The peer's door: hivemind's connection handler with moeedge's checks in front of it.

hivemind's authorizer covers only its DHT, so the caller's peer id (P2PContext.remote_id,
authenticated by libp2p's handshake) is checked here against an allowlist; a request is
refused before it is deserialized unless it is exactly what a layer backend takes (two
uncompressed tensors, float32 [n, H] and int64 [n], n <= max_rows, experts this peer holds);
at most max_inflight requests are queued per handler process; backward and the streaming
calls are refused. Everything a client sends is untrusted: nothing it sends is executed."""
from __future__ import annotations

from collections.abc import AsyncIterator

from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from moeedge.peers.names import INFO_UID

# The padded probe a client times to measure the link (moeedge.peers.client) may be this long.
MAX_PROBE_BYTES = 1 << 20


class RequestRefused(PermissionError):
    """Sent back to the caller as the call's error."""


class GuardedHandler(ConnectionHandler):
    def __init__(self, dht, backends: dict, *, model: str, hidden: int, n_experts: int, holdings,
                 allow: frozenset[str] | None, max_rows: int, max_inflight: int):
        super().__init__(dht, backends)
        self.model, self.hidden, self.n_experts = model, hidden, n_experts
        self.holdings = holdings  # shared bytes [moe_layers * n_experts], set once experts are loaded
        self.allow, self.max_rows, self.max_inflight = allow, max_rows, max_inflight
        self.inflight = 0

    def _check_caller(self, context: P2PContext) -> None:
        caller = context.remote_id.to_base58()
        if self.allow is not None and caller not in self.allow:
            raise RequestRefused(f"peer {caller} is not allowed to call this peer")

    def held(self) -> dict[int, list[int]]:
        flags = bytes(self.holdings)
        n = self.n_experts
        layers = {layer: [e for e in range(n) if flags[layer * n + e]] for layer in range(len(flags) // n)}
        return {layer: experts for layer, experts in layers.items() if experts}

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self._check_caller(context)
        if not request.uid.startswith(INFO_UID) or len(request.uid) > MAX_PROBE_BYTES:
            raise RequestRefused("unknown info request")
        info = {"model": self.model, "hidden": self.hidden, "max_rows": self.max_rows,
                "held": {str(k): v for k, v in self.held().items()}, "queued": self.inflight}
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    def _check_request(self, request: runtime_pb2.ExpertRequest) -> None:
        backend = self.module_backends.get(request.uid)
        if backend is None:
            raise RequestRefused(f"no layer {request.uid!r} here")
        if len(request.tensors) != 2:
            raise RequestRefused(f"a request has 2 tensors (hidden states, experts), got {len(request.tensors)}")
        hidden, experts = request.tensors
        if any(t.compression != runtime_pb2.CompressionType.NONE for t in request.tensors):
            raise RequestRefused("compressed tensors are refused")
        rows = hidden.size[0] if len(hidden.size) == 2 else -1
        if not 1 <= rows <= self.max_rows:
            raise RequestRefused(f"a request has 1 to {self.max_rows} rows, got {list(hidden.size)}")
        if (hidden.dtype != "float32" or list(hidden.size) != [rows, self.hidden]
                or len(hidden.buffer) != rows * self.hidden * 4):
            raise RequestRefused(f"hidden states must be float32 [rows, {self.hidden}]")
        if experts.dtype != "int64" or list(experts.size) != [rows] or len(experts.buffer) != rows * 8:
            raise RequestRefused(f"experts must be int64 [{rows}]")
        layer = backend.module.moe_layer
        flags = self.holdings[layer * self.n_experts:(layer + 1) * self.n_experts]
        for e in memoryview(experts.buffer).cast("q"):
            if not 0 <= e < self.n_experts or not flags[e]:
                raise RequestRefused(f"expert {e} of MoE layer {layer} is not held by this peer")

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self._check_caller(context)
        self._check_request(request)
        if self.inflight >= self.max_inflight:
            raise RequestRefused(f"busy: {self.inflight} requests queued")
        self.inflight += 1
        try:
            return await super().rpc_forward(request, context)
        finally:
            self.inflight -= 1

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                 context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise RequestRefused("streamed requests are refused: a request fits one message")
        yield  # an async generator, as hivemind registers it

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest,
                           context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise RequestRefused("backward is disabled on moeedge peers")

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                  context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise RequestRefused("backward is disabled on moeedge peers")
        yield
