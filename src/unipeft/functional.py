"""Pure math of the deltas and their composition. No state, no modules: easy to test against formulas."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
    "linear": lambda x: x,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown non_linearity {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x·Aᵀ·Bᵀ.  x: (..., in), A: (r, in), B: (out, r) -> (..., out)."""
    return F.linear(F.linear(x, A), B)


class _AddmmInto(torch.autograd.Function):
    """h += alpha·z·Bᵀ written into h, as one autograd node on h itself. `h.view(-1, out).addmm_(...)` computes the
    same, but an in-place op on a view makes autograd rebase it (CopySlices over an AsStrided node): in backward a
    zero-filled copy of h's gradient, a strided copy and a clone per call, ~9 % of a CPU LoRA step on SmolLM2."""

    @staticmethod
    def forward(ctx, h, z, B, alpha):  # h (..., out) contiguous, z (N, r), B (out, r)
        h.view(-1, h.shape[-1]).addmm_(z, B.t(), alpha=alpha)
        ctx.mark_dirty(h)
        ctx.save_for_backward(z, B)
        ctx.alpha = alpha
        return h

    @staticmethod
    def backward(ctx, g):
        z, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gz = g2 @ (B * ctx.alpha) if ctx.needs_input_grad[1] else None  # scale the (out, r) factor, not (N, r)
        gB = (g2.t() @ z).mul_(ctx.alpha) if ctx.needs_input_grad[2] else None
        return g, gz, gB, None


def addmm_into(h: torch.Tensor, z: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """h + alpha·z·Bᵀ written into h and returned (h (..., out) contiguous and not a view, held by no one else: the
    fresh output of a linear; z (N, r) with N = h.numel() // out; B (out, r)). Gradients as torch.addmm's."""
    return _AddmmInto.apply(h, z, B, alpha)


class _LinearsLowRank(torch.autograd.Function):
    """Linears reading one x, each with its low-rank term (one linear; or q, k, v; gate, up): yᵢ = x·Wᵢᵀ + bᵢ +
    sᵢ·zᵢ·Bᵢᵀ with z = x·[A₁; A₂; …]ᵀ = [z₁ | z₂ | …] one thin GEMM reading x once, sᵢ·zᵢ·Bᵢᵀ written first and the
    frozen base GEMM accumulating onto it (β = 1 in its epilogue); in backward ∂x = (Σᵢ sᵢgᵢBᵢ as one (N, Σr) gz)·A +
    Σᵢ gᵢ·Wᵢ, every term accumulated in one buffer by the GEMMs' β = 1 epilogues, and ∂A = gzᵀ·x reads x once. A hook
    adding s·z·Bᵀ to a linear's output reads and writes the (tokens, out) output once more, and autograd sums one
    (tokens, in) input gradient per term in a pass of its own; here all ride in the base GEMMs, which are
    compute-bound. W is frozen; its gradient is computed if asked. The backward is differentiable (second
    derivatives, e.g. a gradient penalty): under create_graph it takes z = x·Aᵀ anew, with its graph, instead of the
    saved product."""

    @staticmethod
    def forward(ctx, x, A, ranks, scales, *Wbb):  # A (Σr, in); Wbb: W₁, b₁, B₁, W₂, b₂, B₂, ...
        ctx.set_materialize_grads(False)  # an unused output gets no gradient and costs none
        x2 = x.reshape(-1, x.shape[-1])
        z = x2 @ A.t()  # (N, Σr)
        outs, start = [], 0
        for i, r in enumerate(ranks):
            W, b, B = Wbb[3 * i:3 * i + 3]
            zi = z[:, start:start + r]
            start += r
            out = torch.addmm(z.new_zeros(()) if b is None else b, zi, B.t(), beta=0 if b is None else 1,
                              alpha=scales[i])
            outs.append(out.addmm_(x2, W.t()).view(*x.shape[:-1], W.shape[0]))
        ctx.save_for_backward(x, z, A, *Wbb)  # x, not its reshape: a view made here would have no graph to x
        ctx.ranks, ctx.scales = ranks, scales
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):
        x, z, A, *Wbb = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():  # a backward that builds a graph (create_graph): z with its own, x·Aᵀ
            z = x2 @ A.t()
        need = ctx.needs_input_grad
        grads = [None] * len(Wbb)
        gz, start = [], 0
        for i, (r, s, g) in enumerate(zip(ctx.ranks, ctx.scales, gs)):
            W, b, B = Wbb[3 * i:3 * i + 3]
            zi = z[:, start:start + r]
            start += r
            if g is None:
                gz.append(z.new_zeros(z.shape[0], r))
                continue
            g2 = g.reshape(-1, g.shape[-1])
            gz.append((g2 @ B).mul_(s))
            if need[4 + 3 * i]:
                grads[3 * i] = g2.t() @ x2
            if b is not None and need[5 + 3 * i]:
                grads[3 * i + 1] = g2.sum(0)
            if need[6 + 3 * i]:
                grads[3 * i + 2] = (g2.t() @ zi).mul_(s)
        gz = gz[0] if len(gz) == 1 else torch.cat(gz, 1)  # (N, Σr)
        dx = None
        if need[0]:
            dx = gz @ A
            for i, g in enumerate(gs):
                if g is not None:
                    dx.addmm_(g.reshape(-1, g.shape[-1]), Wbb[3 * i])
            dx = dx.view(x.shape)
        gA = gz.t() @ x2 if need[1] else None
        return (dx, gA, None, None, *grads)


