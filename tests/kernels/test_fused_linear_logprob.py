"""fused_linear_logprob: the reference against float64 formulas and gradcheck, then the chunked CPU path and
the Triton path (torch GEMMs + the selective_logprob kernels, under TRITON_INTERPRET=1 on CPU) against the
float64 truth: logp, entropy, dhidden, dweight and dbias by name.

Every bound is an error budget from `npo_kernels.testing.fused_linear_budget` (the rounding-error analysis is
written there): it depends on u = 2^-24, the dot-product length H, the V-term sums, the number of online
rescales and the magnitudes of the values (Σ|x·w|, Σp|z − μ|, Σp·lp², ...), never on how accurate the fp32
reference happens to be on one machine. The fp32 reference is held to the same budgets.

Grid rationale (tile sizes are patched down so that small shapes still cross every tile boundary):
- V = 300, tiles of 64 columns × 4 rows: 5 vocabulary tiles with a 44-column tail and 3 token chunks of
  N = 10, so the online logsumexp merges across tiles, targets fall in different tiles, and dW accumulates
  across token chunks (the fp32 accumulator path).
- V = 1000 with all N rows in one tile: the backward's single-GEMM dW path, bias on/off.
- V = 151936 (the Qwen vocabulary), N = 3, H = 8: the real tail with the default tile sizes, and with narrow
  tiles (14 vocabulary tiles) so the chunked path also merges tiles at the real size.
- ignored rows (target -1) in every case; temperature ≠ 1; entropy on/off; dlogp only / dentropy only;
  a tied-embedding weight used twice in one graph; a frozen weight (no dW); tile caching on/off.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Before triton is imported anywhere (triton #4317): run the Triton kernels on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import npo_kernels.fused_linear.chunked as fl_chunked  # noqa: E402
import npo_kernels.fused_linear.op as fl_op  # noqa: E402
import npo_kernels.fused_linear.triton as fl_triton  # noqa: E402
from npo_kernels.fused_linear.op import fused_linear_logprob  # noqa: E402
from npo_kernels.fused_linear.reference import fused_linear_logprob_ref  # noqa: E402
from npo_kernels._dispatch import triton_interpreter_enabled  # noqa: E402
from npo_kernels.testing import U32, assert_within, eta, fused_linear_budget, unit_roundoff  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = triton_interpreter_enabled()
DEVICE = "cuda" if HAS_CUDA else "cpu"
IMPLS = ["chunked", "triton"] if (HAS_CUDA or INTERPRETED) else ["chunked"]
GRAD_NAMES = ("dhidden", "dweight", "dbias")
NAMES = ("logp", "entropy") + GRAD_NAMES
# Narrowest vocabulary block of any path, for the count of online rescales in the budget: the Triton kernels'
# 4096-column blocks, or the 64-column tiles of `small_tiles`.
BLOCK_COLS, SMALL_TILE_COLS = 4096, 64


def make_case(num_rows, hidden_size, n_cols, *, bias=True, seed=0, dtype=torch.float32, device="cpu",
              ignore_every=3):
    # Generated on the target device (large GPU cases would take seconds on the CPU), in fp64 on CPU only.
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=gen, device=device, dtype=torch.float64 if device == "cpu" else torch.float32)
    hidden = torch.randn(num_rows, hidden_size, **kw)
    weight = torch.randn(n_cols, hidden_size, **kw) / hidden_size ** 0.5 * 2
    b = torch.randn(n_cols, **kw) if bias else None
    targets = torch.randint(0, n_cols, (num_rows,), generator=gen, device=device)
    if ignore_every:
        targets[1::ignore_every] = -1
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 256 elements (4 rows × 64 columns at N ≥ 4) on both paths."""
    monkeypatch.setattr(fl_chunked, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(fl_chunked, "MIN_VOCAB_TILE", 64)
    monkeypatch.setattr(fl_triton, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(fl_triton, "MIN_VOCAB_TILE", 64)


def run_impl(impl, hidden, weight, targets, bias=None, **kw):
    """CPU tensors in and out. "triton" runs on CUDA copies when there is a GPU (differentiably moved back)."""
    if impl == "chunked":
        return fused_linear_logprob(hidden, weight, targets, bias=bias, **kw)
    if not INTERPRETED:
        hidden, weight, targets = hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)
        bias = None if bias is None else bias.to(DEVICE)
    out = fused_linear_logprob(hidden, weight, targets, bias=bias, backend="triton", **kw)
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def outputs_and_grads(fn, hidden, weight, bias, targets, g_logp, g_entropy, **kw):
    """(logp, entropy, dhidden, dweight, dbias) for the loss Σ g_logp·logp + Σ g_entropy·H."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    logp, entropy = fn(h, w, targets, bias=b, return_entropy=True, **kw)
    loss = 0.0
    if g_logp is not None:
        loss = loss + (logp * g_logp).sum()
    if g_entropy is not None:
        loss = loss + (entropy * g_entropy).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad, None if b is None else b.grad


def check_invariants(name, logp, entropy, dhidden, targets):
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32, f"{name}: outputs must be fp32"
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all(), f"{name}: non-finite output"
    assert (logp <= 0).all(), f"{name}: positive logp {logp.max().item()}"
    ignored = targets < 0
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all(), f"{name}: ignored rows must give 0"
    assert torch.isfinite(dhidden).all(), f"{name}: non-finite dhidden"
    assert (dhidden[ignored] == 0).all(), f"{name}: ignored rows must get a zero dhidden"


def merges(n_cols, narrowest=BLOCK_COLS):
    return -(-n_cols // narrowest)


def truth_and_budget(hidden, weight, bias, targets, g_logp, g_entropy, *, temperature=1.0,
                     narrowest=BLOCK_COLS, u_acc=U32, store=None):
    """The float64 truth (the reference on the float64 values of the same inputs) of (logp, entropy, dhidden,
    dweight, dbias) for the loss Σ g_logp·logp + Σ g_entropy·H, and the error budget of each."""
    double = lambda t: None if t is None else t.double()  # noqa: E731
    truth = outputs_and_grads(fused_linear_logprob_ref, hidden.double(), weight.double(), double(bias),
                              targets, double(g_logp), double(g_entropy), temperature=temperature)
    budget = fused_linear_budget(hidden, weight, bias, targets, g_logp, g_entropy, temperature=temperature,
                                 merges=merges(weight.shape[0], narrowest), u_acc=u_acc, store=store)
    return truth, [budget[name] for name in NAMES]


def assert_all_within(label, truth, budget, out):
    for name, expected, bound, actual in zip(NAMES, truth, budget, out):
        if expected is None:
            assert actual is None, f"{label}/{name}: expected no gradient"
            continue
        assert_within(f"{label}/{name}", expected, actual, bound)


# ---- The reference --------------------------------------------------------------------------------------

def test_reference_matches_float64_formulas():
    hidden, weight, bias, targets = make_case(7, 16, 300)
    logp, entropy = fused_linear_logprob_ref(hidden, weight, targets, bias=bias, temperature=0.7,
                                             return_entropy=True)
    z = (hidden.double() @ weight.double().T + bias.double()) / 0.7
    lse = torch.logsumexp(z, -1)
    valid = targets >= 0
    logp64 = torch.where(valid, z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) - lse, 0.0)
    entropy64 = torch.where(valid, lse - (torch.softmax(z, -1) * z).sum(-1), 0.0)
    budget = fused_linear_budget(hidden, weight, bias, targets, None, None, temperature=0.7)
    assert_within("logp", logp64, logp, budget["logp"])
    assert_within("entropy", entropy64, entropy, budget["entropy"])


def test_reference_gradcheck_float64():
    hidden, weight, bias, targets = make_case(4, 3, 7, dtype=torch.float64, ignore_every=2)
    inputs = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_logprob_ref(h, w, targets, bias=b, temperature=0.7, return_entropy=True),
        inputs)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "recompute"])
def test_chunked_backward_gradcheck_float64(small_tiles, monkeypatch, cache):
    """The chunked path's hand-written backward, over several tiles, against finite differences."""
    monkeypatch.setattr(fl_chunked, "CACHE_TILES", cache)
    hidden, weight, bias, targets = make_case(6, 3, 70, dtype=torch.float64, ignore_every=2)
    inputs = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_logprob(h, w, targets, bias=b, temperature=0.7, return_entropy=True),
        inputs)


