"""Error budgets for the kernel tests: every bound is derived here from a rounding-error analysis.

A test computes the exact result in float64 (the "truth"), then asserts |ours − truth| ≤ budget elementwise,
where the budget comes from the formulas below, evaluated on the float64 values of the inputs. Nothing here
depends on the machine, the BLAS library, the thread count or on how large the fp32 reference's own error
happens to be; the fp32 reference is held to the same budgets as the kernels.

The model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., ch. 2-4; Higham & Mary, "A new
approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019):

- u is the unit roundoff of the precision a step runs in (`UNIT_ROUNDOFF`: fp32 2^-24, fp16 2^-11,
  bf16 2^-8, fp64 2^-53). A correctly rounded +, −, ×, ÷ or sqrt has a relative error ≤ u,
  plus an absolute error ≤ `TINY`/2 where the result underflows (only the tiny gradients of far-out logits
  get there: e^(z − lse) < 2^-126).
- exp, exp2, log, log2, sigmoid and the approximate ÷ / sqrt of GPU code have a relative error ≤ `FN_ERR`·u
  (8u = 4 ulp; SLEEF's u10 functions used by ATen are ≤ 1 ulp, PTX ex2/lg2.approx ≤ 2 ulp).
- A sum (or dot product) of n terms, in ANY order (recursive, pairwise, blocked, split across tiles or
  threads), returns Σ x_i (1 + θ_i) with |θ_i| ≤ `eta(n, u)` = min(γ_n, γ̃_n(λ)):
      γ_n     = n·u / (1 − n·u)                       deterministic, always holds (Higham Lemma 3.1, eq. 4.4);
      γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1        ≈ λ·√n·u, when the rounding errors are independent,
                                                      mean-zero random variables (Higham & Mary Thm 2.4/3.1).
  The probabilistic bound holds with probability ≥ 1 − 2n·exp(−λ²(1 − u)²/2); with λ = `LAMBDA` = 8 and
  n ≤ 2^18 that is 1 − 7e-9 per sum. For n < λ² the deterministic bound is the smaller one. Hence
      |fl(Σ x_i) − Σ x_i| ≤ eta(n, u) · Σ|x_i|,
  i.e. the budget scales with the magnitude of the terms, never with the result (cancellation is allowed).
- Bounds are first order in u; the dropped O(u²) terms are far below the margin of the rounded-up constants.

Each helper below states which computation it bounds; the tests say which helper applies. `TOLERANCES` is
the one table, per dtype, for the remaining comparisons of short elementwise formulas (see
`ELEMENTWISE_ROUNDINGS`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}
U32 = UNIT_ROUNDOFF[torch.float32]
# Smallest subnormal: below the normal range a rounding's error is absolute, ≤ half of this (underflow).
TINY: dict[torch.dtype, float] = {
    torch.float64: 2.0 ** -1074,
    torch.float32: 2.0 ** -149,
    torch.float16: 2.0 ** -24,
    torch.bfloat16: 2.0 ** -133,
}
# Confidence parameter of the probabilistic bound: failure probability ≤ 2n·e^(−32) ≈ 2.5e-14·n per sum.
LAMBDA = 8.0
# Relative error of transcendental functions and GPU approximate ÷ / sqrt, in units of u (4 ulp).
FN_ERR = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def gamma(n: int, u: float) -> float:
    """Deterministic γ_n = n·u / (1 − n·u) (inf once n·u ≥ 1)."""
    return n * u / (1.0 - n * u) if n * u < 1.0 else math.inf


def gamma_prob(n: int, u: float, lam: float = LAMBDA) -> float:
    """Probabilistic γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1 (Higham & Mary 2019)."""
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1.0 - u))


def eta(n: int, u: float) -> float:
    """Relative error factor of an n-term sum or dot product in any order: min(γ_n, γ̃_n(λ))."""
    n = max(int(n), 1)
    return min(gamma(n, u), gamma_prob(n, u))


# ---- The table: short elementwise formulas -----------------------------------------------------------------

# A value formed from exact or correctly rounded O(1) inputs by at most this many roundings (or FN_ERR-ulp
# functions counted as FN_ERR roundings), with no sum over more than a handful of terms, is within
# ELEMENTWISE_ROUNDINGS·u·(1 + |x|) of its exact value x (errors add to first order). 32 covers e.g. the
# division of two exact counts (1), a hand-worked loss of four tokens (~12), an exp (8) and its product.
ELEMENTWISE_ROUNDINGS = 32


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


def _elementwise(dtype: torch.dtype) -> Tolerance:
    k_u = ELEMENTWISE_ROUNDINGS * UNIT_ROUNDOFF[dtype]
    return Tolerance(atol=k_u, rtol=k_u)


TOLERANCES: dict[torch.dtype, Tolerance] = {dt: _elementwise(dt) for dt in UNIT_ROUNDOFF}


def tolerance(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[dtype]


def assert_close(name: str, expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype | None = None,
                 *, atol: float | None = None, rtol: float | None = None) -> None:
    """|actual − expected| ≤ atol + rtol·|expected|, by default the `TOLERANCES` entry of `dtype` (default:
    expected's dtype), i.e. a short elementwise formula (see ELEMENTWISE_ROUNDINGS)."""
    tol = TOLERANCES[dtype or expected.dtype]
    atol = tol.atol if atol is None else atol
    rtol = tol.rtol if rtol is None else rtol
    expected = expected.detach().to(torch.float64)
    assert_within(name, expected, actual, atol + rtol * expected.abs())


def assert_within(name: str, truth: torch.Tensor, actual: torch.Tensor, bound: torch.Tensor | float) -> float:
    """Assert |actual − truth| ≤ bound elementwise (bound: a tensor broadcastable to truth, or a float).

    Returns the largest ratio error / bound (≤ 1 on success; 0 where both are 0), for reports. On failure the
    message names the tensor, the count out of budget, the worst ratio and the first offending indices.
    """
    truth = truth.detach().to(torch.float64)
    actual = actual.detach().to(truth.device, torch.float64)
    bound = torch.as_tensor(bound, dtype=torch.float64).to(truth.device).expand_as(truth)
    if truth.shape != actual.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(truth.shape)}")
    finite = torch.isfinite(truth)
    same = torch.where(finite, torch.isfinite(actual), (actual == truth) | (actual.isnan() & truth.isnan()))
    if not same.all():
        bad = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values where the truth is finite, or the reverse, at {bad}")
    err = torch.where(finite, (actual - truth).abs(), 0.0)
    bad = err > bound
    ratio = torch.where(err > 0, err / bound, 0.0)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        first = tuple(idx[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of budget, worst error/budget {worst:.3g}; "
            f"max abs err {err.max().item():.3e}; first at {idx}: expected {truth[first].item():.9g}, "
            f"got {actual[first].item():.9g}, budget {bound[first].item():.3e}")
    return worst


def num_test_threads() -> int:
    """CPU threads for the kernel tests: $NPO_TEST_THREADS, else min(2, torch's default), which follows
    $OMP_NUM_THREADS (the project's CPU machines have 2 shared cores). The budgets do not depend on it."""
    value = os.environ.get("NPO_TEST_THREADS")
    if value:
        return max(1, int(value))
    return min(2, torch.get_num_threads())


# ---- Log-softmax family: selective_logprob and fused_linear_logprob ----------------------------------------

@dataclass(frozen=True)
class SoftmaxBudget:
    """Per-row bounds [N] on the forward outputs, and `dz(g, g_h)` for the gradient; see `softmax_budget`."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    mu: torch.Tensor
    _parts: dict

    def _weights(self, g, g_h):
        parts = self._parts
        shape = (parts["p"].shape[0], 1)
        dev = parts["p"].device
        zero = torch.zeros(shape, dtype=torch.float64, device=dev)
        g = zero if g is None else g.detach().to(dev, torch.float64).view(shape)
        g_h = zero if g_h is None else g_h.detach().to(dev, torch.float64).view(shape)
        return g, g_h, shape

    def exact_dz(self, g: torch.Tensor | None, g_h: torch.Tensor | None) -> torch.Tensor:
        """[N, V] float64 dz_j = g·1(j = y) − p_j·(g + g_H·(z_j − μ)), 0 on ignored rows: the exact gradient
        with respect to z = logits / T of Σ g·logp + Σ g_H·H (either weight may be None)."""
        parts = self._parts
        g, g_h, shape = self._weights(g, g_h)
        p = parts["p"]
        coef = g + g_h * (parts["lp"] + parts["entropy_true"].view(shape))
        dz = torch.where(p > 0, -p * coef, 0.0)
        dz.scatter_add_(1, parts["safe_targets"].view(shape), g)
        return torch.where(parts["valid"].view(shape), dz, 0.0)

    def dz(self, g: torch.Tensor | None, g_h: torch.Tensor | None) -> torch.Tensor:
        """[N, V] bound on |dz_j − exact| for the loss Σ g·logp + Σ g_H·H, dz = ∂loss/∂z (z = logits / T).

        The exact gradient is dz_j = g·1(j = y) − p_j·c_j with c_j = g + g_H·(z_j − μ). The three forms in
        use (the Triton kernel: p_j·(g + g_H·(z_j − mu)); the chunked paths: p_j·(a + b·lp_j) with
        a = g + g_H·(lse − mu); the reference's autograd: −g_H·p_j(1 + lp_j) − p_j·Σ_k(∂/∂lp_k)) each have
        their errors within, per element (first order):
            p_j relative:  ρ_j = E_j + δ_lse + u·(c + 3 + 3|lp_j| + 2|lse|)        (z_j − lse, exp)
            c_j absolute:  |g_H|·(E_j + 2δ_lse + δ_μ + 2u(|z_j| + |lse| + |μ|)) + 3u|c_j|
            |δdz_j| ≤ p_j·[|c_j|(ρ_j + 3u) + δc_j + η_S(|g| + |g_H|(1 + H)) + 2u|g_H|(|lp_j| + H + 2)]
                      + 2u|g|·1(j = y) + (c + 3)·TINY·(|c_j| + 1)
        where the η_S term is the reference's V-term sum Σ_k ∂/∂lp_k and the last p_j term its cancellation
        of −g_H p_j(1 + lp_j) against p_j·g_H(1 − H), and the TINY term an underflowing p_j (a subnormal
        fp32 exp, good only to its absolute spacing). Ignored rows and p_j = 0 columns: exactly 0.
        """
        parts = self._parts
        p, lp, z_abs, e, valid = parts["p"], parts["lp"], parts["z_abs"], parts["e"], parts["valid"]
        u, c, eta_s = parts["u"], FN_ERR, parts["eta_s"]
        g, g_h, shape = self._weights(g, g_h)
        lse = parts["lse"].view(shape)
        mu = parts["mu_true"].view(shape)
        ent = parts["entropy_true"].view(shape)
        d_lse = self.lse.view(shape)
        d_mu = self.mu.view(shape)
        coef = g + g_h * (lp + ent)                       # z_j − μ = lp_j + H; finite where p_j > 0
        rho = e + d_lse + u * (c + 3 + 3 * lp.abs() + 2 * lse.abs())
        d_coef = (g_h.abs() * (e + 2 * d_lse + d_mu + 2 * u * (z_abs + lse.abs() + mu.abs()))
                  + 3 * u * coef.abs())
        per_p = (coef.abs() * (rho + 3 * u) + d_coef + eta_s * (g.abs() + g_h.abs() * (1 + ent))
                 + 2 * u * g_h.abs() * (lp.abs() + ent + 2))
        bound = torch.where(p > 0, p * per_p + (c + 3) * parts["tiny"] * (coef.abs() + 1), 0.0)
        onehot = torch.zeros_like(bound)
        onehot.scatter_(1, parts["safe_targets"].view(shape), 2 * u * g.abs())
        return torch.where(valid.view(shape), bound + onehot, 0.0)


def softmax_budget(z: torch.Tensor, targets: torch.Tensor, z_err: torch.Tensor | float, *,
                   merges: int = 1, u: float = U32, tiny: float = TINY[torch.float32]) -> SoftmaxBudget:
    """Bounds on logp, entropy, lse, μ = Σp·z of softmax(z) computed in precision u, per row.

    Args:
        z: [N, V] the exact scaled logits z = logits / T in float64 (−inf allowed: a masked column).
        targets: [N] int, negative = ignored row (its bounds are 0: the ops return exact zeros there).
        z_err: bound E_j on |ẑ_j − z_j|, the error of the logits as the kernel forms them, broadcastable to
            [N, V]: `scaled_logits_error` for logits given as a tensor, `gemm_logits_error` for fused logits.
        merges: how many times an online (tiled) pass rescales its running sums by a rounded
            2^(m_old − m_new) (the number of vocabulary blocks or tiles; 1 for a two-pass softmax). Each
            rescale perturbs the partial sum like an addition with a relative error (c + 1)u, so it counts
            as (c + 1)² additions in the probabilistic model: η_S = eta(V + (c + 1)²·merges, u).

    Per valid row, with m = max z, ℓ = lse − m = log Σ e^(z−m) ≥ 0, p, lp = z − lse, μ = Σp·z, H = lse − μ,
    P2 = Σp·lp², Ē = Σp·E, E_W = Σp·|z − μ|·E, c = FN_ERR (all first order):
        logits:    a perturbation δz changes lse by Σp·δz (≤ Ē), logp by δz_y − Σp·δz, H by −Σp(z − μ)δz.
        δℓ       = η_S + u(c + 1 + c·H)        the V-term positive sum S = Σe^(z−m) (η_S), its terms' exp and
                                               shift z − m (c·u + u|z − m|, p-weighted: u(c + D), D = m − μ),
                                               log S (c·u·ℓ); D + ℓ = H.
        δlse     = Ē + δℓ + 3u(|m| + ℓ)        m + ℓ and the ln 2 / log2 e conversions.
        δlogp    = E_y + Ē + δℓ + 4u|logp|     (z_y − m) − ℓ: |z_y − m| ≤ |logp|.
        δH       = E_W + (1 + H)δℓ + 3η_S·H + u((2c + 6)H + 3·P2)
                   covers both forms: −Σp·lp (an error δℓ in the normalizer moves it by (H − 1)δℓ; each
                   lp_j carries 2u|lp_j|, weighted by p_j|lp_j|: 2u·P2) and log S − Σp(z − m) from the
                   running sums (the s/S quotient: 2η_S·D; its terms e_j·d_j carry u(c + 2 + |d_j|)).
        δμ       = δlse + δH + u|μ|            μ is formed as lse − H, or directly as m + s/S.
    """
    z = z.detach().to(torch.float64)
    num_rows, n_cols = z.shape
    dev = z.device
    valid = (targets >= 0).to(dev)
    safe_targets = torch.where(valid, targets.to(dev), 0).to(torch.int64)
    c = FN_ERR
    eta_s = eta(n_cols + (c + 1) ** 2 * merges, u)
    finite = torch.isfinite(z)
    e = torch.as_tensor(z_err, dtype=torch.float64, device=dev).expand(num_rows, n_cols)
    e = torch.where(finite, e, 0.0)
    m = z.amax(dim=1, keepdim=True)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    p = torch.exp(z - lse)
    lp = torch.where(p > 0, z - lse, 0.0)
    z_fin = torch.where(finite, z, 0.0)
    mu = (p * z_fin).sum(1, keepdim=True)
    ent = lse - mu
    ell = lse - m
    p2 = (p * lp * lp).sum(1, keepdim=True)
    e_bar = (p * e).sum(1, keepdim=True)
    e_w = (p * (z_fin - mu).abs() * e).sum(1, keepdim=True)
    e_y = e.gather(1, safe_targets.view(-1, 1))
    logp = z.gather(1, safe_targets.view(-1, 1)) - lse

    d_ell = eta_s + u * (c + 1 + c * ent)
    d_lse = e_bar + d_ell + 3 * u * (m.abs() + ell)
    d_logp = e_y + e_bar + d_ell + 4 * u * logp.abs()
    d_ent = e_w + (1 + ent) * d_ell + 3 * eta_s * ent + u * ((2 * c + 6) * ent + 3 * p2)
    d_mu = d_lse + d_ent + u * mu.abs()

    def rows(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.view(-1), 0.0)

    parts = dict(p=p, lp=lp, z_abs=z_fin.abs(), e=e, valid=valid, u=u, eta_s=eta_s, lse=lse, mu_true=mu,
                 entropy_true=ent, safe_targets=safe_targets, tiny=tiny)
    return SoftmaxBudget(logp=rows(d_logp), entropy=rows(d_ent), lse=rows(d_lse), mu=rows(d_mu), _parts=parts)


def scaled_logits_error(z: torch.Tensor, u: float = U32) -> torch.Tensor:
    """E_j for z = logits / T formed from logits given exactly (any float dtype upcast to fp32): 2u|z_j|
    (the rounded scale 1/T or log2(e)/T, and the product; a division by T is one rounding)."""
    return 2 * u * torch.where(torch.isfinite(z), z.abs(), 0.0)


def gemm_logits_error(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      temperature: float, *, u_acc: float = U32, u_out: float = 0.0, u: float = U32
                      ) -> torch.Tensor:
    """E_j [N, V] for z = (hidden @ weight.T + bias) / T formed by a GEMM (the fused op's tiles, or the
    reference's full matmul), inputs given exactly:
        E_j = eta(H + 3, u_acc)·(Σ_k |x_k w_jk| + |b_j|) / T + (u_out + 2u)·|z_j|
    the H-term dot product plus the bias add and the scale by alpha (3 more roundings, accumulated in
    precision u_acc), the GEMM output rounded to the input dtype (u_out; 0 for fp32 output), and the
    upcast-and-scale to fp32 (2u)."""
    x = hidden.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    z = x @ w.T
    mag = x.abs() @ w.abs().T
    if bias is not None:
        b = bias.detach().to(torch.float64)
        z = z + b
        mag = mag + b.abs()
    n = x.shape[1] + 3
    return (eta(n, u_acc) * mag + (u_out + 2 * u) * z.abs()) / temperature


def matmul_budget(a_abs: torch.Tensor, a_err: torch.Tensor, b_abs: torch.Tensor, u_acc: float
                  ) -> torch.Tensor:
    """Bound on |fl(Â @ B) − A @ B| when each Â element is within a_err of A's and B is exact:
        Σ_k a_err_ik·|b_kj| + eta(K, u_acc)·Σ_k |a_ik·b_kj|
    plus K·TINY for products that underflow (K = a_abs.shape[1]); used for dX = dlogits @ W (K = V),
    dW = dlogits.T @ X (K = N), db (B = ones)."""
    k = a_abs.shape[1]
    return a_err @ b_abs + eta(k, u_acc) * (a_abs @ b_abs) + k * TINY[torch.float32]


def store_error(x_abs: torch.Tensor, store: torch.dtype | None) -> torch.Tensor:
    """The one rounding of an fp32 result to a narrower `store` dtype: u·|x| + TINY/2 (0 for None)."""
    if store is None:
        return torch.zeros_like(x_abs)
    return UNIT_ROUNDOFF[store] * x_abs + TINY[store] / 2


def selective_logprob_budget(logits: torch.Tensor, targets: torch.Tensor, g_logp: torch.Tensor | None,
                             g_entropy: torch.Tensor | None, *, temperature: float = 1.0, merges: int = 1,
                             store: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Bounds on selective_logprob's logp [N], entropy [N] and dlogits [N, V] for the loss
    Σ g_logp·logp + Σ g_entropy·H, logits given exactly (fp32, or fp16/bf16 upcast exactly):
        E_j = scaled_logits_error(z);  dlogits = dz / T:  (|δdz| + 2u|dz|)/T + store_error(|dlogits|)
    (the 1/T product, and the one rounding to a half-precision gradient, `store`; None for fp32)."""
    z = logits.detach().to(torch.float64) / temperature
    sb = softmax_budget(z, targets, scaled_logits_error(z), merges=merges)
    dz = sb.exact_dz(g_logp, g_entropy).abs()
    d_logits = (sb.dz(g_logp, g_entropy) + 2 * U32 * dz) / temperature + store_error(dz / temperature, store)
    return {"logp": sb.logp, "entropy": sb.entropy, "dlogits": d_logits}


def fused_linear_budget(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None, *,
                        temperature: float = 1.0, merges: int = 1, u_acc: float = U32,
                        store: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Bounds on fused_linear_logprob's logp, entropy [N] and dhidden [N, H], dweight [V, H], dbias [V].

    Logits from `gemm_logits_error` (u_acc: the GEMMs' accumulation precision; `store`: the dtype of a
    half-precision logits tile, dlogits tile and gradient, None for fp32 inputs), then per element
        dlogits = dz / T within B_dl = (|δdz| + 2u|dz|)/T + store_error(|dlogits|)
        dX = dlogits @ W:   matmul_budget(|dlogits|, B_dl, |W|)          a V-term sum per element
        dW = dlogits.T @ X: matmul_budget(|dlogits|.T, B_dl.T, |X|)      an N-term sum (across token chunks,
                                                                          in fp32: any order)
        db = Σ_n dlogits:   the same with X = 1
    each plus store_error(|result|) for the one cast to the input dtype.
    """
    x = hidden.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    z = x @ w.T
    if bias is not None:
        z = z + bias.detach().to(torch.float64)
    z = z / temperature
    u_out = 0.0 if store is None else UNIT_ROUNDOFF[store]
    err = gemm_logits_error(hidden, weight, bias, temperature, u_acc=u_acc, u_out=u_out)
    sb = softmax_budget(z, targets, err, merges=merges)
    dl = sb.exact_dz(g_logp, g_entropy) / temperature
    dl_abs = dl.abs()
    d_dl = (sb.dz(g_logp, g_entropy) / temperature + 2 * U32 * dl_abs) + store_error(dl_abs, store)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
    return {
        "logp": sb.logp,
        "entropy": sb.entropy,
        "dhidden": matmul_budget(dl_abs, d_dl, w.abs(), u_acc) + store_error((dl @ w).abs(), store),
        "dweight": matmul_budget(dl_abs.T, d_dl.T, x.abs(), u_acc) + store_error((dl.T @ x).abs(), store),
        "dbias": (matmul_budget(dl_abs.T, d_dl.T, ones, u_acc) + store_error((dl.T @ ones).abs(), store)
                  ).view(-1),
    }


# ---- Policy loss -------------------------------------------------------------------------------------------

def policy_token_rel_error(log_r_abs_max: float, logp_abs_max: float, shaping_gamma: float,
                           u: float = U32) -> float:
    """Relative error ρ of one token's loss term, for every form (first order):
        ρ = u·(2c + 4 + 2·max|log r| + max|logp| + 2|ln γ|)
    log r = clamp(logp − behavior_logp) carries u|log r|; r = exp(log r) then c·u + u|log r|; −A·r and the
    clip bounds 1 ± ε add 2u; the shaping terms −A·sigmoid(x − ln γ) (x = logp or log r) carry u(|x| + |ln γ|)
    in the argument and 2c·u in the sigmoid (exp and a ÷), 2u in the products."""
    c = FN_ERR
    return u * (2 * c + 4 + 2 * log_r_abs_max + logp_abs_max + 2 * abs(math.log(shaping_gamma)))


def policy_loss_budget(abs_loss: float, rho: float, seq_len: int, num_rows: int, u: float = U32) -> float:
    """|δloss| ≤ (ρ + eta(T) + eta(B) + 3u)·Σ_bt w_b·|L_bt|: each term's own error ρ, the row sums over T
    tokens (any order: the kernel's chunk sums then torch's sum over chunks), the normalizer w_b (a division
    by exact counts, 2u) and the sum over B rows. `abs_loss` is the aggregation applied to |L| (the loss
    with every token term replaced by its magnitude), computed exactly."""
    return (rho + eta(seq_len, u) + eta(num_rows, u) + 3 * u) * abs_loss


def policy_grad_budget(grad: torch.Tensor, adv_weight: torch.Tensor, rho: float, u: float = U32,
                       store: torch.dtype | None = None) -> torch.Tensor:
    """[B, T] bound on |δ dloss/dlogp|: w_b·∂L/∂logp is −A·r·w_b (PPO, unclipped) or −A·s(1 − s)·w_b
    (shaping), s = sigmoid(·). The first carries ρ + 4u relative; s(1 − s) carries an absolute error
    ≤ ρ + 2u (s ≤ 1, the rounding of 1 − s is absolute), times |A|·w_b. So (ρ + 4u)·(|grad| + |A|·w_b) covers
    both, plus the rounding to a half-precision logp's gradient (`store`). `adv_weight` = |A_bt|·w_b on
    masked-in tokens, else 0 (masked tokens get an exact zero)."""
    g = grad.detach().to(torch.float64).abs()
    return (rho + 4 * u) * (g + adv_weight) + store_error(g, store) * (adv_weight > 0)


def policy_metric_budget(abs_value: float, rho: float, num_tokens: int, num_rows: int, u: float = U32
                         ) -> float:
    """A metric Σ_t x_t / n over the masked tokens, formed as fp32 row sums (T terms), a weighted sum over
    rows (B terms) and one division by an exact count: (ρ + eta(n) + eta(B) + 2u)·(Σ|x_t|)/n. ρ is each
    term's own relative error (0 for the 0/1 flags of the clip fractions, whose sums are exact); `abs_value`
    is the metric of |x_t| (the metric itself for fractions and ratios, mean |log r| for ppo_kl)."""
    return (rho + eta(num_tokens, u) + eta(num_rows, u) + 2 * u) * abs_value


# ---- Group advantages -------------------------------------------------------------------------------------

def group_advantage_budget(rewards: torch.Tensor, feeds: torch.Tensor, mode: str, eps: float,
                           u: float = U32) -> torch.Tensor:
    """Bounds [n_members] on the advantages of ONE group, computed in precision u (rewards exact in it).

    Args:
        rewards: [n] float64, every member's reward.  feeds: [n] bool, the members feeding the statistics.
    With F the feeders (k = |F|), shift s = max_F r (exact), c = FN_ERR (GPU ÷ and sqrt are approximate):
        δmean = (2u + eta(k))·Σ_F|r − s|/k + u|mean|     r − s (u each), the k-term sum, ÷ k, + s
        δc_i  = δmean + u|c_i|                            c_i = r_i − mean
        δvar  = [2δmean·Σ_F|c| + (3u + eta(k))·Σ_F c²]/(k − 1) + c·u·var
        δstd  = δvar / (2·std) + c·u·std                  (0 when var = 0: equal rewards give c_i = 0 exactly)
        grpo:   δadv = [δc_i + |adv|·(δstd + c·u(std + eps))] / (std + eps) + c·u|adv|   (k ≥ 2; else δc_i)
        drgrpo: δc_i;   rloo: δc_i·k/(k − f_i) + 3c·u|adv| (0 when k − f_i = 0)
    """
    r = rewards.to(torch.float64)
    f = feeds.to(torch.bool)
    if not bool(f.any()):
        f = torch.ones_like(f)
    k = int(f.sum())
    c = FN_ERR
    rf = r[f]
    shift = float(rf.max())
    mean = float(rf.mean())
    d_mean = (2 * u + eta(k, u)) * float((rf - shift).abs().sum()) / k + u * abs(mean)
    cen = r - mean
    d_cen = d_mean + u * cen.abs()
    if mode == "drgrpo" or (mode == "grpo" and k < 2):
        return d_cen
    if mode == "rloo":
        others = k - f.to(torch.float64)
        adv = torch.where(others > 0, cen * k / others.clamp(min=1), 0.0)
        return torch.where(others > 0, d_cen * k / others.clamp(min=1) + 3 * c * u * adv.abs(), 0.0)
    cf = cen[f]
    var = float((cf * cf).sum()) / (k - 1)
    std = math.sqrt(var)
    d_var = (2 * d_mean * float(cf.abs().sum()) + (3 * u + eta(k, u)) * float((cf * cf).sum())) / (k - 1)
    d_var += c * u * var
    d_std = d_var / (2 * std) + c * u * std if std > 0 else 0.0
    adv = cen / (std + eps)
    return (d_cen + adv.abs() * (d_std + c * u * (std + eps))) / (std + eps) + c * u * adv.abs()
