"""Distillation: start from a merged or low-rank variant of a layer and fit its stored
experts to reproduce the source layer's output (the teacher) on the calibration states,
layer by layer, with the router and the router-to-stored-expert table as they are.

1. Closed-form least squares for the output projections. With routing fixed, the layer's
   output is linear in every stored expert's down weight: y = sum_s g_s D_s h_s(x), h_s
   the expert's intermediate activations. All D_s are solved together (for a low-rank
   layer: the base's down weight and every expert's down factor b, with a fixed), as a
   ridge regression towards the starting weights; the ridge is chosen on held-out tokens,
   and "no change" is one of the choices, so this step never does worse there. With top-1
   routing (Switch) and no shared base, each stored expert's down weight is solved alone.
2. A short gradient refinement of all the stored weights (Adam, mean squared output
   error, mini-batches of the fitted tokens), kept only where it lowers the error on the
   held-out tokens, and stopped once that error has not improved for PATIENCE checks.

Fitted tokens and held-out tokens are whole calibration windows (calibration.held_out),
all from the training corpus. The report gives the held-out relative error before, after
the least squares and at the end. Shapes: N = tokens, H = hidden, I = intermediate,
n = stored experts, r = rank, p = unknowns per output dimension.
"""
from __future__ import annotations

import torch

from moeedge.aggregate.layer import LowRank, MoeLayer, Variant

RIDGE = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the normal matrix's mean diagonal
STEPS = 300
BATCH = 1024
LR = 2.5e-3  # Adam's step, relative to each tensor's RMS (weights and factors differ in scale)
CHECK_EVERY = 25  # steps between held-out measurements; the best state is kept
PATIENCE = 4      # measurements without a new best before refinement stops


