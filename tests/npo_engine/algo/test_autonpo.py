"""AutoNPO's controller on constructed curves: trigger, t_min, cooldown, probe retry, D*, Q-hat, V-hat."""

import math

import pytest
import torch

from npo_engine.algo import autonpo
from npo_engine.config import AutoNPOConfig


def _params(**overrides) -> autonpo.ControllerParams:
    return autonpo.ControllerParams.from_config(AutoNPOConfig(**overrides))


P = _params(reward_ema=0.0, window=4, min_gain=0.005, entropy_drop=0.05, t_min=10, cooldown=10, probe_retry=5)


def _feed(rewards, entropies, params=P):
    state = autonpo.ControllerState()
    for r, h in zip(rewards, entropies):
        state = autonpo.observe(state, params, r, h)
    return state


def test_ema_and_history():
    state = _feed([0.0, 1.0], [2.0, 1.0], _params(reward_ema=0.9, window=1))
    assert state.reward_ema == pytest.approx(0.1) and state.entropy_ema == pytest.approx(1.9)
    assert state.reward_history == pytest.approx([0.0, 0.1])
    state = autonpo.observe(state, _params(reward_ema=0.9, window=1), 1.0, 1.0)
    assert len(state.reward_history) == 2  # window + 1


def test_triggers_only_when_both_conditions_hold():
    flat, falling, rising = [0.5] * 6, [1.0, 0.98, 0.96, 0.94, 0.92, 0.90], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert autonpo.should_probe(_feed(flat, falling), P, 20)[0]                 # stagnation + decline
    fire, why = autonpo.should_probe(_feed(rising, falling), P, 20)
    assert not fire and why["reason"] == "no stagnation"
    fire, why = autonpo.should_probe(_feed(flat, [1.0] * 6), P, 20)
    assert not fire and why["reason"] == "no entropy decline"
    assert why["entropy_drop"] == 0.0 and why["reward_gain"] == 0.0


def test_warm_up_t_min_cooldown_and_probe_retry():
    flat, falling = [0.5] * 6, [1.0, 0.98, 0.96, 0.94, 0.92, 0.90]
    assert autonpo.should_probe(_feed(flat[:3], falling[:3]), P, 20)[1]["reason"] == "warming up"
    state = _feed(flat, falling)
    assert autonpo.should_probe(state, P, 9)[1]["reason"] == "t < t_min = 10"
    assert autonpo.should_probe(state, P, 10)[0]
    cooled = autonpo.ControllerState(**{**state.to_json(), "last_end": 15})
    assert not autonpo.should_probe(cooled, P, 24)[0] and autonpo.should_probe(cooled, P, 25)[0]
    retried = autonpo.ControllerState(**{**state.to_json(), "last_probe": 20})
    assert not autonpo.should_probe(retried, P, 24)[0] and autonpo.should_probe(retried, P, 25)[0]


def test_state_round_trips_through_json():
    state = _feed([0.1, 0.2, 0.3], [1.0, 0.9, 0.8])
    assert autonpo.ControllerState.from_json(state.to_json()) == state
    assert autonpo.ControllerState.from_json({}) == autonpo.ControllerState()


def test_choose_distance_is_argmax_q_over_v():
    q = {10: 0.2, 20: 0.5, 30: 0.6, 40: None}
    v = {10: 1.0, 20: 1.25, 30: 2.0, 40: 1.0}
    d_star, table = autonpo.choose_distance(q, v)
    assert d_star == 20   # S = 0.2, 0.4, 0.3; 40 has no probed mistakes
    assert [row["S"] for row in table[:3]] == pytest.approx([0.2, 0.4, 0.3])
    assert table[3] == {"distance": 40, "Q": None, "V": 1.0, "S": None}
    assert autonpo.choose_distance({10: 0.3, 20: 0.3}, {10: 1.0, 20: 1.0})[0] == 10   # ties: the nearer
    assert autonpo.choose_distance({10: 0.0}, {10: 1.0})[0] is None                    # nothing solved: abort


def test_q_hat_uses_the_mistakes_of_the_window():
    passed, steps = [1.0, 0.0, 0.5, 1.0], [95, 85, 75, 50]
    assert autonpo.q_hat(passed, steps, 100, 10) == 1.0
    assert autonpo.q_hat(passed, steps, 100, 30) == pytest.approx(0.5)
    assert autonpo.q_hat(passed, steps, 100, 4) is None   # [96, 100) holds no probed mistake


def test_k3_and_v_hat():
    now, then = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    k3 = autonpo.k3_per_token(now, then)
    assert k3.tolist() == pytest.approx([math.exp(0.5) - 1 - 0.5, 0.0])
    kl = [k3, torch.tensor([0.2, 0.4], dtype=torch.float64)]
    assert autonpo.v_hat(kl, [95, 80], 100, 10) == pytest.approx(math.exp(float(k3.mean())))
    assert autonpo.v_hat(kl, [95, 80], 100, 30) == pytest.approx(math.exp(float(torch.cat([k3, kl[1]]).mean())))
    assert autonpo.v_hat(kl, [95, 80], 100, 3) is None


def test_stratified_pick_covers_every_slice():
    steps = [99, 98, 97, 96, 89, 88, 79, 50]
    picked = autonpo.stratified_pick(steps, 100, (10, 20, 30), 4)
    assert [steps[i] for i in picked] == [99, 89, 79, 98]   # round-robin over the slices; 50 is out of reach
    assert autonpo.stratified_pick(steps, 100, (10,), 100) == [0, 1, 2, 3]
