"""A peer that holds a share of a model's experts and computes them for its callers.

Order matters: hivemind forks its helpers (the DHT, one task pool per MoE layer, the
connection handler) from this process, so they are started before anything of moeedge
starts a native thread (the expert cache's IO threads, the kernels' pool); what they hold is
then measured (moeedge.peers.helpers_memory) and taken from the budget before experts are
chosen and loaded. The experts stay resident: the cache is sized to exactly what is held."""
from __future__ import annotations

import multiprocessing as mp
import threading
from dataclasses import dataclass

from moeedge.formats.open import open_checkpoint
from moeedge.keys import ExpertKey
from moeedge.peers import require_hivemind
from moeedge.peers.backend import LayerExperts, layer_backend
from moeedge.peers.helpers_memory import helper_bytes
from moeedge.peers.holdings import choose_auto, parse_experts, usage
from moeedge.peers.names import held_keys, layer_uid, model_id
from moeedge.runtime.measure import resolve_budget, rss_bytes
from moeedge.runtime.plan import SLACK_BYTES
from moeedge.units import format_bytes

# A request's hidden states must fit one libp2p message (hivemind's 4 MiB), with room.
MESSAGE_BYTES = 3 << 20
START_TIMEOUT_S = 60


@dataclass
class PeerOptions:
    memory_budget: int | str = "auto"
    experts: list[str] | None = None        # None or ["auto"]: auto; else LAYER:E,E,...
    listen: str = "/ip4/127.0.0.1/tcp/0"
    initial_peers: tuple[str, ...] = ()
    identity: str | None = None
    allow: frozenset[str] | None = None     # None: any caller (refused off loopback by the CLI)
    trace: str | None = None
    skip_most_used: int = 0                 # auto: leave the most used to the client's own cache
    max_rows: int = 64
    max_inflight: int = 64
    announce_period_s: float = 15.0
    io_threads: int = 2


