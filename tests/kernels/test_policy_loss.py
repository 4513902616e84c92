"""policy_loss: the reference against float64 loops written out here, then the Triton kernels against it.

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
from npo_kernels.testing import assert_close

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

AGGS = list(AGGREGATIONS)
TRANSFORMS = list(GUIDE_TRANSFORMS)
METRIC_KEYS = ("pg/clipfrac", "pg/clipfrac_guide", "pg/ratio_mean_guide", "pg/ppo_kl")


def policy_loss_ref(*args, **kwargs):
    """The reference, through the public op so it gets the op's defaults."""
    return policy_loss(*args, backend="torch", **kwargs)


# ---- Independent float64 formulas: plain loops over sequences and tokens -----------------------------------

def naive_policy_loss(logp, behavior_logp, advantages, mask, policy_id=None, *, clip_low=0.2, clip_high=0.2,
                      dual_clip=None, guide_transform="ppo", shaping_gamma=0.1, agg="seq-mean-token-mean",
                      norm_length=None):
    """The spec, token by token in Python floats. Returns (loss, metrics) as floats."""
    num_rows, seq_len = logp.shape
    row_sums, row_counts = [], []
    clip_on = clip_guide = tok_on = tok_guide = 0
    ratio_guide = kl = 0.0
    for b in range(num_rows):
        guide = policy_id is not None and int(policy_id[b]) != 0
        row_sum, row_count = 0.0, 0
        for t in range(seq_len):
            if not bool(mask[b, t]):
                continue
            lp, blp = float(logp[b, t]), float(behavior_logp[b, t])
            a = float(advantages[b] if advantages.dim() == 1 else advantages[b, t])
            log_r = min(max(lp - blp, -20.0), 20.0)
            r = math.exp(log_r)
            clipped = False
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
                if dual_clip is not None and a < 0:
                    loss = min(loss, -a * dual_clip)
            row_sum += loss
            row_count += 1
            kl += -log_r
            if guide:
                tok_guide += 1
                clip_guide += clipped
                ratio_guide += r
            else:
                tok_on += 1
                clip_on += clipped
        row_sums.append(row_sum)
        row_counts.append(row_count)

    nonempty = [(s, n) for s, n in zip(row_sums, row_counts) if n > 0]
    tokens = sum(row_counts)
    if agg == "token-mean":
        loss = sum(row_sums) / tokens if tokens else 0.0
    elif agg == "seq-mean-token-mean":
        loss = sum(s / n for s, n in nonempty) / len(nonempty) if nonempty else 0.0
    elif agg == "seq-mean-token-sum":
        loss = sum(s for s, _ in nonempty) / len(nonempty) if nonempty else 0.0
    else:
        loss = sum(row_sums) / (num_rows * (norm_length or seq_len))
    metrics = {
        "pg/clipfrac": clip_on / tok_on if tok_on else 0.0,
        "pg/clipfrac_guide": clip_guide / tok_guide if tok_guide else 0.0,
        "pg/ratio_mean_guide": ratio_guide / tok_guide if tok_guide else 0.0,
        "pg/ppo_kl": kl / tokens if tokens else 0.0,
    }
    return loss, metrics


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
    """Loss, metrics and dlogp of one call."""
    logp = logp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, behavior_logp, advantages, mask, backend=backend, **kwargs)
    loss.backward()
    return loss, metrics, logp.grad


# ---- Reference against the float64 loops -------------------------------------------------------------------

@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("guide_transform", TRANSFORMS)
def test_reference_matches_loops(agg, guide_transform):
    for dual_clip, adv_per_token in itertools.product([None, 1.5], [False, True]):
        logp, blogp, adv, mask, pid = make_inputs(adv_per_token=adv_per_token, dtype=torch.float64)
        kwargs = dict(policy_id=pid, dual_clip=dual_clip, guide_transform=guide_transform, agg=agg,
                      clip_high=0.28)
        loss, metrics = policy_loss_ref(logp, blogp, adv, mask, **kwargs)
        want_loss, want_metrics = naive_policy_loss(logp, blogp, adv, mask, **kwargs)
        assert_close("loss", torch.tensor(want_loss), loss)
        for key in METRIC_KEYS:
            assert metrics[key].dtype == torch.float32 and metrics[key].dim() == 0
            assert_close(key, torch.tensor(want_metrics[key]), metrics[key], torch.float32)


