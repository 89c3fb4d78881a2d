"""Calibration: a policy bundle from text-only prompt sets and neutral media.

- :mod:`.calibrate` - collection of activations, layer sweep, gate and strength grid;
- :mod:`.neutral` - the neutral images and videos the re-centring means come from;
- :mod:`.typography` - text rendered as images, for measuring media requests;
- :mod:`.metrics` - AUROC, quantiles, Wilson intervals and gate shares;
- :mod:`.report` - the self-contained HTML calibration report.
"""

from guardrail.calibration.calibrate import CalibrationTargets, calibrate

__all__ = ["CalibrationTargets", "calibrate"]
