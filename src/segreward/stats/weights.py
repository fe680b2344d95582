"""Class weights from pixel counts, for a class-weighted loss or reward.

Notation: ``C_c`` pixels of class c, ``T = sum_c C_c``, ``f_c = C_c / T``, ``N`` classes.

* ``cvc`` (default): ``w_c = 1 / (C_c + s * T)`` with ``s`` = ``smooth``; ``s`` bounds the
  largest ratio between two weights by ``(1 + s) / s``.
* ``inv_freq``: ``w_c = 1 / f_c``.
* ``sqrt_inv_freq``: ``w_c = 1 / sqrt(f_c)``.
* ``median_freq`` (SegNet, Eigen & Fergus): ``w_c = median(g) / g_c`` where
  ``g_c = C_c / P_c`` and ``P_c`` is the number of counted pixels in the images where class c
  occurs; the median is over the classes that occur.
* ``effective_num`` (Cui et al., CVPR 2019): ``w_c = (1 - beta) / (1 - beta ** C_c)``. With pixel
  counts, ``beta`` must be very close to 1 (``1 / (1 - beta)`` of the order of the counts), or
  every class saturates and all weights come out equal (a warning says so).

Then, with ``normalize`` (the default), ``w = N * w / sum(w)``: the weights average 1, so the
loss keeps its scale. ``max_weight`` caps the final weights (no renormalisation afterwards,
so the cap holds exactly).

Classes with zero pixels (the formulas give infinity) are handled explicitly, with a warning
that names them: by default such a class gets the raw weight of the rarest class that does
occur (before normalisation, so it is as large as any weight); with ``zero_weight=V`` the
occurring classes are normalised among themselves (they average 1) and the zero-count classes
get exactly ``V`` (e.g. 0). Weights are never inf or NaN.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segreward.errors import SegrewardError

WEIGHT_METHODS = ("cvc", "inv_freq", "sqrt_inv_freq", "median_freq", "effective_num")
DEFAULT_SMOOTH = 0.1
DEFAULT_BETA = 0.9999


def raw_weights(counts: Sequence[int] | np.ndarray, method: str = "cvc", *, smooth: float = DEFAULT_SMOOTH,
                beta: float = DEFAULT_BETA, pixels_in_images_with_class: Sequence[int] | None = None) -> np.ndarray:
    """The formula of ``method`` for the classes with pixels; ``nan`` for classes without."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    total = counts.sum()
    out = np.full(counts.shape, np.nan)
    c = counts[present]
    if method == "cvc":
        if not smooth >= 0:
            raise SegrewardError(f"smooth must be >= 0, got {smooth}")
        out[present] = 1.0 / (c + smooth * total)
    elif method == "inv_freq":
        out[present] = total / c
    elif method == "sqrt_inv_freq":
        out[present] = np.sqrt(total / c)
    elif method == "median_freq":
        if pixels_in_images_with_class is None:
            raise SegrewardError("median_freq needs pixels_in_images_with_class (written by `segreward stats "
                                 "freq` into frequencies.json); recount, or choose another --method")
        pix = np.asarray(pixels_in_images_with_class, dtype=np.float64)
        if pix.shape != counts.shape or np.any(pix[present] <= 0):
            raise SegrewardError("median_freq: 'pixels_in_images_with_class' is missing or zero for classes that "
                                 "occur; recount with `segreward stats freq`, or choose another --method")
        g = c / pix[present]
        out[present] = np.median(g) / g
    elif method == "effective_num":
        if not 0 <= beta < 1:
            raise SegrewardError(f"beta must be in [0, 1), got {beta}")
        if beta == 0:
            out[present] = 1.0
        else:
            # 1 - beta**C computed as -expm1(C * log(beta)): exact even when beta is within 1e-12 of 1.
            out[present] = -math.expm1(math.log(beta)) / -np.expm1(c * math.log(beta))
    else:
        raise SegrewardError(f"unknown weighting method {method!r}; choose one of {', '.join(WEIGHT_METHODS)}")
    return out


