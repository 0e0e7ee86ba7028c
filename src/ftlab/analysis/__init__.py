"""Where a fine-tune lives: intruder dimensions, tuning contribution (TuCo) and per-layer weight change."""

from ftlab.analysis.intruders import compare_intruders, intruder_dimensions
from ftlab.analysis.layers import layer_change
from ftlab.analysis.tuco import tuning_contribution

__all__ = ["compare_intruders", "intruder_dimensions", "layer_change", "tuning_contribution"]
