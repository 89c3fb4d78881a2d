"""The vLLM integration's parts that need no engine: the version gate, the op and
the per-step check."""

from __future__ import annotations

import pytest
import torch
from vllm_mars_guardrail import SUPPORTED_VLLM, check_vllm_version, op
from vllm_mars_guardrail.patch import OP_VERSION, engine_config

from guardrail.errors import SteeringError, UnsupportedModelError
from guardrail.steering import mars_step


def test_installed_vllm_is_a_supported_version():
    assert check_vllm_version().split("+")[0] in SUPPORTED_VLLM


@pytest.mark.parametrize("version", ["0.31.0", "0.33.0", "0.32.1", "1.0.0"])
def test_other_vllm_versions_are_refused_with_the_fix(version):
    with pytest.raises(UnsupportedModelError, match="not supported.*Install a supported"):
        check_vllm_version(version)


def test_the_compile_cache_key_names_the_layers_and_the_op_version():
    config = engine_config([7, 3, 7])
    assert config == {"mars_guardrail": {"layers": [3, 7], "op_version": OP_VERSION}}
    assert len(OP_VERSION) == 16


def _group(rows, d=8, apply=True, tau=0.0):
    k = len(rows)
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    return op.RowGroup(
        layer=2,
        rows=torch.tensor(rows),
        u=u.expand(k, -1),
        p_S=torch.full((k,), 0.5),
        g=torch.full((k,), 2.0),
        delta=torch.zeros(k, d),
        tau=torch.full((k,), tau),
        lam=torch.full((k,), 1.0),
        kappa=torch.full((k,), 4.0),
        eta=torch.full((k,), 0.5),
        recenter_mode="none",
        apply_recentering_to_activation=False,
        apply=apply,
    )


def test_the_op_steers_the_planned_rows_only_and_records_that_it_ran():
    hidden, residual = torch.randn(6, 8), torch.randn(6, 8)
    group = _group([1, 4], tau=-10.0)
    op.STEP.plan = op.StepPlan(groups={2: [group]})
    try:
        out = torch.ops.mars_guardrail.steer(hidden, residual, 2)
        untouched = torch.ops.mars_guardrail.steer(hidden, residual, 3)  # another layer
    finally:
        op.STEP.plan = None
    assert group.fired == 1
    others = [0, 2, 3, 5]
    assert torch.equal(out[others], hidden[others])
    assert torch.equal(untouched, hidden)
    stream = hidden[[1, 4]] + residual[[1, 4]]
    expected = mars_step(
        stream,
        u=group.u,
        p_S=group.p_S,
        g=group.g,
        delta=group.delta,
        tau=group.tau,
        lam=group.lam,
        kappa=group.kappa,
        eta=group.eta,
        recenter_mode="none",
        apply_recentering_to_activation=False,
    )
    # the layer then adds the residual back: the stream it sees is the steered one
    torch.testing.assert_close(out[[1, 4]] + residual[[1, 4]], expected.h)
    torch.testing.assert_close(group.score, expected.score)
    assert bool((expected.strength > 0).any()), "the test plan must actually steer"


def test_a_shadow_group_is_scored_and_not_written():
    hidden = torch.randn(3, 8)
    group = _group([2], apply=False)
    op.STEP.plan = op.StepPlan(groups={2: [group]})
    try:
        out = torch.ops.mars_guardrail.steer(hidden, None, 2)
    finally:
        op.STEP.plan = None
    assert torch.equal(out, hidden) and out.data_ptr() != hidden.data_ptr()
    assert group.fired == 1 and group.score is not None


def test_a_row_outside_the_step_and_a_non_finite_step_fail_closed():
    op.STEP.plan = op.StepPlan(groups={2: [_group([9])]})
    try:
        with pytest.raises(SteeringError, match="outside"):
            torch.ops.mars_guardrail.steer(torch.randn(3, 8), None, 2)
        op.STEP.plan = op.StepPlan(groups={2: [_group([0])]})
        broken = torch.randn(3, 8)
        broken[0, 0] = float("nan")
        with pytest.raises(SteeringError, match="not finite"):
            torch.ops.mars_guardrail.steer(broken, None, 2)
    finally:
        op.STEP.plan = None


def test_a_step_whose_op_did_not_fire_is_refused():
    """What the worker checks after every forward pass: a compiled graph without the
    op (or one that skipped it) never returns tokens."""
    from vllm_mars_guardrail.worker import _Guard

    guard = _Guard(runner=None, policies={}, default={})
    guard.decisions["r1"] = {"mode": "enforce", "policy": "d", "shadows": {}}
    with pytest.raises(SteeringError, match="ran 0 times"):
        guard.record([("r1", "d", _group([0]), 0, "r1")])


def test_decoder_layers_come_from_the_adapters_vllm_path():
    from types import SimpleNamespace

    from torch import nn
    from vllm_mars_guardrail.worker import _decoder_layers

    class Llava(nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.language_model = nn.Module()
            self.language_model.model = nn.Module()
            self.language_model.model.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))

    text = SimpleNamespace(num_hidden_layers=3)
    llava = SimpleNamespace(model_type="llava")
    assert len(_decoder_layers(Llava(3), llava, text)) == 3
    with pytest.raises(SteeringError, match="holds 2 layers, the config says 3"):
        _decoder_layers(Llava(2), llava, text)
    with pytest.raises(SteeringError, match="has no model.layers"):
        _decoder_layers(Llava(3), SimpleNamespace(model_type="llama"), text)
    with pytest.raises(SteeringError, match="no vLLM layer path"):
        _decoder_layers(Llava(3), SimpleNamespace(model_type="mamba"), text)
