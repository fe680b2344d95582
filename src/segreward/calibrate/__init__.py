"""Reward-optimal class offsets: calibrate a model on the task reward, exactly.

One additive logit offset per class, ``argmax_k (z_k + b_k)``, chosen to maximise a
dataset-level count reward (``miou``, ``weighted_miou``, ``dice``, ``pixel_accuracy``, weighted
sums) of a labelled set, then folded into the model's last bias so inference needs nothing new.
"""

from segreward.calibrate.exact import Calibration, PixelSet, pixel_set
from segreward.calibrate.fit import fit_offsets
from segreward.calibrate.stream import fit_offsets_streaming

__all__ = ["Calibration", "PixelSet", "fit_offsets", "fit_offsets_streaming", "pixel_set"]
