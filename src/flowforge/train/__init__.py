"""Training loops and objectives."""

from flowforge.train.fit import fit_maximum_likelihood

__all__ = ["fit_maximum_likelihood"]
