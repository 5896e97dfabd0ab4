"""Metrics: perplexity (and, later, QSUR)."""
from .perplexity import nll_sum, perplexity

__all__ = ["nll_sum", "perplexity"]