# ---- Chunked and Triton paths against the reference -------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature,use_bias", [(1.0, False), (0.7, True)], ids=["T1", "T0.7-bias"])
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "recompute"])
def test_matches_reference_across_tiles(impl, temperature, use_bias, cache, small_tiles, monkeypatch):
    monkeypatch.setattr(fl_chunked, "CACHE_TILES", cache)
    hidden, weight, bias, targets = make_case(10, 16, 300, bias=use_bias, seed=1)
    gen = torch.Generator().manual_seed(2)
    g_logp, g_entropy = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    truth, budget = truth_and_budget(hidden, weight, bias, targets, g_logp, g_entropy,
                                     temperature=temperature, narrowest=SMALL_TILE_COLS)
    out = outputs_and_grads(lambda *a, **k: run_impl(impl, *a, **k), hidden, weight, bias, targets,
                            g_logp, g_entropy, temperature=temperature)
    assert_all_within(impl, truth, budget, out)
    check_invariants(impl, out[0], out[1], out[2], targets)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_one_tile_of_rows(impl):
    """Default tile sizes: all rows in one tile, so dW comes from one GEMM over N (no cross-chunk sum)."""
    hidden, weight, bias, targets = make_case(12, 32, 1000, seed=3)
    g = torch.randn(12, generator=torch.Generator().manual_seed(4))
    truth, budget = truth_and_budget(hidden, weight, bias, targets, g, g)
    out = outputs_and_grads(lambda *a, **k: run_impl(impl, *a, **k), hidden, weight, bias, targets, g, g)
    assert_all_within(impl, truth, budget, out)


