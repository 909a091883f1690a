"""Speculative decoding: a draft model proposes up to k tokens, the full model checks them
in one exact pass (runner.step(..., exact=True): each position gets the bits a one-token
decode step would give), and the tokens it agrees with are kept.

A round, with history = every token so far (the last one yielded but not yet run):
  draft:  catch up on the tokens it has not run, then draw d1..dk, each from q_i
  target: one pass over [last, d1..dk] -> p_0..p_k
  keep d_i while u < p(d_i) / q(d_i); at the first rejection draw from norm(max(0, p - q));
  if all k are kept, one more token from p_k. Both models are cut back to what was kept:
  the KV records (runner.truncate) and the routing the target's predictor and recorder
  see (runner.commit_routes replays only the kept tokens).
With greedy decoding p and q are one-hot (moeedge.runtime.sampling.distribution), so a
draft token is kept exactly when it is the full model's argmax and the output is plain
greedy decoding's, token for token; with sampling the rule keeps the full model's
distribution (Leviathan et al. 2023; Chen et al. 2023).

k adapts (KChooser) from the measured acceptance rate and the measured costs of a draft
step and of a verify pass of each size; when no k beats plain decoding it turns itself
off, and tries again now and then.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from moeedge.draft import Draft, DraftPicks
from moeedge.kernels import NATIVE_MAX_TOKENS
from moeedge.models.runner import common_prefix
from moeedge.runtime.plan import prefill_borrow
from moeedge.runtime.sampling import Sampler, distribution
from moeedge.spec_choice import KChooser


def accept(target, dists: list[torch.Tensor], drafted: list[int], sampler: Sampler) -> list[int]:
    """The speculative sampling rule: drafted[i] (drawn from dists[i], the draft's q_i) is kept
    with chance min(1, p_i(d) / q_i(d)), p_i = target(i) the full model's distribution; at the
    first rejection one token from norm(max(0, p_i - q_i)) ends the round; if all are kept, one
    from p_k. The tokens out are then distributed as the full model's own draws would be."""
    out: list[int] = []
    for i, d in enumerate(drafted):
        p, q = target(i), dists[i]
        ratio = float(p[d]) / float(q[d])
        if ratio >= 1.0 or (ratio > 0.0 and sampler.uniform() < ratio):
            out.append(d)
            continue
        residual = (p - q).clamp_(min=0.0)
        out.append(sampler.draw(residual / residual.sum()))
        return out
    out.append(sampler.draw(target(len(drafted))))
    return out


class Speculator:
    """A model's speculative decoding with one draft (moeedge.draft.Draft)."""

    def __init__(self, draft: Draft, k_max: int = 6):
        self.draft = draft
        self.seq = draft.runner.new_sequence()
        self.chooser = KChooser(k_max)
        self.counts = {"rounds": 0, "drafted": 0, "accepted": 0, "plain_steps": 0, "kept_tokens": 0,
                       "draft_seconds": 0.0, "verify_seconds": 0.0, "plain_seconds": 0.0, "catch_up_seconds": 0.0,
                       "bytes_read": 0}
        self.recall = {"hit": 0, "needed": 0}  # the draft's router picks vs the full model's
        self.picks = DraftPicks(draft.runner)
        self.lent = 0  # the draft's expert bytes lent to the full model's cache while drafting is off
        self.catch_up_token_seconds: float | None = None  # the draft's catch-up, measured, per token

    # -- the draft's side --------------------------------------------------------------
    def _catch_up(self, history: list[int], chunk: int) -> torch.Tensor:
        """Run the tokens of history the draft has not run; its logits after the last. (After
        the prompt, in steps of at most NATIVE_MAX_TOKENS: the one-thread path, which on a
        busy CPU is many times quicker per token than torch's threads.)"""
        runner, seq = self.draft.runner, self.seq
        runner.truncate(seq, common_prefix(seq.ids, history))
        logits = None
        for i in range(len(seq.ids), len(history), chunk):
            logits = runner.step([(seq, torch.tensor(history[i:i + chunk]))])[0]
        return logits[-1]

    def _propose(self, history: list[int], k: int, sampler: Sampler, chunk: int):
        """k tokens and the distributions they were drawn from; the draft's router picks per token."""
        runner = self.draft.runner
        start, behind = time.perf_counter(), len(history) - len(self.seq.ids)
        if behind > 2:  # more than a round leaves (the last token, and the last draft if all were kept)
            self._catch_up(history[:-1], min(chunk, NATIVE_MAX_TOKENS))
            seconds = time.perf_counter() - start
            self.counts["catch_up_seconds"] += seconds
            self.catch_up_token_seconds = seconds / (behind - 1)
        runner.recorder = self.picks
        try:
            logits = self._catch_up(history, chunk)  # the first draft step
            drafted, dists, picks = [], [], [self.picks.take()]
            for i in range(k):
                q = distribution(logits, sampler.params, history + drafted)
                drafted.append(sampler.draw(q))
                dists.append(q)
                if i + 1 < k:
                    logits = runner.step([(self.seq, torch.tensor(drafted[-1:]))])[0][-1]
                    picks.append(self.picks.take())
        finally:
            runner.recorder = None
        return drafted, dists, picks

    # -- one round ---------------------------------------------------------------------
    def _verify(self, model, seq, history: list[int], drafted: list[int], dists: list[torch.Tensor],
                picks: list[dict[int, set[int]]], sampler: Sampler) -> list[int]:
        """The full model's pass over [last, drafted...]: the tokens it keeps, then its own one."""
        runner = model.runner
        before = len(seq.ids)
        guesses: dict[int, set[int]] = {}
        for row in picks:
            for layer, experts in row.items():
                guesses.setdefault(layer, set()).update(experts)
        runner.pass_guesses = guesses
        try:
            with torch.inference_mode():
                logits = runner.step([(seq, torch.tensor(history[-1:] + drafted))], all_logits=True, exact=True)[0]
        finally:
            runner.pass_guesses = None
        out = accept(lambda i: distribution(logits[i], sampler.params, history + drafted[:i]), dists, drafted,
                     sampler)
        kept = len(out) - 1  # drafted tokens kept; out[-1] is the full model's own
        self._score_picks(runner.held or [], picks[:1 + kept])
        runner.truncate(seq, before + 1 + kept)
        runner.commit_routes(1 + kept)
        return out

    def _score_picks(self, held: list, picks: list[dict[int, set[int]]]) -> None:
        """Recall of the draft's picks for the kept tokens (held: the verify pass's routing)."""
        for moe_layer, _, top_i, _ in held:
            for row, guessed in enumerate(picks):
                picked = set(top_i[row].tolist())
                self.recall["hit"] += len(picked & guessed.get(moe_layer, set()))
                self.recall["needed"] += len(picked)

    def stream(self, model, seq, history: list[int], logits: torch.Tensor, sampler: Sampler, max_new_tokens: int,
               eos: set[int]) -> Iterator[int]:
        """MoeModel.stream_ids' decode loop, speculative (history: the prompt, logits: after it)."""
        chunk = model.plan.prefill_chunk
        if not self.lent and self.chooser.k > 0:  # (while drafting is off, the next probe catches up)
            with prefill_borrow(model.cache, model.plan), torch.inference_mode():
                self._catch_up(history, chunk)  # the draft reads the prompt too, with a prompt's buffers
        token = sampler.choose(logits, history)
        emitted = 0
        while True:
            if token in eos:
                return
            yield token
            history.append(token)
            emitted += 1
            left = max_new_tokens - emitted
            if left == 0:
                return
            model._apply_budget()  # a set_budget waiting: between two tokens, as plain decoding applies it
            k = min(self.chooser.choose(), left - 1)
            start = time.perf_counter()
            reads = self._bytes_read(model)
            if k == 0:  # plain decoding: one step, one token
                if not self.lent:  # with the draft's expert bytes: plain decoding as it would be without a draft
                    store = model.cache.store
                    self.lent = self.draft.lend(model.cache, sum(store.slot_bytes(k_) for k_ in store.keys()))
                    if self.lent:  # its KV went too: the next probe catches up on everything
                        self.draft.runner.truncate(self.seq, 0)
                self.chooser.switch_cost = self._switch_cost(model, len(history))
                with torch.inference_mode():
                    logits = model.runner.step([(seq, torch.tensor([token]))])[0][-1]
                out = [sampler.choose(logits, history)]
                seconds = time.perf_counter() - start
                self.chooser.observe_plain(seconds)
                self.counts["plain_steps"] += 1
                self.counts["plain_seconds"] += seconds
            else:
                caught_before = self.counts["catch_up_seconds"]
                if self.lent:  # a probe: the draft's experts come back first (the probe's price)
                    self.draft.take_back(model.cache, self.lent)
                    self.lent = 0
                    self.counts["catch_up_seconds"] += time.perf_counter() - start
                with torch.inference_mode():
                    drafted, dists, picks = self._propose(history, k, sampler, chunk)
                mid = time.perf_counter()
                out = self._verify(model, seq, history, drafted, dists, picks, sampler)
                end = time.perf_counter()
                # a catch-up after plain steps is the probe's price, not a draft step's
                caught = self.counts["catch_up_seconds"] - caught_before
                self.chooser.observe_round(k, len(out) - 1, mid - start - caught, end - mid, end - start)
                self._count_round(k, len(out) - 1, mid - start, end - mid)
                seconds = end - start
                # the draft ran drafted[:k-1]: what the target kept of them stays, the rest goes
                keep = len(history) + len(out) - 1
                self.draft.runner.truncate(self.seq, min(len(self.seq.ids), keep))
            self.counts["bytes_read"] += self._bytes_read(model) - reads
            self.counts["kept_tokens"] += len(out)
            model._counters["generated_tokens"] += len(out)
            model._counters["decode_seconds"] += seconds
            for t in out[:-1]:
                if t in eos:
                    return
                yield t
                history.append(t)
                emitted += 1
                if emitted == max_new_tokens:
                    return
            token = out[-1]

    def _switch_cost(self, model, n: int) -> float:
        """Seconds a probe would pay beyond its round, at n tokens of history: the draft runs the
        tokens it has not seen (until measured, guessed at a quarter of a plain step each), and
        where its experts are lent, reads them back while the full model's cache loses as many."""
        per_token = self.catch_up_token_seconds
        if per_token is None:
            per_token = (self.chooser.plain_cost or 0.0) / 4
        return max(0, n - len(self.seq.ids) - 1) * per_token + 2 * self.lent * self._read_seconds_per_byte(model)

    def _read_seconds_per_byte(self, model) -> float:
        """Both caches' measured read time per byte (the draft's own experts read at load count)."""
        a, b = model.cache.stats(), self.draft.cache.stats()
        read = a["bytes_read"] + b["bytes_read"]
        return (a["read_seconds"] + b["read_seconds"]) / read if read else 0.0

    def _bytes_read(self, model) -> int:
        return model.cache.stats()["bytes_read"] + self.draft.cache.stats()["bytes_read"]

    def _count_round(self, k: int, kept: int, draft_s: float, verify_s: float) -> None:
        c = self.counts
        c["rounds"] += 1
        c["drafted"] += k
        c["accepted"] += kept
        c["draft_seconds"] += draft_s
        c["verify_seconds"] += verify_s

    def stats(self) -> dict:
        c = self.counts
        passes = c["rounds"] + c["plain_steps"]
        return {"draft": self.draft.path, "k": self.chooser.k, "draft_experts_lent": self.lent > 0,
                **self.chooser.stats(),
                "acceptance_rate": c["accepted"] / c["drafted"] if c["drafted"] else None,
                "tokens_per_verify_pass": c["kept_tokens"] / passes if passes else None,
                "bytes_read_per_token": c["bytes_read"] / c["kept_tokens"] if c["kept_tokens"] else None,
                "draft_pick_recall": (self.recall["hit"] / self.recall["needed"]) if self.recall["needed"] else None,
                **c}

    def close(self) -> None:
        self.draft.close()