def test_reference_norm_length_and_all_on_policy():
    logp, blogp, adv, mask, _ = make_inputs(dtype=torch.float64)
    for kwargs in (dict(agg="seq-mean-token-sum-norm", norm_length=100), dict(policy_id=None)):
        loss, metrics = policy_loss_ref(logp, blogp, adv, mask, **kwargs)
        want_loss, want_metrics = naive_policy_loss(logp, blogp, adv, mask, **kwargs)
        assert_close("loss", torch.tensor(want_loss), loss)
        assert_close("pg/clipfrac", torch.tensor(want_metrics["pg/clipfrac"]), metrics["pg/clipfrac"],
                     torch.float32)


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
    loss_ref, metrics_ref, grad_ref = run("torch", logp, blogp, adv, mask, **kwargs)
    loss, metrics, grad = run("triton", logp, blogp, adv, mask, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == logp.dtype
    assert_close("loss", loss_ref, loss)
    assert_close("dlogp", grad_ref, grad)
    assert metrics.keys() == metrics_ref.keys()
    for key in metrics_ref:
        assert_close(key, metrics_ref[key], metrics[key])
    assert (grad[~mask] == 0).all(), "masked tokens must get an exactly zero gradient"


def test_triton_two_chunks_float_mask_fp16():
    """T = 1500 spans two 1024-token chunks; a float 0/1 mask; fp16 logp keeps an fp16 gradient."""
    logp, blogp, adv, mask, pid = make_inputs(num_rows=2, seq_len=1500, adv_per_token=True)
    kwargs = dict(policy_id=pid, dual_clip=1.5, agg="seq-mean-token-mean")
    loss_ref, _, grad_ref = run("torch", logp, blogp, adv, mask, **kwargs)
    loss, _, grad = run("triton", logp, blogp, adv, mask.float(), **kwargs)
    assert_close("loss", loss_ref, loss)
    assert_close("dlogp", grad_ref, grad)

    loss_ref, _, grad_ref = run("torch", logp.half(), blogp, adv, mask, **kwargs)
    loss, _, grad = run("triton", logp.half(), blogp, adv, mask, **kwargs)
    assert grad.dtype == torch.float16
    assert_close("loss", loss_ref, loss, torch.float16)
    assert_close("dlogp", grad_ref, grad, torch.float16)


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
    want_loss, want_metrics = naive_policy_loss(logp.double(), blogp.double(), adv.double(), mask, pid,
                                                guide_transform=guide_transform, agg="token-mean")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close("loss", torch.tensor(want_loss), loss, torch.float32)
    assert_close("pg/ppo_kl", torch.tensor(want_metrics["pg/ppo_kl"]), metrics["pg/ppo_kl"])
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
    assert_close("loss", loss_two_rows, loss)
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

    def loss_fn(lp):
        return policy_loss(lp, blogp, adv, mask, policy_id=pid, guide_transform="exgrpo", backend="triton")[0]

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager_logp, compiled_logp = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    loss_fn(eager_logp).backward()
    loss = compiled(compiled_logp)
    loss.backward()
    assert_close("loss", loss_fn(logp), loss)
    assert_close("dlogp", eager_logp.grad, compiled_logp.grad)


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
    """B = 64, T = 4099 (several chunks, unaligned tail) on CUDA; bf16 logp against the fp32 reference of the
    same bf16 values."""
    logp, blogp, adv, mask, pid = (t.to(DEVICE) for t in make_inputs(num_rows=64, seq_len=4099, seed=1))
    logp = logp.to(dtype)
    for agg, transform in itertools.product(AGGS, TRANSFORMS):
        kwargs = dict(policy_id=pid, dual_clip=3.0, guide_transform=transform, agg=agg)
        loss_ref, metrics_ref, grad_ref = run("torch", logp, blogp, adv, mask, **kwargs)
        loss, metrics, grad = run("auto", logp, blogp, adv, mask, **kwargs)
        # 1e-4, not 1e-5: 2.6e5-token fp32 sums in a different order (per-chunk tree vs torch pairwise).
        assert_close(f"loss[{agg},{transform}]", loss_ref, loss, torch.float32, atol=1e-4, rtol=1e-4)
        # Per-token gradients are ~1/(masked tokens) ≈ 5e-6, below fp32's atol: compare them rescaled to O(1).
        scale = mask.sum()
        assert_close(f"dlogp[{agg},{transform}]", grad_ref * scale, grad * scale, dtype)
        for key in METRIC_KEYS:
            assert_close(key, metrics_ref[key], metrics[key], torch.float32, atol=1e-4, rtol=1e-4)
