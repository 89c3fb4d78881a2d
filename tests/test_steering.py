"""The MARS rule as pure tensor functions, including property tests."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrail.errors import SteeringError
from guardrail.steering import (
    first_positions,
    last_positions,
    mars_step,
    recenter,
    refusal_score,
    steering_strength,
    window_mean,
)

finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)
positive = st.floats(0.01, 20, allow_nan=False)


def _unit(d: int, seed: int) -> torch.Tensor:
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm()


def test_score_is_zero_at_harmless_and_one_at_harmful_centroid():
    gen = torch.Generator().manual_seed(0)
    mu_S = torch.randn(16, generator=gen, dtype=torch.float64)
    mu_H = mu_S + torch.randn(16, generator=gen, dtype=torch.float64)
    r = mu_H - mu_S
    g, u = r.norm(), r / r.norm()
    p_S = mu_S @ u
    assert float(refusal_score(mu_S, u, p_S, g)) == pytest.approx(0.0, abs=1e-12)
    assert float(refusal_score(mu_H, u, p_S, g)) == pytest.approx(1.0, abs=1e-12)


def test_recenter_modes():
    u = _unit(8, 1)
    h = torch.randn(8, dtype=torch.float64)
    delta = torch.randn(8, dtype=torch.float64)
    assert torch.equal(recenter(h, delta, u, "none"), h)
    assert torch.allclose(recenter(h, delta, u, "full"), h - delta)
    proj = recenter(h, delta, u, "projection")
    # only the component along u is removed: orthogonal part unchanged
    ortho = lambda x: x - (x @ u) * u  # noqa: E731
    assert torch.allclose(ortho(proj), ortho(h))
    assert float(proj @ u) == pytest.approx(float(h @ u - delta @ u))
    with pytest.raises(ValueError, match="recenter mode"):
        recenter(h, delta, u, "partial")


def _strength(s: float, g: float, tau: float, lam: float, kappa: float) -> float:
    """``steering_strength`` on float64 scalars, as a Python float."""
    return float(
        steering_strength(
            torch.tensor(s, dtype=torch.float64),
            torch.tensor(g, dtype=torch.float64),
            tau=tau,
            lam=lam,
            kappa=kappa,
        )
    )


@settings(max_examples=200, deadline=None)
@given(s=finite, g=positive, tau=finite, lam=st.floats(0, 10), kappa=st.floats(0, 5))
def test_strength_within_trust_region_and_zero_below_gate(s, g, tau, lam, kappa):
    a = _strength(s, g, tau, lam, kappa)
    assert a >= 0.0
    assert a <= kappa * g + 1e-9
    if s <= tau:
        assert a == 0.0


@settings(max_examples=200, deadline=None)
@given(s1=finite, s2=finite, g=positive, tau=finite, lam=st.floats(0, 10), kappa=st.floats(0, 5))
def test_strength_is_monotone_in_score(s1, s2, g, tau, lam, kappa):
    lo, hi = sorted((s1, s2))
    assert _strength(lo, g, tau, lam, kappa) <= _strength(hi, g, tau, lam, kappa) + 1e-12


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tau=finite,
    lam=st.floats(0, 10),
    kappa=st.floats(0, 5),
    eta=st.floats(0.001, 2),
    mode=st.sampled_from(["full", "projection", "none"]),
)
def test_mars_step_moves_along_u_by_at_most_the_bounds(seed, tau, lam, kappa, eta, mode):
    gen = torch.Generator().manual_seed(seed)
    d = 12
    h = torch.randn(3, d, generator=gen, dtype=torch.float64) * 4
    u = _unit(d, seed)
    delta = torch.randn(3, d, generator=gen, dtype=torch.float64)
    g = torch.tensor(2.5, dtype=torch.float64)
    out = mars_step(
        h,
        u=u,
        p_S=torch.tensor(0.3, dtype=torch.float64),
        g=g,
        delta=delta,
        tau=tau,
        lam=lam,
        kappa=kappa,
        eta=eta,
        recenter_mode=mode,
    )
    step = out.h - h
    # the write-back is a pure push along u (re-centring used for scoring only)
    along = step @ u
    assert torch.allclose(step, along.unsqueeze(-1) * u, atol=1e-9)
    assert torch.allclose(along, out.strength, atol=1e-9)
    assert (out.strength <= kappa * g + 1e-9).all()
    assert (out.strength <= eta * h.norm(dim=-1) + 1e-9).all()
    assert (out.strength[out.score <= tau] == 0).all()


def test_mars_step_zero_strength_is_bit_identical_in_low_precision():
    h = torch.randn(4, 32, dtype=torch.bfloat16)
    u = _unit(32, 3).float()
    out = mars_step(
        h,
        u=u,
        p_S=torch.tensor(0.0),
        g=torch.tensor(1.0),
        delta=torch.zeros(4, 32),
        tau=0.5,
        lam=0.0,
        kappa=1.0,
    )
    assert out.h.dtype == torch.bfloat16
    assert torch.equal(out.h, h)


def test_mars_step_applies_recentering_to_activation_when_asked():
    h = torch.randn(2, 8, dtype=torch.float64)
    u = _unit(8, 5)
    delta = torch.randn(2, 8, dtype=torch.float64)
    out = mars_step(
        h,
        u=u,
        p_S=torch.tensor(0.0, dtype=torch.float64),
        g=torch.tensor(1.0, dtype=torch.float64),
        delta=delta,
        tau=-math.inf,
        lam=1.0,
        kappa=0.0,
        apply_recentering_to_activation=True,
    )
    assert torch.allclose(out.h, h - delta)


def test_mars_step_recentres_only_the_steered_rows_when_steered():
    u = _unit(8, 5)
    delta = torch.randn(2, 8, dtype=torch.float64)
    delta -= (delta @ u).unsqueeze(-1) * u  # keep the scores where they are set below
    h = torch.randn(2, 8, dtype=torch.float64)
    h += (torch.tensor([2.0, -1.0], dtype=torch.float64) - h @ u).unsqueeze(-1) * u
    kwargs = dict(
        u=u,
        p_S=torch.tensor(0.0, dtype=torch.float64),
        g=torch.tensor(1.0, dtype=torch.float64),
        delta=delta,
        tau=0.5,
        lam=10.0,
        kappa=1.0,
    )
    out = mars_step(h, apply_recentering_to_activation="steered", **kwargs)
    assert out.strength.tolist() == [1.0, 0.0]
    assert torch.allclose(out.h[0], h[0] - delta[0] + u)  # re-centred and pushed
    assert torch.equal(out.h[1], h[1])  # below the gate: bit-identical
    scored_only = mars_step(h, apply_recentering_to_activation=False, **kwargs)
    assert torch.allclose(scored_only.h[0], h[0] + u)
    everywhere = mars_step(h, apply_recentering_to_activation=True, **kwargs)
    assert torch.allclose(everywhere.h[1], h[1] - delta[1])
    with pytest.raises(ValueError, match="apply_recentering_to_activation='always'"):
        mars_step(h, apply_recentering_to_activation="always", **kwargs)


def test_last_positions_with_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert last_positions(mask).tolist() == [4, 4, 2]


def test_window_mean_reads_the_last_k_positions_of_each_row():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    rows, pos, starts = torch.arange(2), last_positions(mask), first_positions(mask)
    assert torch.equal(window_mean(hidden, rows, pos, 1, starts), hidden[rows, pos])
    got = window_mean(hidden, rows, pos, 3, starts, dtype=torch.float64)
    assert got.dtype == torch.float64
    assert torch.equal(got[0], hidden[0, 2:5].double().mean(0))
    assert torch.equal(got[1], hidden[1, 1:4].double().mean(0))
    with pytest.raises(SteeringError, match="only 3"):
        window_mean(hidden, rows, pos, 4, starts)


def test_mars_step_scores_h_score_but_steers_h():
    gen = torch.Generator().manual_seed(0)
    h, other = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    u = torch.nn.functional.normalize(torch.randn(8, generator=gen), dim=0)
    kw = dict(u=u, p_S=torch.tensor(0.1), g=torch.tensor(2.0), delta=torch.zeros(8))
    kw.update(tau=-5.0, lam=1.0, kappa=0.5)
    own, window = mars_step(h, **kw), mars_step(h, h_score=other, **kw)
    assert torch.allclose(window.score, mars_step(other, **kw).score)
    assert not torch.allclose(window.score, own.score)
    moved = window.h - h
    assert torch.allclose(moved, window.strength.unsqueeze(-1) * u, atol=1e-6)