@pytest.mark.parametrize("tiles", ["default-tiles", "narrow-tiles"])
@pytest.mark.parametrize("impl", IMPLS)
def test_real_vocabulary(impl, tiles, monkeypatch):
    """V = 151936: the vocabulary tail of the real model, three rows, against the float64 truth.

    dhidden sums 151936 terms, so fp32 summation order alone moves it by ~1e-5 and differs between BLAS
    paths and machines; the budget bounds that for any order (η_V = 8·√V·u ≈ 1.9e-4 relative to Σ|terms|).
    With the default tiles the chunked path holds all 151936 columns in one tile; "narrow-tiles" (2^15
    elements: 14 tiles of 10922 columns) makes it merge tiles at the real size too. The fp32 reference is held
    to the same budget.
    """
    if tiles == "narrow-tiles":
        monkeypatch.setattr(fl_chunked, "TILE_ELEMENTS", 1 << 15)
        monkeypatch.setattr(fl_triton, "TILE_ELEMENTS", 1 << 15)
    hidden, weight, bias, targets = make_case(3, 8, 151936, bias=False, seed=5, ignore_every=0)
    g = torch.randn(3, generator=torch.Generator().manual_seed(6))
    truth, budget = truth_and_budget(hidden, weight, None, targets, g, g, temperature=1.3)
    out = outputs_and_grads(lambda *a, **k: run_impl(impl, *a, **k), hidden, weight, None, targets, g, g,
                            temperature=1.3)
    assert_all_within(impl, truth, budget, out)
    if tiles == "default-tiles" and impl == IMPLS[0]:
        ref = outputs_and_grads(fused_linear_logprob_ref, hidden, weight, None, targets, g, g,
                                temperature=1.3)
        assert_all_within("reference", truth, budget, ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["dlogp-only", "dentropy-only"])
def test_each_gradient_term_alone(impl, which, small_tiles):
    hidden, weight, bias, targets = make_case(10, 16, 300, seed=7)
    g = torch.randn(10, generator=torch.Generator().manual_seed(8))
    g_logp, g_entropy = (g, None) if which == "dlogp-only" else (None, g)
    truth, budget = truth_and_budget(hidden, weight, bias, targets, g_logp, g_entropy,
                                     narrowest=SMALL_TILE_COLS)
    out = outputs_and_grads(lambda *a, **k: run_impl(impl, *a, **k), hidden, weight, bias, targets,
                            g_logp, g_entropy)
    assert_all_within(impl, truth, budget, out)


