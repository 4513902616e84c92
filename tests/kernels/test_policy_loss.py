"""policy_loss: the reference against float64 loops written out here, then the Triton kernels against the
float64 truth (the loops for the loss and metrics, the float64 reference's autograd for dlogp).

Every bound is an error budget from `npo_kernels.testing` (policy_loss_budget, policy_grad_budget,
policy_metric_budget; the rounding-error analysis is written there): u, the T-term row sums and the B-term
sum over rows, the magnitude of the terms (Σ w_b|L_bt|, |A|·w_b, max|log r|), never one machine's
reference error. Clip decisions are assumed not to flip between implementations: a token flips only if its
ratio lies within a rounding of a clip bound, which none of these seeds produces.

Grid rationale: the Triton parity grid is every aggregation × guide transform × dual clip on/off × advantages
[B] / [B, T] × policy_id None / mixed, on B = 4 rows chosen to cover the row cases (on-policy, guide, a fully
masked row, a guide row) with T = 37 (not a multiple of the block, so the tail is masked). One more case has
T = 1500 > 1024 tokens, so a row spans two kernel chunks. Shapes stay tiny: the kernels run in the Triton
interpreter on CPU, which costs milliseconds per program.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import itertools
import math

import pytest

from npo_kernels.policy_loss.op import policy_loss
from npo_kernels.policy_loss.reference import AGGREGATIONS, GUIDE_TRANSFORMS
from npo_kernels.testing import (
    U32,
    assert_close,
    assert_within,
    policy_grad_budget,
    policy_loss_budget,
    policy_metric_budget,
    policy_token_rel_error,
    unit_roundoff,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

AGGS = list(AGGREGATIONS)
TRANSFORMS = list(GUIDE_TRANSFORMS)
METRIC_KEYS = ("pg/clipfrac", "pg/clipfrac_guide", "pg/ratio_mean_guide", "pg/ppo_kl")
ALL_METRIC_KEYS = METRIC_KEYS + ("pg/dual_clipfrac", "pg/ratio_mean", "pg/guide_token_frac")


def policy_loss_ref(*args, **kwargs):
    """The reference, through the public op so it gets the op's defaults."""
    return policy_loss(*args, backend="torch", **kwargs)


# ---- Independent float64 formulas: plain loops over sequences and tokens -----------------------------------