def linear_low_rank(x: torch.Tensor, W: torch.Tensor, b, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """x·Wᵀ + b + s·x·Aᵀ·Bᵀ, the low-rank term inside the base GEMMs (forward and input gradient); all in x's dtype."""
    return _LinearsLowRank.apply(x, A, (A.shape[0],), (s,), W, b, B)[0]


def linears_low_rank(x: torch.Tensor, A: torch.Tensor, ranks: tuple[int, ...], scales: tuple[float, ...],
                     Ws, bs, Bs) -> tuple[torch.Tensor, ...]:
    """[x·Wᵢᵀ + bᵢ + sᵢ·(x·Aᵢᵀ)·Bᵢᵀ for each i], A = [A₁; A₂; …] stacked (Σr, in), in one autograd node (see
    _LinearsLowRank); all in x's dtype."""
    Wbb = [t for W, b, B in zip(Ws, bs, Bs) for t in (W, b, B)]
    return _LinearsLowRank.apply(x, A, tuple(ranks), tuple(scales), *Wbb)


def compose(h: torch.Tensor, dh: torch.Tensor, s) -> torch.Tensor:
    """h + s·Δh (add / scaled add; s may be a learned 0-d tensor)."""
    return h + dh * s if not (isinstance(s, float) and s == 1.0) else h + dh


def merge_linear(W: torch.Tensor, dW: torch.Tensor, transposed: bool) -> None:
    """W += ΔW in place, accumulating in fp32 (half-precision bases would otherwise lose the update).

    ΔW is (out, in); `transposed` is True for GPT-2's Conv1D whose weight is stored (in, out).
    """
    dW = dW.t() if transposed else dW
    W.data.copy_((W.data.float() + dW.float()).to(W.dtype))


def scale_linear(W: torch.Tensor, bias, l: torch.Tensor, side: str, transposed: bool, inverse: bool) -> None:
    """IA3 merge: W ← W·diag(l) (side "in") or diag(l)·W and b ← b⊙l (side "out"); `inverse` divides."""
    v = l.detach().float().flatten()
    if inverse:
        v = 1.0 / (v + 1e-8 * (v == 0))
    out_dim = 1 if transposed else 0
    dim = (1 - out_dim) if side == "in" else out_dim
    shape = [1, 1]
    shape[dim] = -1
    W.data.copy_((W.data.float() * v.view(shape)).to(W.dtype))
    if side == "out" and bias is not None:
        bias.data.copy_((bias.data.float() * v).to(bias.dtype))


def attention(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ/√d) v and the log of the softmax normaliser, per query.  q: (.., T, d), k/v: (.., S, d)."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (.., T, S)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1, keepdim=True)


def prefix_attention_gated(q, k, v, pk, pv) -> torch.Tensor:
    """He et al. 2022, eq. 7: (1-λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v), λ = the prefix's softmax mass."""
    h, lse = attention(q, k, v)
    hp, lse_p = attention(q, pk, pv)
    lam = torch.sigmoid(lse_p - lse)  # Σexp(q·P_k) / (Σexp(q·P_k) + Σexp(q·K))
    return (1 - lam) * h + lam * hp


def prefix_weights(a: torch.Tensor, normalization: str) -> torch.Tensor:
    """Prefix attention weights from the logits a (.., T, P), each query on its own: softmax over the prefix,
    or ReLU (no normalization: the multi-head parallel adapter's f)."""
    return F.relu(a) if normalization == "relu" else torch.softmax(a, -1)


def prefix_attention_added(q, pk, pv, normalization: str, scaling: float, softcap=None, dropout: float = 0.0,
                           training: bool = False) -> torch.Tensor:
    """Δhead = w(q P_kᵀ·scaling) P_v per head (He et al. 2022: ReLU gives the multi-head parallel adapter,
    ReLU(q_i W_1^(i)) W_2^(i) with W_1 = P_kᵀ, W_2 = P_v). q: (B, H, T, d); P_k, P_v: (B, H_kv, P, d) with
    H_kv dividing H (GQA: head i reads key/value head i // (H / H_kv), as the attention does). The logits are
    the attention's own (its scaling, its soft-cap), the dropout its attention dropout."""
    rep = q.shape[1] // pk.shape[1]
    if rep > 1:
        pk, pv = pk.repeat_interleave(rep, 1), pv.repeat_interleave(rep, 1)
    a = (q @ pk.transpose(-1, -2)) * scaling  # (B, H, T, P)
    if softcap:
        a = softcap * torch.tanh(a / softcap)
    w = F.dropout(prefix_weights(a, normalization), p=dropout, training=training) if dropout else \
        prefix_weights(a, normalization)
    return w.to(pv.dtype) @ pv  # (B, H, T, d)
