"""gmn-debias: debias a trained PyTorch classifier with GroupMixNorm, and audit it.

The public API: the layer and its injection (``GroupMixNorm``, ``attach``,
``candidate_layers``), the fairness metrics (``audit_arrays``, ``FairnessAccumulator`` and
the fairlearn-named functions), checkpoint I/O (``load_model``, ``save_model``) and the
``fit`` pipeline (``FitConfig``, ``run_fit``).
"""

__version__ = "0.1.0"

from .checkpoint import LoadedModel, load_model, save_model
from .errors import UserError
from .fit import FitConfig, run_fit
from .hooks import GMNHandle, LayerInfo, attach, candidate_layers
from .layer import GroupMixNorm
from .metrics import (
    FairnessAccumulator,
    audit_arrays,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equalized_odds_difference,
    equalized_odds_ratio,
)
from .schema import FeatureSchema

__all__ = [
    "FairnessAccumulator",
    "FeatureSchema",
    "FitConfig",
    "GMNHandle",
    "GroupMixNorm",
    "LayerInfo",
    "LoadedModel",
    "UserError",
    "attach",
    "audit_arrays",
    "candidate_layers",
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equal_opportunity_difference",
    "equalized_odds_difference",
    "equalized_odds_ratio",
    "load_model",
    "run_fit",
    "save_model",
]
