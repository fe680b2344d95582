"""Class pixel frequencies and class weights over annotation folders.

>>> from segreward.stats import class_frequencies, class_weights
>>> freq = class_frequencies("data/camvid/trainannot", dataset="camvid")   # doctest: +SKIP
>>> class_weights(freq.counts, "median_freq",
...               pixels_in_images_with_class=freq.pixels_in_images_with_class).weights   # doctest: +SKIP

The trainer reads weights with :func:`load_class_weights`.
"""

from segreward.stats.counting import (
    ClassFrequencies,
    LabelSpec,
    class_frequencies,
    find_label_files,
    load_frequencies,
    make_spec,
    map_values,
    value_counts,
)
from segreward.stats.report import frequency_table, plot_frequencies, save_frequencies, weights_table, write_csv
from segreward.stats.specs import parse_class_names, parse_label_map, parse_palette
from segreward.stats.weights import (
    WEIGHT_METHODS,
    ClassWeights,
    class_weights,
    load_class_weights,
    raw_weights,
    weights_from_frequencies,
)

__all__ = [
    "ClassFrequencies",
    "ClassWeights",
    "LabelSpec",
    "WEIGHT_METHODS",
    "class_frequencies",
    "class_weights",
    "find_label_files",
    "frequency_table",
    "load_class_weights",
    "load_frequencies",
    "make_spec",
    "map_values",
    "parse_class_names",
    "parse_label_map",
    "parse_palette",
    "plot_frequencies",
    "raw_weights",
    "save_frequencies",
    "value_counts",
    "weights_from_frequencies",
    "weights_table",
    "write_csv",
]