def naive_policy_loss(logp, behavior_logp, advantages, mask, policy_id=None, *, clip_low=0.2, clip_high=0.2,
                      dual_clip=None, guide_transform="ppo", shaping_gamma=0.1, agg="seq-mean-token-mean",
                      norm_length=None, magnitudes=False):
    """The spec, token by token in Python floats. Returns (loss, metrics) as floats; with magnitudes=True
    also a dict of what the error budgets need: the loss with every term replaced by its magnitude
    (`abs_loss`), each row's weight w_b = ∂loss/∂(row sum), max |log r| and |logp| over masked-in tokens,
    mean |log r|, and the token count."""
    num_rows, seq_len = logp.shape
    lp_rows, blp_rows, mask_rows = logp.tolist(), behavior_logp.tolist(), mask.bool().tolist()
    adv_rows = advantages.tolist()
    pid = None if policy_id is None else policy_id.tolist()
    row_sums, row_abs, row_counts = [], [], []
    clip_on = clip_guide = dual = tok_on = tok_guide = 0
    ratio_on = ratio_guide = kl = kl_abs = 0.0
    log_r_max = logp_max = 0.0
    for b in range(num_rows):
        guide = pid is not None and int(pid[b]) != 0
        row_sum, row_sum_abs, row_count = 0.0, 0.0, 0
        for t in range(seq_len):
            if not mask_rows[b][t]:
                continue
            lp, blp = float(lp_rows[b][t]), float(blp_rows[b][t])
            a = float(adv_rows[b] if advantages.dim() == 1 else adv_rows[b][t])
            log_r = min(max(lp - blp, -20.0), 20.0)
            r = math.exp(log_r)
            clipped = is_dual = False
            if guide and guide_transform == "luffy":
                p = math.exp(lp)
                loss = -a * p / (p + shaping_gamma)
            elif guide and guide_transform == "exgrpo":
                loss = -a * r / (r + shaping_gamma)
            else:
                unclipped = -a * r
                clipped_term = -a * min(max(r, 1 - clip_low), 1 + clip_high)
                clipped = clipped_term > unclipped
                loss = max(unclipped, clipped_term)
                if dual_clip is not None and a < 0 and -a * dual_clip < loss:
                    loss, is_dual = -a * dual_clip, True
            row_sum += loss
            row_sum_abs += abs(loss)
            row_count += 1
            kl += -log_r
            kl_abs += abs(log_r)
            dual += is_dual
            log_r_max, logp_max = max(log_r_max, abs(log_r)), max(logp_max, abs(lp))
            if guide:
                tok_guide += 1
                clip_guide += clipped
                ratio_guide += r
            else:
                tok_on += 1
                clip_on += clipped
                ratio_on += r
        row_sums.append(row_sum)
        row_abs.append(row_sum_abs)
        row_counts.append(row_count)

    tokens = sum(row_counts)
    nonempty = sum(1 for n in row_counts if n > 0)
    if agg == "token-mean":
        weights = [1.0 / tokens if tokens else 0.0] * num_rows
    elif agg == "seq-mean-token-mean":
        weights = [1.0 / (n * nonempty) if n else 0.0 for n in row_counts]
    elif agg == "seq-mean-token-sum":
        weights = [1.0 / nonempty if n else 0.0 for n in row_counts]
    else:
        weights = [1.0 / (num_rows * (norm_length or seq_len))] * num_rows
    loss = sum(w * x for w, x in zip(weights, row_sums))
    frac = lambda num, den: num / den if den else 0.0  # noqa: E731
    metrics = {
        "pg/clipfrac": frac(clip_on, tok_on),
        "pg/clipfrac_guide": frac(clip_guide, tok_guide),
        "pg/ratio_mean_guide": frac(ratio_guide, tok_guide),
        "pg/ppo_kl": frac(kl, tokens),
        "pg/dual_clipfrac": frac(dual, tokens),
        "pg/ratio_mean": frac(ratio_on, tok_on),
        "pg/guide_token_frac": frac(tok_guide, tokens),
    }
    if not magnitudes:
        return loss, metrics
    extra = dict(abs_loss=sum(w * x for w, x in zip(weights, row_abs)), weights=weights, log_r_max=log_r_max,
                 logp_max=logp_max, kl_abs=frac(kl_abs, tokens), tokens=tokens)
    return loss, metrics, extra