@pytest.mark.parametrize("impl", IMPLS)
def test_logp_only_output(impl, small_tiles):
    hidden, weight, bias, targets = make_case(10, 16, 300, seed=9, bias=False)
    truth, budget = truth_and_budget(hidden, weight, None, targets, torch.ones(10), None,
                                     narrowest=SMALL_TILE_COLS)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = run_impl(impl, h, w, targets)
    assert isinstance(logp, torch.Tensor) and logp.shape == (10,)
    logp.sum().backward()
    assert_within(f"{impl}/logp", truth[0], logp, budget[0])
    assert_within(f"{impl}/dhidden", truth[2], h.grad, budget[2])
    assert_within(f"{impl}/dweight", truth[3], w.grad, budget[3])


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_weight(impl, small_tiles):
    """The weight is also the input embedding: autograd must sum both uses' gradients."""
    n_cols, hidden_size = 300, 16
    gen = torch.Generator().manual_seed(10)
    embedding = (torch.randn(n_cols, hidden_size, generator=gen) * 0.5)
    input_ids = torch.randint(0, n_cols, (10,), generator=gen)
    targets = torch.randint(0, n_cols, (10,), generator=gen)
    targets[::4] = -1
    mix = torch.randn(hidden_size, hidden_size, generator=gen) / 4

    def step(fn, **kw):
        w = embedding.clone().requires_grad_(True)
        hidden = torch.tanh(w[input_ids] @ mix)                       # embed -> "model" -> tied lm_head
        logp, entropy = fn(hidden, w, targets, return_entropy=True, **kw)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        return logp.detach(), w.grad, hidden.detach()

    out_logp, out_dw, hidden = step(lambda *a, **k: run_impl(impl, *a, **k))
    # Truth: exact arithmetic on the fp32 hidden states both runs form (the same ops, so the same values):
    # dW = dW_head + index_add(ids, (dh ⊙ (1 − h²)) @ mix.T). Budget: the head's dW, plus the head's dhidden
    # budget carried through that linear map in magnitudes, plus the map's own roundings (a 16-term dot
    # product and 3 elementwise ops: eta(19)·magnitudes).
    g, g_h = torch.ones(10), torch.full((10,), 0.1)
    truth, budget = truth_and_budget(hidden, embedding, None, targets, g, g_h, narrowest=SMALL_TILE_COLS)
    h64, mix64 = hidden.double(), mix.double()
    tanh_grad = 1 - h64 * h64

    def embed_grad(dh, m):
        out = torch.zeros(n_cols, hidden_size, dtype=torch.float64)
        return out.index_add_(0, input_ids, (dh * tanh_grad) @ m.T)

    dw_truth = truth[3] + embed_grad(truth[2], mix64)
    dw_budget = (budget[3] + embed_grad(budget[2], mix64.abs())
                 + eta(hidden_size + 3, U32) * embed_grad(truth[2].abs(), mix64.abs()))
    assert_within(f"{impl}/logp", truth[0], out_logp, budget[0])
    assert_within(f"{impl}/dweight(tied)", dw_truth, out_dw, dw_budget)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_and_ignored_batch(impl, small_tiles):
    """Only dhidden when the head is frozen; all-ignored rows give zeros everywhere."""
    hidden, weight, _, targets = make_case(10, 16, 300, bias=False, seed=11)
    truth, budget = truth_and_budget(hidden, weight, None, targets, torch.ones(10), None,
                                     narrowest=SMALL_TILE_COLS)
    h = hidden.clone().requires_grad_(True)
    run_impl(impl, h, weight, targets).sum().backward()
    assert_within(f"{impl}/dhidden", truth[2], h.grad, budget[2])

    targets = torch.full_like(targets, -1)
    out = outputs_and_grads(lambda *a, **k: run_impl(impl, *a, **k), hidden, weight, None, targets,
                            torch.ones(10), torch.ones(10))
    assert all((t == 0).all() for t in out if t is not None)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_inputs(impl, small_tiles):
    """fp16 inputs, fp32 softmax math, fp16 gradients cast once, against the float64 truth of the same fp16
    values. Budget with store = fp16 (u = 2^-11: the fp16 logits and dlogits tiles, the final casts) and
    u_acc = 2^-11: a half GEMM on CPU may accumulate in half (torch promises nothing else), as the Triton
    path's per-tile GEMMs and the reference's do; the chunked path accumulates in fp32 and is well inside."""
    hidden, weight, bias, targets = make_case(10, 16, 300, dtype=torch.float16, seed=12)
    g = torch.randn(10, generator=torch.Generator().manual_seed(13))
    u16 = unit_roundoff(torch.float16)
    truth, budget = truth_and_budget(hidden, weight, bias, targets, g, g, narrowest=SMALL_TILE_COLS,
                                     u_acc=u16, store=torch.float16)
    out = outputs_and_grads(lambda *a, **k: run_impl(impl, *a, **k), hidden, weight, bias, targets, g, g)
    assert out[2].dtype == torch.float16 and out[3].dtype == torch.float16 and out[4].dtype == torch.float16
    assert_all_within(impl, truth, budget, out)
    ref = outputs_and_grads(fused_linear_logprob_ref, hidden, weight, bias, targets, g, g)
    assert_all_within("reference", truth, budget, ref)


