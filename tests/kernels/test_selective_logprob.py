"""selective_logprob: the reference against float64 formulas and gradcheck, then the chunked CPU path and the
Triton kernels (under TRITON_INTERPRET=1 on CPU) against the float64 truth, every output and gradient by name.

Every bound is an error budget from `npo_kernels.testing.selective_logprob_budget` (the rounding-error
analysis is written there): u = 2^-24, the V-term sums, the number of online rescales (one per 4096-column
block of the Triton kernel) and the magnitudes of the values (|z|, Σp|z − μ|, Σp·lp², H), never the fp32
reference's own error on one machine.

Grid rationale (kept small: the interpreter runs each program sequentially through numpy):
- V = 7:       a single block much narrower than BLOCK_V; most columns of the block are -inf tail.
- V = 1000:    one block of 1024 with a 24-column tail (V not a multiple of the block; verl #2899).
- V = 4099:    two blocks of 4096 with a 3-column tail, so the online max/sum/entropy rescaling runs across
               blocks, and the chunked path runs several row chunks (its chunk size is patched down).
- V = 151936:  the Qwen vocabulary (2^7·1187, 38 blocks), 3 rows only: the realistic tail and loop length.
- rows: ignored rows (target -1) in every case, and a fully ignored batch separately.
Adversarial inputs, one test each: peaked rows (p_y ≥ 0.999, Liger #1268), logits of magnitude 1e3,
-inf logits (vocab masks: 0·(-inf)), temperature ≠ 1, entropy on/off, dlogp only and dentropy only.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    # Before triton is imported anywhere (triton #4317): run the Triton kernels on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import npo_kernels.logprob.chunked as logprob_chunked  # noqa: E402
from npo_kernels.logprob.op import selective_logprob  # noqa: E402
from npo_kernels.logprob.reference import selective_logprob_ref  # noqa: E402
from npo_kernels._dispatch import triton_interpreter_enabled  # noqa: E402
from npo_kernels.testing import U32, assert_within, eta, selective_logprob_budget, unit_roundoff  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = triton_interpreter_enabled()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# "chunked" is backend="auto" on CPU tensors; "triton" runs the kernels (interpreted on CPU).
IMPLS = ["chunked", "triton"] if (HAS_CUDA or INTERPRETED) else ["chunked"]
NAMES = ("logp", "entropy", "dlogits")
# Columns per block of the Triton kernels: each block is one online rescale of the running sums (the chunked
# path's two-pass ATen softmax has none), which the budget counts.
BLOCK_COLS = 4096


def make_case(num_rows: int, n_cols: int, *, scale: float = 3.0, seed: int = 0, dtype=torch.float32,
              device: str = "cpu", ignore_every: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    # Generated on the target device (large GPU cases would take seconds on the CPU), in fp64 on CPU only.
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.float64 if device == "cpu" else torch.float32
    logits = (torch.randn(num_rows, n_cols, generator=gen, dtype=base, device=device) * scale).to(dtype)
    targets = torch.randint(0, n_cols, (num_rows,), generator=gen, device=device)
    if ignore_every:
        targets[1::ignore_every] = -1
    return logits, targets


def formulas_f64(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """logp and entropy written out in float64, independently of the reference's code path."""
    z = logits.double() / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    valid = targets >= 0
    z_y = z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    logp = torch.where(valid, z_y - lse, 0.0)
    entropy = torch.where(valid, lse - (p * z).sum(-1), 0.0)
    return logp, entropy


