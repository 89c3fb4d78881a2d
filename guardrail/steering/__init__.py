"""The method: the MARS rule as tensor math (:mod:`.rule`) and the per-request hooks
that apply it inside a model (:mod:`.hooks`). Tensors only: no bundles, no models.
"""

from guardrail.steering.hooks import (
    Action,
    LayerPlan,
    StopForward,
    install_dispatch,
    layer_actions,
    run_until,
    steering_hooks,
    stop_forward,
)
from guardrail.steering.rule import (
    RECENTER_ACTIVATION,
    RECENTER_MODES,
    RecenterMode,
    StepResult,
    first_positions,
    last_positions,
    mars_step,
    recenter,
    refusal_score,
    steering_strength,
    window_mean,
)

__all__ = [
    "RECENTER_ACTIVATION",
    "RECENTER_MODES",
    "Action",
    "LayerPlan",
    "RecenterMode",
    "StepResult",
    "StopForward",
    "first_positions",
    "install_dispatch",
    "last_positions",
    "layer_actions",
    "mars_step",
    "recenter",
    "refusal_score",
    "run_until",
    "steering_hooks",
    "steering_strength",
    "stop_forward",
    "window_mean",
]