# ---- The gradient formed in the forward (CPU) --------------------------------------------------------------

def grad_in_forward(hidden, weight, bias, targets, g_logp, *, temperature=1.0, block_bytes=None, scale=1.0):
    """(logp, entropy, dhidden, dweight, dbias, blocks seen) of `scale`·(Σ g_logp·logp) through the anchor."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    blocks = []

    def token_grad(logp_rows, r0, r1):
        blocks.append((r0, r1))
        return g_logp[r0:r1]

    logp, entropy, anchor = fl_op.fused_linear_logprob_grad_in_forward(
        h, w, targets, token_grad, bias=b, temperature=temperature, return_entropy=True, block_bytes=block_bytes)
    assert not logp.requires_grad and not entropy.requires_grad and anchor.item() == 0
    (scale * (anchor + (g_logp * logp).sum())).backward()
    return logp, entropy, h.grad, w.grad, None if b is None else b.grad, blocks


@pytest.mark.parametrize("temperature,use_bias", [(1.0, False), (0.7, True)], ids=["T1", "T0.7-bias"])
@pytest.mark.parametrize("rows_per_block", [3, 10], ids=["4-blocks", "1-block"])
def test_grad_in_forward_matches_reference(temperature, use_bias, rows_per_block):
    """Σ g·logp: the same logp, entropy and gradients as the fused op's backward, within the same budgets (one
    max per row instead of online rescales: the budget with one merge); blocks of 3 rows with a 1-row tail."""
    hidden, weight, bias, targets = make_case(10, 16, 300, bias=use_bias, seed=21)
    g = torch.randn(10, generator=torch.Generator().manual_seed(22))
    truth, budget = truth_and_budget(hidden, weight, bias, targets, g, None, temperature=temperature,
                                     narrowest=300)
    *out, blocks = grad_in_forward(hidden, weight, bias, targets, g, temperature=temperature,
                                   block_bytes=rows_per_block * 300 * 4)
    assert blocks == [(r0, min(10, r0 + rows_per_block)) for r0 in range(0, 10, rows_per_block)]
    truth, truth_entropy = list(truth), truth[1]
    assert_within("grad_in_forward/entropy", truth_entropy, out[1], budget[1])
    out[1] = truth[1] = None  # the entropy has no gradient here: compare it as a value, above
    assert_all_within("grad_in_forward", truth, budget, out)
    check_invariants("grad_in_forward", out[0], truth_entropy.float(), out[2], targets)


def test_grad_in_forward_of_a_nonlinear_separable_loss_float64():
    """ℓ = Σ c·exp(logp) + a·logp: token_grad sees each block's own log-probs, and the gradients are the
    reference's autograd ones. fp64 on both sides: their difference is rounding at u = 2^-53 over sums of
    V = 300 and H = 16 terms of size ≤ 10, so below 1e-10 with a margin of 10^3."""
    hidden, weight, bias, targets = make_case(9, 16, 300, bias=True, seed=23, dtype=torch.float64)
    gen = torch.Generator().manual_seed(24)
    a, c = torch.randn(9, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    logp_ref = fused_linear_logprob_ref(h, w, targets, bias=b, temperature=0.8)
    expected = torch.autograd.grad((c * logp_ref.exp() + a * logp_ref).sum(), (h, w, b))
    h2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    logp, _, anchor = fl_op.fused_linear_logprob_grad_in_forward(
        h2, w2, targets, lambda lp, r0, r1: c[r0:r1] * lp.exp() + a[r0:r1], bias=b2, temperature=0.8,
        block_bytes=2 * 300 * 8)
    torch.testing.assert_close(logp, logp_ref.detach(), rtol=0, atol=1e-10)
    anchor.backward()
    for name, want, got in zip(GRAD_NAMES, expected, (h2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
    assert (h2.grad[targets < 0] == 0).all()


def test_grad_in_forward_scales_by_the_anchor_gradient_and_hands_it_on_once():
    hidden, weight, _, targets = make_case(6, 8, 50, bias=False, seed=25)
    g = torch.randn(6, generator=torch.Generator().manual_seed(26))
    once = grad_in_forward(hidden, weight, None, targets, g)
    thrice = grad_in_forward(hidden, weight, None, targets, g, scale=3.0)
    torch.testing.assert_close(thrice[2], 3 * once[2])
    torch.testing.assert_close(thrice[3], 3 * once[3])
    h = hidden.clone().requires_grad_(True)
    _, _, anchor = fl_op.fused_linear_logprob_grad_in_forward(h, weight, targets, lambda lp, r0, r1: g[r0:r1])
    anchor.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be backpropagated twice"):
        anchor.backward()


def test_no_n_by_v_allocation_on_cpu(monkeypatch):
    """The chunked path's largest single allocation is a tile (or dW), never N·V; the reference's is N·V."""
    monkeypatch.setattr(fl_chunked, "TILE_ELEMENTS", 4096)
    monkeypatch.setattr(fl_chunked, "MIN_VOCAB_TILE", 64)
    num_rows, hidden_size, n_cols = 256, 8, 2000
    hidden, weight, bias, targets = make_case(num_rows, hidden_size, n_cols, seed=14)
    full_bytes = num_rows * n_cols * 4

    def allocations(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            logp, entropy = fn(h, w, targets, bias=bias, return_entropy=True)
            (logp.sum() + entropy.sum()).backward()
        # Self memory: what each op allocated itself (cpu_memory_usage would count children again).
        return sorted((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0),
                      reverse=True)

    ours = allocations(fused_linear_logprob)
    assert ours[0] <= max(4096 * 4, n_cols * hidden_size * 4), f"largest allocation {ours[0]} B"
    assert ours[0] < full_bytes / 4, f"largest allocation {ours[0]} B vs N·V·4 = {full_bytes} B"
    ref = allocations(fused_linear_logprob_ref)
    assert ref[0] >= 0.9 * full_bytes, "the profiler should see the reference's [N, V] tensors"


def test_tile_cache_is_bounded_and_consumed(monkeypatch):
    """The kept tiles total at most |dW| bytes, and the backward frees them all."""
    monkeypatch.setattr(fl_chunked, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(fl_chunked, "MIN_VOCAB_TILE", 64)
    seen = {}
    original = fl_op.FusedLinearLogprobFunction.backward

    def spy(ctx, *grads):
        seen["before"] = [t.numel() * t.element_size() for t in ctx.cache]
        result = original(ctx, *grads)
        seen["after"] = len(ctx.cache)
        return result

    monkeypatch.setattr(fl_op.FusedLinearLogprobFunction, "backward", staticmethod(spy))
    hidden, weight, bias, targets = make_case(10, 4, 300, seed=15)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused_linear_logprob(h, w, targets, bias=bias).sum().backward()
    assert 0 < sum(seen["before"]) <= w.numel() * 4
    assert seen["after"] == 0


@pytest.mark.parametrize("budget", ["none", "one-tile", "all"])
def test_tile_cache_budget_sets_what_is_kept_and_not_the_result(monkeypatch, budget):
    """`cache_bytes` bounds the kept tiles (none, a prefix, or every tile) and leaves logp and gradients
    exactly as recomputing gives them (the same GEMM on the same tile)."""
    monkeypatch.setattr(fl_chunked, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(fl_chunked, "MIN_VOCAB_TILE", 64)
    kept = {}
    original = fl_op.FusedLinearLogprobFunction.backward

    def spy(ctx, *grads):
        kept["bytes"] = sum(t.numel() * t.element_size() for t in ctx.cache or [])
        return original(ctx, *grads)

    monkeypatch.setattr(fl_op.FusedLinearLogprobFunction, "backward", staticmethod(spy))
    hidden, weight, bias, targets = make_case(10, 4, 300, seed=16)
    full = 10 * 300 * 4
    cache_bytes = {"none": 0, "one-tile": 64 * 4 * 4, "all": full}[budget]
    results = []
    for cache in (cache_bytes, 0):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp = fused_linear_logprob(h, w, targets, bias=bias, cache_bytes=cache)
        logp.sum().backward()
        results.append((logp.detach(), h.grad, w.grad))
        if cache == cache_bytes:
            assert kept["bytes"] == {"none": 0, "one-tile": cache_bytes, "all": full}[budget]
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_tile_cache_budget_must_not_be_negative():
    hidden, weight, bias, targets = make_case(4, 8, 20)
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        fused_linear_logprob(hidden, weight.requires_grad_(True), targets, cache_bytes=-1)


# ---- Dispatch, validation, compile ---------------------------------------------------------------------

def test_invalid_arguments():
    hidden, weight, bias, targets = make_case(4, 8, 20)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        fused_linear_logprob(hidden, weight, targets, backend="fast")
    with pytest.raises(ValueError, match="disagree on H"):
        fused_linear_logprob(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="weight .* must have hidden's dtype"):
        fused_linear_logprob(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_logprob(hidden, weight, targets, bias=bias[:3])
    with pytest.raises(ValueError, match="hidden must be a 2-D"):
        fused_linear_logprob(hidden[0], weight, targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        fused_linear_logprob(hidden, weight, targets[:2])


def test_torch_backend_is_the_reference():
    hidden, weight, bias, targets = make_case(4, 8, 20)
    assert torch.equal(fused_linear_logprob(hidden, weight, targets, bias=bias, backend="torch"),
                       fused_linear_logprob_ref(hidden, weight, targets, bias=bias))


def test_traceable_by_torch_compile(small_tiles):
    hidden, weight, bias, targets = make_case(10, 16, 300, seed=16)
    fn = torch.compile(lambda h, w, t, b: fused_linear_logprob(h, w, t, bias=b, return_entropy=True),
                       backend="aot_eager", fullgraph=True)
    g = torch.ones(10)
    truth, budget = truth_and_budget(hidden, weight, bias, targets, g, g, narrowest=SMALL_TILE_COLS)
    out = outputs_and_grads(lambda h, w, t, bias, return_entropy: fn(h, w, t, bias), hidden, weight, bias,
                            targets, g, g)
    assert_all_within("compiled", truth, budget, out)


# ---- GPU (bf16 at real shapes; skipped without CUDA) ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_bf16_error_budget(compiled):
    """bf16 inputs at H = 4096, V = 151936 against the float64 truth of the same bf16 values.

    The budget takes store = bf16 (u = 2^-8: the bf16 logits tiles, dlogits tiles and gradients) and
    u_acc = 2^-24: cuBLAS accumulates bf16 GEMMs in fp32 once reduced-precision reductions are off, as they
    are here (torch's default allows bf16 split-K partials, which no fp32 analysis covers)."""
    num_rows, hidden_size, n_cols = 2048, 4096, 151936
    hidden, weight, _, targets = make_case(num_rows, hidden_size, n_cols, bias=False, dtype=torch.bfloat16,
                                           device="cuda")
    g = torch.randn(num_rows, device="cuda")
    fn = torch.compile(fused_linear_logprob, fullgraph=True) if compiled else fused_linear_logprob
    prev = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        out = outputs_and_grads(lambda *a, **k: fn(*a, backend="triton", **k), hidden, weight, None, targets,
                                g, g)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = prev
    truth, budget = truth_and_budget(hidden, weight, None, targets, g, g,
                                     store=torch.bfloat16)
    assert_all_within("gpu", truth, budget, out)
    check_invariants("gpu", out[0], out[1], out[2], targets)
