"""parashield: robustness of neural-network parameters.

Corruptions inside a budget, loss change indicators, and adversarial parameter defense (APD),
after Sun et al. (AAAI 2021) and Zhang et al. (Neural Networks 2021).
"""

from .bitflip import BitFlipResult, FlipBudget, ProgressiveBitSearch, RandomBitFlip
from ._progress import set_progress
from .budget import Budget, Geometry
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .corruption import (
    CorruptionResult,
    GradientCorruption,
    MultiStepCorruption,
    RandomCorruption,
    RandomCorruptionResult,
    corrupted,
    make_corruption,
)
from .curvature import (
    Eigenpairs,
    SpectralDensity,
    TraceEstimate,
    hessian_density,
    hessian_eigenpairs,
    hessian_trace_estimate,
)
from .defense import APD, SAM, NonFiniteGradientError, OneStepDefense, RandomWeightPerturbation
from .indicators import (
    LayerVulnerability,
    critical_eps,
    hessian_top_eigenvalue,
    hessian_trace,
    layer_vulnerability,
    loss_change,
)
from .evaluation import AutoPGDCorruption, EpsEvaluation, RobustnessEvaluation, evaluate_robustness
from .landscape import corruption_direction, loss_line, loss_surface, random_direction
from .margin import dlr_loss
from .objective import NonFiniteLossError, Objective
from .quantization import Int8Quantization, quantize_
from .sam_family import ASAM, GSAM, IntervalSAM, weight_tensors
from .selection import select_parameters

__version__ = "0.1.0"

__all__ = [
    "APD",
    "ASAM",
    "GSAM",
    "IntervalSAM",
    "weight_tensors",
    "AutoPGDCorruption",
    "Eigenpairs",
    "SpectralDensity",
    "TraceEstimate",
    "hessian_density",
    "hessian_eigenpairs",
    "hessian_trace_estimate",
    "EpsEvaluation",
    "RobustnessEvaluation",
    "dlr_loss",
    "evaluate_robustness",
    "SAM",
    "NonFiniteGradientError",
    "OneStepDefense",
    "RandomWeightPerturbation",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "BitFlipResult",
    "Budget",
    "CorruptionResult",
    "FlipBudget",
    "Geometry",
    "GradientCorruption",
    "Int8Quantization",
    "LayerVulnerability",
    "MultiStepCorruption",
    "NonFiniteLossError",
    "Objective",
    "ProgressiveBitSearch",
    "RandomBitFlip",
    "RandomCorruption",
    "RandomCorruptionResult",
    "corrupted",
    "corruption_direction",
    "critical_eps",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "layer_vulnerability",
    "loss_change",
    "loss_line",
    "loss_surface",
    "make_corruption",
    "quantize_",
    "random_direction",
    "select_parameters",
    "set_progress",
]