def truth_and_budget(logits, targets, g_logp, g_entropy, *, temperature=1.0, store=None):
    """The float64 truth (the reference on the float64 values of the same logits) of (logp, entropy, dlogits)
    for the loss Σ g_logp·logp + Σ g_entropy·H, and the error budget of each (store: the dtype of a
    half-precision gradient, None for fp32)."""
    double = lambda t: None if t is None else t.double()  # noqa: E731
    truth = grads_of(selective_logprob_ref, logits.double(), targets, double(g_logp), double(g_entropy),
                     temperature=temperature)
    budget = selective_logprob_budget(logits, targets, g_logp, g_entropy, temperature=temperature,
                                      merges=-(-logits.shape[1] // BLOCK_COLS), store=store)
    return truth, [budget[name] for name in NAMES]


def assert_all_within(label, truth, budget, out):
    for name, expected, bound, actual in zip(NAMES, truth, budget, out):
        assert_within(f"{label}/{name}", expected, actual, bound)


def run_impl(impl: str, logits, targets, temperature=1.0, return_entropy=True):
    """CPU tensors in and out. "triton" runs on CUDA copies when there is a GPU (differentiably moved back)."""
    if impl == "chunked":
        return selective_logprob(logits, targets, temperature=temperature, return_entropy=return_entropy)
    if not INTERPRETED:
        logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    out = selective_logprob(logits, targets, temperature=temperature, return_entropy=return_entropy,
                            backend="triton")
    return tuple(t.cpu() for t in out) if return_entropy else out.cpu()


def grads_of(fn, logits, targets, g_logp, g_entropy, **kw):
    """Outputs and dlogits for the loss Σ g_logp·logp + Σ g_entropy·H (either weight may be None)."""
    x = logits.detach().clone().requires_grad_(True)
    logp, entropy = fn(x, targets, return_entropy=True, **kw)
    loss = 0.0
    if g_logp is not None:
        loss = loss + (logp * g_logp).sum()
    if g_entropy is not None:
        loss = loss + (entropy * g_entropy).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), x.grad


def check_invariants(name: str, logp, entropy, dlogits, targets) -> None:
    """fp32 outputs, finite, logp ≤ 0, entropy ≥ 0 (exactly), exact zeros on ignored rows.

    The chunked path meets the signs by construction: every form sums terms of one sign (−p·lp with
    lp = (z − m) − log S ≤ 0, since S ≥ 1 holds the max's exp(0) = 1; or log S − Σp(z − m)). The Triton
    kernel clamps both, since compiled for a GPU its fused multiply-adds can miss them by a rounding.
    """
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32, f"{name}: outputs must be fp32"
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all(), f"{name}: non-finite output"
    assert (logp <= 0).all(), f"{name}: positive logp {logp.max().item()}"
    assert (entropy >= 0).all(), f"{name}: negative entropy {entropy.min().item()}"
    ignored = targets < 0
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all(), f"{name}: ignored rows must give 0"
    if dlogits is not None:
        assert torch.isfinite(dlogits).all(), f"{name}: non-finite gradient"
        assert (dlogits[ignored] == 0).all(), f"{name}: ignored rows must get a zero gradient"


@pytest.fixture
def small_cpu_chunks(monkeypatch):
    """Make the chunked path use several row chunks even at test shapes (2^12 elements: 1 row at V = 4099)."""
    monkeypatch.setattr(logprob_chunked, "CHUNK_ELEMENTS", 1 << 12)


# ---- The reference --------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_matches_float64_formulas(temperature):
    logits, targets = make_case(9, 1000, scale=4.0)
    logp, entropy = selective_logprob_ref(logits, targets, temperature=temperature, return_entropy=True)
    logp64, entropy64 = formulas_f64(logits, targets, temperature)
    budget = selective_logprob_budget(logits, targets, None, None, temperature=temperature)
    assert_within("logp", logp64, logp, budget["logp"])
    assert_within("entropy", entropy64, entropy, budget["entropy"])
    check_invariants("reference", logp, entropy, None, targets)


def test_reference_gradcheck_float64():
    logits, targets = make_case(4, 7, dtype=torch.float64, ignore_every=2)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: selective_logprob_ref(x, targets, temperature=0.7, return_entropy=True), (logits,))


def test_chunked_backward_gradcheck_float64(small_cpu_chunks):
    """The chunked path's hand-written backward (both terms, several chunks) against finite differences."""
    logits, targets = make_case(5, 11, dtype=torch.float64, ignore_every=2)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: selective_logprob(x, targets, temperature=0.7, return_entropy=True), (logits,))
    assert torch.autograd.gradcheck(lambda x: selective_logprob(x, targets), (logits,))


# ---- Kernels and chunked path against the reference -------------------------------------------------------