class ExpertServer:
    """serve-experts: start(), then .addresses and .held; shutdown() ends every process."""

    def __init__(self, source, options: PeerOptions):
        self.hivemind = require_hivemind()
        self.options = options
        self.fixed_bytes = rss_bytes()
        self.ckpt = open_checkpoint(source)
        cfg = self.ckpt.config
        if getattr(cfg, "family", None) not in ("mixtral", "qwen2_moe", "olmoe"):
            raise ValueError(f"{source}: peers serve decoder MoE models (Mixtral, Qwen2-MoE, OLMoE) only")
        self.cfg = cfg
        self.n_layers, self.n_experts = len(cfg.moe_layers), cfg.n_experts
        self.budget = resolve_budget(options.memory_budget)
        self.model = model_id(self.ckpt)
        self.max_rows = max(1, min(options.max_rows, MESSAGE_BYTES // (cfg.hidden * 4)))
        self.held: dict[int, list[int]] = {}
        # named experts are checked now, before any process is started
        self.named = (None if not options.experts or options.experts == ["auto"]
                      else parse_experts(options.experts, self.n_layers, self.n_experts))
        if options.trace is not None:
            usage(options.trace, self.n_layers, self.n_experts)  # a bad trace is refused now too
        self.cache = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Fork hivemind's helpers, measure them, choose and load the experts, announce them."""
        hm = self.hivemind
        from hivemind.moe.server.runtime import Runtime

        from moeedge.peers.handler import GuardedHandler

        o = self.options
        self.dht = hm.DHT(initial_peers=list(o.initial_peers), host_maddrs=[o.listen], identity_path=o.identity,
                          start=True)
        self.modules = [LayerExperts(i, self.cfg.hidden) for i in range(self.n_layers)]
        backends = {layer_uid(self.model, i): layer_backend(layer_uid(self.model, i), m, self.max_rows)
                    for i, m in enumerate(self.modules)}
        self.holdings = mp.RawArray("b", self.n_layers * self.n_experts)
        self.handler = GuardedHandler(self.dht, backends, model=self.model, hidden=self.cfg.hidden,
                                      n_experts=self.n_experts, holdings=self.holdings, allow=o.allow,
                                      max_rows=self.max_rows, max_inflight=o.max_inflight)
        self.runtime = Runtime(backends)
        self.runtime_thread = threading.Thread(target=self.runtime.run, name="moeedge-peer-runtime", daemon=True)
        self.runtime_thread.start()
        if not self.runtime.ready.wait(START_TIMEOUT_S):
            raise RuntimeError("hivemind's runtime did not start")
        self.handler.run_in_background(await_ready=True, timeout=START_TIMEOUT_S)
        self.helpers = helper_bytes()
        self._load()
        self.announcer = threading.Thread(target=self._announce_loop, name="moeedge-peer-announce", daemon=True)
        self.announcer.start()

    def _expert_budget(self) -> int:
        """What is left for experts: the budget less this process, its helpers, buffers for
        max_rows rows of the widest expert, and the planner's slack."""
        cfg = self.cfg
        buffers = self.max_rows * (cfg.hidden + 3 * cfg.expert_intermediate) * 4  # x, gate, up, their product
        used = rss_bytes() + self.helpers["forked"] + self.helpers["daemons"] + buffers + SLACK_BYTES
        return self.budget - used

    def _taken_elsewhere(self) -> set[tuple[int, int]]:
        found = self.dht.get(self.model + ".held", latest=True)
        taken = set()
        me = self.dht.peer_id.to_base58()
        for peer, entry in (found.value if found is not None and isinstance(found.value, dict) else {}).items():
            if peer == me or not isinstance(entry.value, dict):
                continue
            for layer, experts in entry.value.get("held", {}).items():
                taken.update((int(layer), int(e)) for e in experts)
        return taken

    def _load(self) -> None:
        from moeedge._core import ExpertCache, ExpertStore
        from moeedge.runtime.experts import ExpertAccess

        store = ExpertStore(self.ckpt.files, self.ckpt.expert_ranges, direct_io=True)
        available = self._expert_budget()

        def slot(layer: int, e: int) -> int:
            return store.slot_bytes(ExpertKey(layer, e).packed)

        if self.named is None:
            counts = usage(self.options.trace, self.n_layers, self.n_experts)
            held = choose_auto(counts, self._taken_elsewhere(), slot, available, self.options.skip_most_used)
        else:
            held = self.named
        need = sum(slot(layer, e) for layer, experts in held.items() for e in experts)
        if not held or need > available:
            raise MemoryError(f"--memory-budget {format_bytes(self.budget)} leaves {format_bytes(max(0, available))} "
                              f"for experts after this process ({format_bytes(rss_bytes())}) and hivemind's helpers "
                              f"({format_bytes(self.helpers['forked'] + self.helpers['daemons'])}); "
                              + (f"the experts asked for need {format_bytes(need)}" if held else "not one expert fits"))
        keys = held_keys(held)
        self.cache = ExpertCache(store, need, "lru", self.options.io_threads)
        self.cache.prefetch(keys, 1)
        for key in keys:  # wait until every held expert is resident
            self.cache.get(key)
        access = ExpertAccess(self.cache, self.ckpt.expert_parts, None, self.ckpt.expert_layouts)
        for layer, module in enumerate(self.modules):
            module.bind(access, held.get(layer, []))
        for layer, experts in held.items():
            for e in experts:
                self.holdings[layer * self.n_experts + e] = 1
        self.held, self.expert_bytes = held, need

    def _announce_loop(self) -> None:
        period = self.options.announce_period_s
        while not self._stop.is_set():
            self.announce(expiration_s=3 * period)
            self._stop.wait(period)

    def announce(self, expiration_s: float) -> None:
        """What this peer holds and where, under the model's key on the DHT."""
        from hivemind.utils import get_dht_time

        value = {"held": {str(k): v for k, v in self.held.items()}, "maddrs": self.addresses}
        self.dht.store(self.model + ".held", value, get_dht_time() + expiration_s,
                       subkey=self.dht.peer_id.to_base58())

    @property
    def addresses(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def memory(self) -> dict[str, int]:
        helpers = helper_bytes()
        return {"process_bytes": rss_bytes(), "forked_helpers_bytes": helpers["forked"],
                "daemon_bytes": helpers["daemons"], "helper_processes": helpers["processes"],
                "expert_bytes": getattr(self, "expert_bytes", 0), "budget_bytes": self.budget}

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            if not self.runtime_thread.is_alive():
                raise RuntimeError("hivemind's runtime stopped")

    def stop(self) -> None:
        """Ends wait() (safe in a signal handler)."""
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        for step in (self.handler.shutdown, self.runtime.shutdown, self.dht.shutdown):
            try:
                step()
            except Exception:  # noqa: BLE001 (each part is ended even if one fails)
                pass
        if self.cache is not None:
            self.cache.close()