def truth_and_budget(logp, behavior_logp, advantages, mask, *, store=None, u=U32, **kwargs):
    """The float64 truth of (loss, metrics, dlogp) and the error budget of each (store: the dtype of a
    half-precision logp, whose gradient is rounded to it)."""
    double = lambda t: t.detach().double() if t.is_floating_point() else t  # noqa: E731
    loss, metrics, extra = naive_policy_loss(double(logp), double(behavior_logp), double(advantages), mask,
                                             magnitudes=True, **kwargs)
    _, _, grad = run("torch", double(logp), double(behavior_logp), double(advantages), mask, **kwargs)
    num_rows, seq_len = logp.shape
    rho = policy_token_rel_error(extra["log_r_max"], extra["logp_max"], kwargs.get("shaping_gamma", 0.1), u)
    adv = double(advantages).abs()
    adv = adv[:, None].expand(num_rows, seq_len) if adv.dim() == 1 else adv
    adv_weight = adv * torch.tensor(extra["weights"], dtype=torch.float64)[:, None] * mask.bool()
    budget = dict(
        loss=policy_loss_budget(extra["abs_loss"], rho, seq_len, num_rows, u),
        dlogp=policy_grad_budget(grad, adv_weight, rho, u, store=store),
        metrics={key: policy_metric_budget(extra["kl_abs"] if key == "pg/ppo_kl" else abs(value),
                                           rho if key in ("pg/ratio_mean", "pg/ratio_mean_guide", "pg/ppo_kl")
                                           else 0.0, max(extra["tokens"], 1), num_rows)
                 for key, value in metrics.items()},
    )
    truth = dict(loss=torch.tensor(loss, dtype=torch.float64), dlogp=grad,
                 metrics={k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
    return truth, budget


def assert_all_within(label, truth, budget, loss, metrics, grad, keys=ALL_METRIC_KEYS):
    assert_within(f"{label}/loss", truth["loss"], loss, budget["loss"])
    assert_within(f"{label}/dlogp", truth["dlogp"], grad, budget["dlogp"])
    for key in keys:
        assert_within(f"{label}/{key}", truth["metrics"][key], metrics[key], budget["metrics"][key])


def make_inputs(num_rows=4, seq_len=37, *, adv_per_token=False, dtype=torch.float32, seed=0, spread=0.5):
    """Rows: 0 on-policy, 1 guide, 2 on-policy and fully masked, 3 guide; ratios spread around 1 so the clip
    and dual clip (1.5) are both active on some tokens."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(num_rows, seq_len, generator=g, dtype=torch.float64) * 3
    behavior_logp = logp + spread * torch.randn(num_rows, seq_len, generator=g, dtype=torch.float64)
    shape = (num_rows, seq_len) if adv_per_token else (num_rows,)
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(num_rows, seq_len, generator=g) < 0.7
    if num_rows > 2:
        mask[2] = False
    policy_id = torch.arange(num_rows) % 2
    return logp.to(dtype), behavior_logp.to(dtype), advantages.to(dtype), mask, policy_id


def run(backend, logp, behavior_logp, advantages, mask, **kwargs):
    """Loss, metrics and dlogp of one call, on the inputs' device; backend="triton" runs on CUDA copies when
    there is a GPU (CPU tensors reach the kernels only under the interpreter), results moved back."""
    device = logp.device
    if backend == "triton" and HAS_CUDA:
        logp, behavior_logp, advantages, mask = (t.cuda() for t in (logp, behavior_logp, advantages, mask))
        if kwargs.get("policy_id") is not None:
            kwargs = {**kwargs, "policy_id": kwargs["policy_id"].cuda()}
    logp = logp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, behavior_logp, advantages, mask, backend=backend, **kwargs)
    loss.backward()
    return loss.to(device), {k: v.to(device) for k, v in metrics.items()}, logp.grad.to(device)


# ---- Reference against the float64 loops -------------------------------------------------------------------

def reference_budget(logp, blogp, adv, mask, **kwargs):
    """Budgets for the float64 reference against the float64 loops: both are float64 computations of the
    same sums (u = 2^-53, doubled: either side may err), while the metrics are fp32 tensors by contract
    (row sums rounded to fp32 and summed in fp32: the fp32 metric budget)."""
    truth, budget = truth_and_budget(logp, blogp, adv, mask, u=unit_roundoff(torch.float64), **kwargs)
    budget["loss"] *= 2
    _, fp32_budget = truth_and_budget(logp, blogp, adv, mask, **kwargs)
    budget["metrics"] = fp32_budget["metrics"]
    return truth, budget


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("guide_transform", TRANSFORMS)
def test_reference_matches_loops(agg, guide_transform):
    for dual_clip, adv_per_token in itertools.product([None, 1.5], [False, True]):
        logp, blogp, adv, mask, pid = make_inputs(adv_per_token=adv_per_token, dtype=torch.float64)
        kwargs = dict(policy_id=pid, dual_clip=dual_clip, guide_transform=guide_transform, agg=agg,
                      clip_high=0.28)
        loss, metrics = policy_loss_ref(logp, blogp, adv, mask, **kwargs)
        truth, budget = reference_budget(logp, blogp, adv, mask, **kwargs)
        assert_within("loss", truth["loss"], loss, budget["loss"])
        for key in ALL_METRIC_KEYS:
            assert metrics[key].dtype == torch.float32 and metrics[key].dim() == 0
            assert_within(key, truth["metrics"][key], metrics[key], budget["metrics"][key])


def test_reference_norm_length_and_all_on_policy():
    logp, blogp, adv, mask, _ = make_inputs(dtype=torch.float64)
    for kwargs in (dict(agg="seq-mean-token-sum-norm", norm_length=100), dict(policy_id=None)):
        loss, metrics = policy_loss_ref(logp, blogp, adv, mask, **kwargs)
        truth, budget = reference_budget(logp, blogp, adv, mask, **kwargs)
        assert_within("loss", truth["loss"], loss, budget["loss"])
        assert_within("pg/clipfrac", truth["metrics"]["pg/clipfrac"], metrics["pg/clipfrac"],
                      budget["metrics"]["pg/clipfrac"])


@pytest.mark.parametrize("guide_transform", TRANSFORMS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_reference_gradcheck(guide_transform, agg):
    logp, blogp, adv, mask, pid = make_inputs(num_rows=4, seq_len=6, adv_per_token=True, dtype=torch.float64)
    logp.requires_grad_(True)

    def loss_fn(lp):
        return policy_loss_ref(lp, blogp, adv, mask, policy_id=pid, dual_clip=1.5,
                               guide_transform=guide_transform, agg=agg)[0]

    assert torch.autograd.gradcheck(loss_fn, (logp,))


def test_hand_made_values():
    """Tokens worked out by hand: unclipped, clipped high, dual-clipped, and the two shaping transforms."""
    logp = torch.zeros(1, 4, dtype=torch.float64)
    behavior_logp = -torch.tensor([[math.log(1.1), math.log(2.0), math.log(4.0), 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    # r = 1.1 (inside [0.8, 1.2]) -> −1.1; r = 2 with A > 0 -> clipped −1.2;
    # r = 4 with A < 0 -> 4, dual 3 -> 3; r = 1 -> −1.
    loss, metrics = policy_loss_ref(logp, behavior_logp, adv, mask, dual_clip=3.0, agg="token-mean")
    assert_close("loss", torch.tensor((-1.1 - 1.2 + 3.0 - 1.0) / 4, dtype=torch.float64), loss)
    assert_close("pg/clipfrac", torch.tensor(0.25), metrics["pg/clipfrac"])  # only r = 2 is clipped
    assert_close("pg/dual_clipfrac", torch.tensor(0.25), metrics["pg/dual_clipfrac"])

    # Guide row, luffy: p = 0.5, γ = 0.1 -> −A·0.5/0.6; exgrpo: r = 2, γ = 0.1 -> −A·2/2.1.
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    behavior_logp = logp - math.log(2.0)
    one = torch.ones(1, 1, dtype=torch.bool)
    guide = torch.tensor([1])
    luffy, _ = policy_loss_ref(logp, behavior_logp, torch.tensor([2.0]), one, policy_id=guide,
                               guide_transform="luffy")
    exgrpo, metrics = policy_loss_ref(logp, behavior_logp, torch.tensor([2.0]), one, policy_id=guide,
                                      guide_transform="exgrpo")
    assert_close("luffy", torch.tensor(-2.0 * 0.5 / 0.6, dtype=torch.float64), luffy)
    assert_close("exgrpo", torch.tensor(-2.0 * 2.0 / 2.1, dtype=torch.float64), exgrpo)
    assert_close("pg/ratio_mean_guide", torch.tensor(2.0), metrics["pg/ratio_mean_guide"])
    assert metrics["pg/clipfrac_guide"] == 0 and metrics["pg/clipfrac"] == 0  # no on-policy token -> 0


# ---- Triton against the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("with_policy_id", [False, True], ids=["pid-none", "pid-mixed"])
@pytest.mark.parametrize("adv_per_token", [False, True], ids=["adv-B", "adv-BT"])
@pytest.mark.parametrize("dual_clip", [None, 1.5], ids=["dual-off", "dual-1.5"])
@pytest.mark.parametrize("guide_transform", TRANSFORMS)
@pytest.mark.parametrize("agg", AGGS)
def test_triton_matches_reference(agg, guide_transform, dual_clip, adv_per_token, with_policy_id):
    logp, blogp, adv, mask, pid = make_inputs(adv_per_token=adv_per_token)
    kwargs = dict(policy_id=pid if with_policy_id else None, dual_clip=dual_clip,
                  guide_transform=guide_transform, agg=agg, clip_high=0.28)
    truth, budget = truth_and_budget(logp, blogp, adv, mask, **kwargs)
    _, metrics_ref, _ = run("torch", logp, blogp, adv, mask, **kwargs)
    loss, metrics, grad = run("triton", logp, blogp, adv, mask, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == logp.dtype
    assert metrics.keys() == metrics_ref.keys() == set(ALL_METRIC_KEYS)
    assert_all_within("triton", truth, budget, loss, metrics, grad)
    assert (grad[~mask] == 0).all(), "masked tokens must get an exactly zero gradient"


def test_triton_two_chunks_float_mask_fp16():
    """T = 1500 spans two 1024-token chunks; a float 0/1 mask; fp16 logp keeps an fp16 gradient."""
    logp, blogp, adv, mask, pid = make_inputs(num_rows=2, seq_len=1500, adv_per_token=True)
    kwargs = dict(policy_id=pid, dual_clip=1.5, agg="seq-mean-token-mean")
    truth, budget = truth_and_budget(logp, blogp, adv, mask, **kwargs)
    loss, metrics, grad = run("triton", logp, blogp, adv, mask.float(), **kwargs)
    assert_all_within("triton", truth, budget, loss, metrics, grad)

    # fp16 logp: exact in fp32, so the fp32 budget, plus the rounding of the gradient to fp16.
    truth, budget = truth_and_budget(logp.half(), blogp, adv, mask, store=torch.float16, **kwargs)
    loss, metrics, grad = run("triton", logp.half(), blogp, adv, mask, **kwargs)
    assert grad.dtype == torch.float16
    assert_all_within("triton-fp16", truth, budget, loss, metrics, grad)


# ---- Edge cases, both backends -----------------------------------------------------------------------------

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch_gives_zero(backend, agg):
    logp, blogp, adv, mask, pid = make_inputs(num_rows=3, seq_len=5)
    mask = torch.zeros_like(mask)
    loss, metrics, grad = run(backend, logp, blogp, adv, mask, policy_id=pid, agg=agg)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert (grad == 0).all()
    assert all(m.item() == 0.0 for m in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guide_transform", TRANSFORMS)
def test_far_ratio_is_clamped_not_inf(backend, guide_transform):
    """|logp − behavior_logp| = 50: the log-ratio clamps at ±20 (no inf/NaN, zero gradient there), and garbage
    (−inf, NaN) under the mask never reaches exp()."""
    logp = torch.full((2, 4), -1.0)
    blogp = logp.clone()
    blogp[:, 0] = logp[:, 0] - 50.0  # r = e^20
    blogp[:, 1] = logp[:, 1] + 50.0  # r = e^-20
    logp[:, 3], blogp[:, 3] = -float("inf"), float("nan")  # masked out below
    mask = torch.tensor([[True, True, True, False]] * 2)
    adv = torch.tensor([1.0, -1.0])
    pid = torch.tensor([0, 1])
    loss, metrics, grad = run(backend, logp, blogp, adv, mask, policy_id=pid, guide_transform=guide_transform,
                              agg="token-mean")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    truth, budget = truth_and_budget(logp, blogp, adv, mask, policy_id=pid, guide_transform=guide_transform,
                                     agg="token-mean")
    assert_all_within(backend, truth, budget, loss, metrics, grad)
    assert (grad[:, 3] == 0).all()
    if guide_transform != "luffy":  # luffy depends on logp itself, not the clamped ratio
        assert (grad[:, :2] == 0).all(), "the clamp passes no gradient outside ±20"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_row_is_left_out_of_seq_mean(backend):
    logp, blogp, adv, mask, _ = make_inputs(num_rows=3, seq_len=8)
    mask[1] = False
    loss, _, grad = run(backend, logp, blogp, adv, mask, agg="seq-mean-token-mean")
    loss_two_rows, _, _ = run(backend, logp[[0, 2]], blogp[[0, 2]], adv[[0, 2]], mask[[0, 2]],
                              agg="seq-mean-token-mean")
    # Both are the same exact number (the loops' two-row loss), each within its budget of it.
    truth, budget = truth_and_budget(logp[[0, 2]], blogp[[0, 2]], adv[[0, 2]], mask[[0, 2]],
                                     agg="seq-mean-token-mean")
    assert_within("loss", truth["loss"], loss, budget["loss"])
    assert_within("loss(two rows)", truth["loss"], loss_two_rows, budget["loss"])
    assert (grad[1] == 0).all()


def test_no_guide_tokens_gives_zero_guide_metrics():
    logp, blogp, adv, mask, _ = make_inputs(num_rows=2, seq_len=6)
    for backend in BACKENDS:
        _, metrics, _ = run(backend, logp, blogp, adv, mask, policy_id=torch.tensor([0, 0]))
        for key in ("pg/clipfrac_guide", "pg/ratio_mean_guide", "pg/guide_token_frac"):
            assert metrics[key].item() == 0.0, key


def test_metrics_are_detached_fp32_scalars():
    logp, blogp, adv, mask, pid = make_inputs(num_rows=2, seq_len=6)
    for backend in BACKENDS:
        _, metrics, _ = run(backend, logp, blogp, adv, mask, policy_id=pid)
        for key in METRIC_KEYS:
            assert not metrics[key].requires_grad and metrics[key].dtype == torch.float32
            assert metrics[key].dim() == 0


def test_triton_op_compiles_with_torch_compile():
    """The custom op traces under torch.compile (fullgraph) and gives the eager result and gradient."""
    logp, blogp, adv, mask, pid = make_inputs(num_rows=2, seq_len=9)
    if HAS_CUDA:   # CPU tensors reach the kernels only under the interpreter
        logp, blogp, adv, mask, pid = (t.cuda() for t in (logp, blogp, adv, mask, pid))

    def loss_fn(lp):
        return policy_loss(lp, blogp, adv, mask, policy_id=pid, guide_transform="exgrpo", backend="triton")[0]

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    compiled_logp = logp.clone().requires_grad_(True)
    loss = compiled(compiled_logp)
    loss.backward()
    truth, budget = truth_and_budget(*(t.cpu() for t in (logp, blogp, adv, mask)), policy_id=pid.cpu(),
                                     guide_transform="exgrpo")
    assert_within("loss", truth["loss"], loss, budget["loss"])
    assert_within("dlogp", truth["dlogp"], compiled_logp.grad, budget["dlogp"])


@pytest.mark.parametrize(("kwargs", "names"), [
    (dict(agg="mean"), ["agg", "'mean'", "token-mean"]),
    (dict(guide_transform="grpo"), ["guide_transform", "luffy"]),
    (dict(backend="cuda"), ["backend", "triton"]),
    (dict(clip_low=1.0), ["clip_low"]),
    (dict(clip_high=-0.1), ["clip_high"]),
    (dict(dual_clip=0.9), ["dual_clip"]),
    (dict(shaping_gamma=0.0), ["shaping_gamma"]),
    (dict(norm_length=0), ["norm_length"]),
])
def test_invalid_arguments_raise(kwargs, names):
    logp, blogp, adv, mask, _ = make_inputs(num_rows=2, seq_len=4)
    with pytest.raises(ValueError) as err:
        policy_loss(logp, blogp, adv, mask, **kwargs)
    for name in names:
        assert name in str(err.value)


def test_shape_mismatch_names_the_tensor():
    logp, blogp, adv, mask, _ = make_inputs(num_rows=2, seq_len=4)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, blogp, adv[:1], mask)
    with pytest.raises(ValueError, match="policy_id"):
        policy_loss(logp, blogp, adv, mask, policy_id=torch.zeros(3, dtype=torch.long))


# ---- GPU: real shapes, bf16 --------------------------------------------------------------------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(dtype):
    """B = 64, T = 4099 (several chunks, unaligned tail) on CUDA against the float64 truth of the same
    inputs; bf16 logp is exact in fp32, and its gradient is rounded to bf16 (store)."""
    logp, blogp, adv, mask, pid = make_inputs(num_rows=64, seq_len=4099, seed=1)
    logp = logp.to(dtype)
    store = None if dtype == torch.float32 else dtype
    for agg, transform in itertools.product(AGGS, TRANSFORMS):
        kwargs = dict(policy_id=pid, dual_clip=3.0, guide_transform=transform, agg=agg)
        truth, budget = truth_and_budget(logp, blogp, adv, mask, store=store, **kwargs)
        loss, metrics, grad = run("auto", *(t.to(DEVICE) for t in (logp, blogp, adv, mask)),
                                  **{**kwargs, "policy_id": pid.to(DEVICE)})
        assert_all_within(f"gpu[{agg},{transform}]", truth, budget, loss, metrics, grad)