@dataclass
class ClassWeights:
    """Weights per class and how they were made; ``warnings`` holds the messages also given
    through :mod:`warnings`."""

    weights: np.ndarray
    method: str
    params: dict[str, Any]
    class_names: list[str]
    zero_classes: list[int] = field(default_factory=list)
    capped_classes: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def mmseg_line(self, decimals: int = 4) -> str:
        """``class_weight=[...]``, ready to paste into an MMSegmentation ``CrossEntropyLoss``."""
        return "class_weight=[" + ", ".join(f"{w:.{decimals}f}" for w in self.weights) + "]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": [float(w) for w in self.weights],
            "class_names": list(self.class_names),
            "method": self.method,
            "params": self.params,
            "zero_count_classes": self.zero_classes,
            "capped_classes": self.capped_classes,
            "warnings": self.warnings,
            "mmseg": self.mmseg_line(),
        }

    def save(self, path: str | Path) -> Path:
        from segreward.outputs import atomic_write_text, check_output_file

        path = check_output_file(path, "--out")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def class_weights(
    counts: Sequence[int] | np.ndarray,
    method: str = "cvc",
    *,
    smooth: float = DEFAULT_SMOOTH,
    beta: float = DEFAULT_BETA,
    max_weight: float | None = None,
    zero_weight: float | None = None,
    normalize: bool = True,
    pixels_in_images_with_class: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> ClassWeights:
    """Class weights from pixel counts (see the module doc for the formulas and rules)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise SegrewardError(f"counts must be a non-empty list of non-negative pixel counts, got {counts.tolist()[:8]}")
    n = counts.size
    names = [str(s) for s in class_names] if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise SegrewardError(f"{len(names)} class names for {n} counts")
    if max_weight is not None and not max_weight > 0:
        raise SegrewardError(f"max_weight must be > 0, got {max_weight}")
    if zero_weight is not None and not (math.isfinite(zero_weight) and zero_weight >= 0):
        raise SegrewardError(f"zero_weight must be a finite number >= 0, got {zero_weight}")
    present = counts > 0
    if not present.any():
        raise SegrewardError("every class has zero pixels; nothing to weight (check the counts)")

    raw = raw_weights(counts, method, smooth=smooth, beta=beta,
                      pixels_in_images_with_class=pixels_in_images_with_class)
    notes: list[str] = []
    zero = np.flatnonzero(~present).tolist()
    if zero:
        listed = ", ".join(f"{i} ({names[i]})" for i in zero[:10]) + (" ..." if len(zero) > 10 else "")
        rule = (f"get weight {zero_weight:g}" if zero_weight is not None
                else "get the weight of the rarest class that occurs")
        notes.append(f"{len(zero)} class(es) have zero pixels and {rule}: {listed}")

    w = raw.copy()
    if zero_weight is None:
        w[~present] = raw[present].max()
        if normalize:
            w = n * w / w.sum()
    else:
        if normalize:
            w[present] = present.sum() * w[present] / w[present].sum()
        w[~present] = zero_weight

    if method == "effective_num" and beta > 0 and present.sum() > 1:
        r = raw[present]
        if r.max() <= r.min() * 1.01 and counts[present].max() > counts[present].min():
            suggestion = 1 - 1 / float(np.median(counts[present]))
            notes.append(f"effective_num with beta={beta}: every class has far more than 1/(1-beta) pixels, so all "
                         f"weights are (nearly) equal; use a beta closer to 1, e.g. --beta {suggestion:.10g} "
                         "(1 - 1/median count)")
    capped: list[int] = []
    if max_weight is not None:
        capped = np.flatnonzero(w > max_weight).tolist()
        w = np.minimum(w, max_weight)
    assert np.all(np.isfinite(w)), w
    params = {"smooth": smooth if method == "cvc" else None, "beta": beta if method == "effective_num" else None,
              "max_weight": max_weight, "zero_weight": zero_weight, "normalize": normalize}
    params = {k: v for k, v in params.items() if v is not None}
    for message in notes:
        warnings.warn(message, UserWarning, stacklevel=2)
    return ClassWeights(weights=w, method=method, params=params, class_names=names, zero_classes=zero,
                        capped_classes=capped, warnings=notes)


def weights_from_frequencies(freq: "ClassFrequencies | str | Path",  # noqa: F821
                             method: str = "cvc", **kwargs: Any) -> ClassWeights:
    """:func:`class_weights` from a :class:`~segreward.stats.ClassFrequencies` or its JSON file."""
    from segreward.stats.counting import ClassFrequencies, load_frequencies

    if not isinstance(freq, ClassFrequencies):
        freq = load_frequencies(freq)
    return class_weights(freq.counts, method, pixels_in_images_with_class=freq.pixels_in_images_with_class,
                         class_names=freq.class_names, **kwargs)


def load_class_weights(path: str | Path, num_classes: int | None = None) -> list[float]:
    """Class weights from ``weights.json`` (written by ``segreward stats weights``), from any JSON
    object with a ``weights`` or ``class_weight`` list, or from a plain JSON list of numbers.

    Raises :class:`SegrewardError` naming the file when it is missing, not JSON, holds no
    list of finite non-negative numbers, or has a length other than ``num_classes``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SegrewardError(f"{path}: class weights file not found; create it with "
                             "`segreward stats weights`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SegrewardError(f"{path}: not a readable JSON file ({e}); expected weights.json from "
                             "`segreward stats weights` or a JSON list of numbers") from None
    if isinstance(data, dict):
        key = next((k for k in ("weights", "class_weight") if k in data), None)
        if key is None:
            keys = ", ".join(sorted(data))[:200]
            raise SegrewardError(f"{path}: no 'weights' list in this JSON object (keys: {keys}); "
                                 "expected weights.json from `segreward stats weights` or a JSON list of numbers")
        data = data[key]
    if not isinstance(data, list) or not data:
        raise SegrewardError(f"{path}: expected a non-empty list of class weights, got {type(data).__name__}")
    bad = [(i, v) for i, v in enumerate(data)
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
    if bad:
        i, v = bad[0]
        raise SegrewardError(f"{path}: class weight {i} is {v!r}; every weight must be a finite number >= 0")
    if num_classes is not None and len(data) != num_classes:
        raise SegrewardError(f"{path}: {len(data)} class weights for a model with {num_classes} classes; "
                             "recompute them for this dataset")
    return [float(v) for v in data]
