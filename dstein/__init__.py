"""dstein: physics-informed neural networks trained with Stein derivative estimators."""

from dstein import models, pdes
from dstein.estimators import METHODS, Derivatives, estimate

__version__ = "0.1.0"

__all__ = ["METHODS", "Derivatives", "__version__", "estimate", "models", "pdes"]