def design(layer: MoeLayer, v: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """(X [N, p], W [p, H]): the layer's output is X @ W, W holding the down weights that
    least squares solves for. Each stored expert runs on its own tokens only."""
    g = layer.gates(v.table)                                            # [N, n]
    x = layer.calibration.hidden
    down = v.experts.parts[-1]                                          # [n, H, I]
    inter, n = down.shape[2], len(v.experts)
    width = n * inter if v.lowrank is None else inter + n * v.lowrank.rank
    out = torch.zeros(len(x), width)
    for s in range(n):
        tokens = torch.where(g[:, s] > 0)[0]
        h = v.experts.hidden(s, x[tokens]) * g[tokens, s, None]         # [M, I]
        if v.lowrank is None:
            out[tokens, s * inter:(s + 1) * inter] = h
        else:  # the base's down weight sees every expert's activations; expert s's b, its a h
            r = v.lowrank.rank
            out[tokens, :inter] += h
            out[tokens, inter + s * r:inter + (s + 1) * r] = h @ v.lowrank.a[-1][s].T
    if v.lowrank is None:
        return out, torch.cat(list(down.transpose(1, 2)))
    return out, torch.cat([v.lowrank.base[-1].T, *v.lowrank.b[-1].transpose(1, 2)])


def problems(layer: MoeLayer, v: Variant) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The independent least-squares problems (tokens [M], X [M, p], W [p, H]) the layer's
    output splits into. With top-1 routing and no shared base, every token's output is one
    stored expert's: each expert is a problem of its own (its block of the normal matrix),
    which keeps Switch's 1,024-wide experts small enough to solve."""
    g = layer.gates(v.table)
    x = layer.calibration.hidden
    if v.lowrank is not None or int((g > 0).sum(1).max()) > 1:
        return [(torch.arange(len(x)), *design(layer, v))]
    out = []
    for s in range(len(v.experts)):
        tokens = torch.where(g[:, s] > 0)[0]
        out.append((tokens, v.experts.hidden(s, x[tokens]) * g[tokens, s, None], v.experts.parts[-1][s].T))
    return out


def with_down(layer: MoeLayer, v: Variant, w: torch.Tensor) -> Variant:
    """The variant with the solved down weights W [p, H], rounded as stored."""
    if v.lowrank is None:
        down = w.T.reshape(v.experts.parts[-1].shape[1], len(v.experts), -1).transpose(0, 1)
        return Variant(v.table, layer.rounded(v.experts.like((*v.experts.parts[:-1], down))))
    lr = v.lowrank
    inter, rank = lr.a[-1].shape[2], lr.rank
    base_down = w[:inter].T.to(layer.dtype).float()
    b_down = w[inter:].reshape(len(lr.a[-1]), rank, -1).transpose(1, 2).to(layer.dtype).float()
    return lowrank_variant(v.table, LowRank((*lr.base[:-1], base_down), lr.a, (*lr.b[:-1], b_down), lr.kind))


def lowrank_variant(table: list[int], lowrank: LowRank) -> Variant:
    return Variant(table, lowrank.experts(), lowrank)


def least_squares(layer: MoeLayer, v: Variant, fit: torch.Tensor, held: torch.Tensor) -> tuple[Variant, float | None]:
    """Step 1: the ridge (or None: unchanged) that does best on the held-out tokens."""
    y = layer.reference_output.double()
    is_fit = torch.zeros(len(y), dtype=torch.bool).index_fill_(0, fit, True)
    is_held = torch.zeros(len(y), dtype=torch.bool).index_fill_(0, held, True)
    solved, diagonals = [], []
    for tokens, x, w0 in problems(layer, v):
        x, w0, yt = x.double(), w0.double(), y[tokens]
        xf, f, h = x[is_fit[tokens]], is_fit[tokens], is_held[tokens]
        # The normal matrix's eigenvectors from a thin SVD of X: with fewer tokens than
        # unknowns (Switch's experts see tens of tokens, 3,072 wide) this is M^2 p instead
        # of eigh's p^3, and the directions it leaves out carry no right-hand side.
        u, sv, vh = torch.linalg.svd(xf, full_matrices=False)
        evals, evecs = sv.square(), vh.T
        rhs = sv[:, None] * (u.T @ (yt[f] - xf @ w0))
        solved.append((x[h], yt[h], w0, evals, evecs, rhs))
        diagonals.append(xf.square().sum(0))
    scale = float(torch.cat(diagonals).mean())

    def held_error(ridge: float | None) -> tuple[float, list[torch.Tensor]]:
        ws = [w0 if ridge is None else w0 + evecs @ (rhs / (evals + ridge * scale)[:, None])
              for _, _, w0, evals, evecs, rhs in solved]
        return sum(float((xh @ w - yh).pow(2).sum()) for (xh, yh, *_), w in zip(solved, ws)), ws

    best, best_err = None, held_error(None)[0]
    for ridge in RIDGE:
        err, ws = held_error(ridge)
        if err < best_err:
            best, best_err = (ridge, ws), err
    if best is None:
        return v, None
    return with_down(layer, v, torch.cat(best[1]).float()), best[0]


def stored_weights(v: Variant) -> list[torch.Tensor]:
    """What the variant stores, the tensors refinement moves: base, a and b, or each
    expert's weights one tensor per expert and part (in part order). Per-expert leaves,
    not slices of a stacked tensor: a slice's backward fills a gradient of the whole
    stack, and at Switch-Base-128's size (38 experts of 4.7M weights per part) those
    allocations, not the arithmetic, took most of each step."""
    if v.lowrank is not None:
        return [*v.lowrank.base, *v.lowrank.a, *v.lowrank.b]
    return [t for part in v.experts.parts for t in part.unbind(0)]


def _per_part(v: Variant, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    n = len(v.experts)
    return [params[i * n:(i + 1) * n] for i in range(len(v.experts.parts))]


def formed(v: Variant, params: list[torch.Tensor]) -> Variant:
    """The variant computed from params (as stored_weights orders them), differentiably;
    its parts are tuples of per-expert tensors."""
    if v.lowrank is None:
        return Variant(v.table, v.experts.like(tuple(p) for p in _per_part(v, params)))
    k = len(v.lowrank.base)
    base, a, b = params[:k], params[k:2 * k], params[2 * k:]
    return Variant(v.table, v.experts.like((bs + bb @ aa).unbind(0) for bs, aa, bb in zip(base, a, b)))


def as_variant(layer: MoeLayer, v: Variant, params: list[torch.Tensor]) -> Variant:
    if v.lowrank is None:
        return Variant(v.table, v.experts.like(torch.stack(p).detach().to(layer.dtype).float()
                                               for p in _per_part(v, params)))
    stored = [p.detach().to(layer.dtype).float() for p in params]
    k = len(v.lowrank.base)
    return lowrank_variant(v.table, LowRank(tuple(stored[:k]), tuple(stored[k:2 * k]), tuple(stored[2 * k:]),
                                            v.lowrank.kind))


def refine(layer: MoeLayer, v: Variant, fit: torch.Tensor, held: torch.Tensor) -> tuple[Variant, int]:
    """Step 2: (the best state seen on the held-out tokens, at which step; 0: the start).
    Stops early once PATIENCE measurements in a row have not improved on the best."""
    y = layer.reference_output
    params = [t.clone().requires_grad_() for t in stored_weights(v)]
    # Each stored tensor's step is LR times its RMS; an expert's weights take their part's
    # (all experts together), as when each part was one stacked tensor.
    scales = ([t for part in v.experts.parts for t in [part] * len(v.experts)] if v.lowrank is None else params)
    # fused: one pass over each tensor and no temporaries (the default takes five)
    opt = torch.optim.Adam([{"params": [p], "lr": LR * float(t.detach().pow(2).mean().sqrt().clamp_min(1e-6))}
                            for p, t in zip(params, scales)], fused=True)
    rng = torch.Generator().manual_seed(layer.index)

    def held_error() -> float:
        with torch.no_grad():
            return layer.relative_error(formed(v, params), held)

    best, best_step, best_err = [p.detach().clone() for p in params], 0, held_error()
    for step in range(1, STEPS + 1):
        batch = fit[torch.randperm(len(fit), generator=rng)[:BATCH]]
        out = layer.output(formed(v, params), batch)
        loss = (out - y[batch]).pow(2).sum() / y[batch].pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % CHECK_EVERY == 0:
            if (err := held_error()) < best_err:
                best, best_step, best_err = [p.detach().clone() for p in params], step, err
            elif step - best_step >= PATIENCE * CHECK_EVERY:
                break
    return as_variant(layer, v, best), best_step


def distill(layer: MoeLayer, start: Variant) -> Variant:
    held_mask = layer.calibration.held_out
    fit, held = torch.where(~held_mask)[0], torch.where(held_mask)[0]
    before = layer.relative_error(start, held)
    if before == 0:  # every expert kept as it is: nothing to fit
        start.report = {"held_out_error_before": 0.0, "held_out_error_lstsq": 0.0, "held_out_error_after": 0.0,
                        "ridge": None, "refine_steps": 0}
        return start
    solved, ridge = least_squares(layer, start, fit, held)
    if ridge is not None and layer.relative_error(solved, held) >= before:  # undone by rounding
        solved, ridge = start, None
    after_lstsq = layer.relative_error(solved, held)
    refined, step = refine(layer, solved, fit, held)
    final = refined if step and layer.relative_error(refined, held) < after_lstsq else solved
    final.report = {"held_out_error_before": before, "held_out_error_lstsq": after_lstsq,
                    "held_out_error_after": layer.relative_error(final, held), "ridge": ridge,
                    "refine_steps": step if final is refined else 0}
    return final