CASES = [  # (num_rows, n_cols, temperature)
    pytest.param(8, 7, 1.0, id="N8-V7"),
    pytest.param(37, 1000, 0.7, id="N37-V1000-T0.7"),
    pytest.param(16, 4099, 1.0, id="N16-V4099"),
    pytest.param(3, 151936, 1.3, id="N3-V151936-T1.3"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_rows,n_cols,temperature", CASES)
def test_matches_reference(impl, num_rows, n_cols, temperature, small_cpu_chunks):
    logits, targets = make_case(num_rows, n_cols, seed=n_cols)
    gen = torch.Generator().manual_seed(1)
    g_logp, g_entropy = torch.randn(num_rows, generator=gen), torch.randn(num_rows, generator=gen)
    truth, budget = truth_and_budget(logits, targets, g_logp, g_entropy, temperature=temperature)
    out = grads_of(lambda *a, **k: run_impl(impl, *a, **k), logits, targets, g_logp, g_entropy,
                   temperature=temperature)
    assert_all_within(impl, truth, budget, out)
    check_invariants(impl, *out, targets)


@pytest.mark.parametrize("impl", IMPLS)
def test_logp_only_matches_reference(impl):
    """return_entropy=False: one output, the backward without the entropy term."""
    logits, targets = make_case(6, 1000)
    truth, budget = truth_and_budget(logits, targets, torch.ones(6), None)
    x = logits.clone().requires_grad_(True)
    logp = run_impl(impl, x, targets, return_entropy=False)
    assert isinstance(logp, torch.Tensor) and logp.shape == (6,)
    logp.sum().backward()
    assert_within(f"{impl}/logp", truth[0], logp, budget[0])
    assert_within(f"{impl}/dlogits", truth[2], x.grad, budget[2])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["dlogp-only", "dentropy-only"])
def test_each_gradient_term_alone(impl, which):
    """The entropy gradient must neither be dropped (TRL #6625) nor leak into a logp-only loss."""
    logits, targets = make_case(12, 1000, seed=5)
    g = torch.randn(12, generator=torch.Generator().manual_seed(2))
    g_logp, g_entropy = (g, None) if which == "dlogp-only" else (None, g)
    truth, budget = truth_and_budget(logits, targets, g_logp, g_entropy)
    out = grads_of(lambda *a, **k: run_impl(impl, *a, **k), logits, targets, g_logp, g_entropy)
    assert_within(f"{impl}/{which}/dlogits", truth[2], out[2], budget[2])
    check_invariants(impl, *out, targets)


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_rows(impl):
    """p_y ∈ {0.9, 0.99, 0.999, ~1}: (p_y - 1)·g must be formed in fp32, not cancelled (Liger #1268)."""
    num_rows, n_cols = 4, 1000
    logits, targets = make_case(num_rows, n_cols, scale=1.0, ignore_every=0)
    for row, p_y in enumerate([0.9, 0.99, 0.999, 1 - 1e-6]):
        others = logits[row].double().clone()
        others[targets[row]] = float("-inf")
        # z_y = log Σ_{j≠y} e^z_j + log(p_y / (1 - p_y)) gives softmax(z)_y = p_y.
        logits[row, targets[row]] = float(torch.logsumexp(others, 0)) + math.log(p_y / (1 - p_y))
    g = torch.ones(num_rows)
    truth, budget = truth_and_budget(logits, targets, g, g)
    out = grads_of(lambda *a, **k: run_impl(impl, *a, **k), logits, targets, g, g)
    # The construction is exact up to storing z_y in fp32 (|δz_y| ≤ u|z_y| moves p_y by ≤ p(1 − p)·u|z_y|) and
    # the float64 logsumexp over V terms (eta(V, 2^-53) relative to its ≤ |z_y| + 1 magnitude).
    want = torch.tensor([0.9, 0.99, 0.999], dtype=torch.float64)
    z_y = logits[torch.arange(3), targets[:3]].double().abs()
    f64_err = 2 * eta(n_cols, unit_roundoff(torch.float64)) * (z_y + 1)
    assert_within("p_y", want, torch.exp(truth[0][:3]), want * (1 - want) * (2 * U32 * z_y + f64_err))
    assert_all_within(impl, truth, budget, out)
    # The target's gradient is small ((1 − p_y)·g minus the entropy term); the budget there resolves it to a
    # few % for p_y ≤ 0.999, so the elementwise check above catches a cancelled (p_y − 1)·g (Liger #1268:
    # 100 % error in bf16). Row 3's 1 − p_y = 1e-6 is below fp32's resolution of p_y itself: absolute check
    # only.
    idx = torch.arange(3), targets[:3]
    rel_budget = (budget[2][idx] / truth[2][idx].abs()).max()
    assert rel_budget < 5e-2, f"budget at the target is {rel_budget:.2e} of the gradient: too loose to test"
    check_invariants(impl, *out, targets)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits(impl):
    """|logits| ~ 1e3 (T = 0.5: |z| ~ 2e3): finite, and within the budget, which grows with |z| (each z_j is
    rounded to fp32 before the max is subtracted: E_j = 2u|z_j|)."""
    logits, targets = make_case(6, 4099, scale=1e3, seed=3)
    temperature = 0.5
    g = torch.randn(6, generator=torch.Generator().manual_seed(4))
    truth, budget = truth_and_budget(logits, targets, g, g, temperature=temperature)
    ref = grads_of(selective_logprob_ref, logits, targets, g, g, temperature=temperature)
    out = grads_of(lambda *a, **k: run_impl(impl, *a, **k), logits, targets, g, g, temperature=temperature)
    assert torch.isfinite(ref[0]).all() and torch.isfinite(ref[1]).all(), "reference must stay finite"
    assert_all_within(impl, truth, budget, out)
    check_invariants(impl, *out, targets)


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_logits(impl):
    """-inf logits (a vocabulary mask) give finite logp, entropy and gradients, and zero gradient there."""
    logits, targets = make_case(5, 1000, seed=6)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, ::3] = True
    mask[torch.arange(5), targets.clamp(min=0)] = False
    mask[0, :] = True
    mask[0, 17] = False
    targets[0] = 17                                  # a row with a single finite logit: p_y = 1, H = 0
    logits = logits.masked_fill(mask, float("-inf"))
    g = torch.randn(5, generator=torch.Generator().manual_seed(7))
    truth, budget = truth_and_budget(logits, targets, g, g)
    out = grads_of(lambda *a, **k: run_impl(impl, *a, **k), logits, targets, g, g)
    assert_all_within(impl, truth, budget, out)
    assert (out[2][mask] == 0).all(), "masked (-inf) columns must get zero gradient"
    if not HAS_CUDA:   # exact on CPU; on GPU within the budget (a fused multiply-add leaves ±1 rounding)
        assert out[0][0] == 0 and out[1][0] == 0
    check_invariants(impl, *out, targets)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_ignored_batch(impl):
    logits, targets = make_case(4, 1000)
    targets[:] = -1
    logp, entropy, dlogits = grads_of(lambda *a, **k: run_impl(impl, *a, **k), logits, targets,
                                      torch.ones(4), torch.ones(4))
    assert (logp == 0).all() and (entropy == 0).all() and (dlogits == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_logits(impl):
    """fp16 in, fp32 math, fp16 gradient: the gradient rounds once, at the store (store = fp16, u = 2^-11)."""
    logits, targets = make_case(6, 1000, dtype=torch.float16)
    g = torch.randn(6, generator=torch.Generator().manual_seed(8))
    truth, budget = truth_and_budget(logits, targets, g, g, store=torch.float16)
    out = grads_of(lambda *a, **k: run_impl(impl, *a, **k), logits, targets, g, g)
    assert out[2].dtype == torch.float16
    assert_all_within(impl, truth, budget, out)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_place_and_retain_graph(impl):
    """The caller's logits are never written (kernels.md §3); a second backward gives the same gradient."""
    logits, targets = make_case(6, 1000)
    x = logits.clone().requires_grad_(True)
    logp, entropy = run_impl(impl, x, targets)
    shared = x * 1.0                                   # the same logits feeding another loss
    (logp.sum() + entropy.sum()).backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(x.detach(), logits), "logits were modified in place"
    assert torch.equal(first, x.grad), "backward is not repeatable"
    assert torch.equal(shared.detach(), logits)


def test_chunked_forward_never_allocates_n_by_v(small_cpu_chunks):
    """The chunked forward allocates only chunk buffers; its backward one [N, V] tensor, the gradient."""
    logits, targets = make_case(64, 1000)
    full_bytes = logits.numel() * 4
    x = logits.clone().requires_grad_(True)

    def largest_allocations(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            fn()
        # Self memory: what each op allocated itself (cpu_memory_usage would count children again).
        sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
        return sorted(sizes, reverse=True)

    out = {}
    fwd = largest_allocations(lambda: out.setdefault("logp", selective_logprob(x, targets)))
    bwd = largest_allocations(lambda: out["logp"].sum().backward())
    assert fwd and fwd[0] < full_bytes / 8, f"forward allocated {fwd[0]} B (N·V·4 = {full_bytes} B)"
    assert bwd[0] >= 0.9 * full_bytes and bwd[1] < full_bytes / 8, f"backward allocations {bwd[:3]}"
    # The profiler sees the reference's [N, V] allocations, so the check above is not vacuous.
    ref = largest_allocations(lambda: selective_logprob_ref(x, targets).sum().backward())
    assert sum(1 for b in ref if b >= 0.9 * full_bytes) >= 3


# ---- Dispatch, validation, compile ---------------------------------------------------------------------

def test_torch_backend_is_the_reference():
    logits, targets = make_case(5, 100)
    assert torch.equal(selective_logprob(logits, targets, backend="torch"),
                       selective_logprob_ref(logits, targets))


def test_invalid_arguments():
    logits, targets = make_case(4, 10)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        selective_logprob(logits, targets, backend="cuda")
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        selective_logprob(logits[0], targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        selective_logprob(logits, targets[:3])
    with pytest.raises(ValueError, match="targets must be int64"):
        selective_logprob(logits, targets.float())
    with pytest.raises(ValueError, match="logits must be fp32"):
        selective_logprob(logits.int(), targets)
    with pytest.raises(ValueError, match="targets must be < V"):
        selective_logprob(logits, torch.full_like(targets, 10))
    with pytest.raises(ValueError, match="temperature"):
        selective_logprob(logits, targets, temperature=0.0)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, targets = make_case(4, 10)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        selective_logprob(logits, targets, backend="triton")


def test_traceable_by_torch_compile():
    """The custom ops have fake impls, so dynamo/AOT trace them as graph nodes (aot_eager: no C++ build)."""
    logits, targets = make_case(6, 1000)
    x = logits.clone().requires_grad_(True)
    fn = torch.compile(lambda z, t: selective_logprob(z, t, return_entropy=True), backend="aot_eager",
                       fullgraph=True)
    logp, entropy = fn(x, targets)
    (logp.sum() + entropy.sum()).backward()
    truth, budget = truth_and_budget(logits, targets, torch.ones(6), torch.ones(6))
    assert_all_within("compiled", truth, budget, (logp, entropy, x.grad))


# ---- GPU (bf16 at the real vocabulary; skipped without CUDA) -----------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_bf16_error_budget(compiled):
    """bf16 logits at the real vocabulary against the float64 truth of the same bf16 values: fp32 math on
    exact inputs (the fp32 budget), and a bf16 gradient (store = bf16, u = 2^-8). 2048 rows: the truth and
    the budget hold a dozen float64 [N, V] tensors (2.5 GB each)."""
    num_rows, n_cols = 2048, 151936
    logits, targets = make_case(num_rows, n_cols, scale=4.0, dtype=torch.bfloat16, device="cuda")
    g = torch.randn(num_rows, device="cuda")
    fn = torch.compile(selective_logprob, fullgraph=True) if compiled else selective_logprob
    out = grads_of(lambda *a, **k: fn(*a, backend="triton", **k), logits, targets, g, g, temperature=0.7)
    truth, budget = truth_and_budget(logits, targets, g, g, temperature=0.7,
                                     store=torch.bfloat16)
    assert_all_within("gpu", truth, budget, out)
    check_invariants("gpu", *out, targets)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_int64_offsets():
    """N·V > 2^31 elements (16384 × 151936 = 2.49e9): the last rows must still read their own logits."""
    num_rows, n_cols = 16384, 151936
    logits = torch.randn(num_rows, n_cols, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, n_cols, (num_rows,), device="cuda")
    logp, entropy = selective_logprob(logits, targets, return_entropy=True)
    tail = slice(num_rows - 8, num_rows)
    ones = torch.ones(8, device="cuda")
    truth, budget = truth_and_budget(logits[tail], targets[tail], ones, None,
                                     store=torch.bfloat16)
    assert_within("logp[tail]", truth[0], logp[tail], budget[0])
    assert_within("entropy[tail]", truth[1], entropy[tail], budget[1])
    x = logits.requires_grad_(True)
    selective_logprob(x, targets).sum().backward()
    assert_within("dlogits[tail]", truth[2], x.grad[tail], budget[2])
