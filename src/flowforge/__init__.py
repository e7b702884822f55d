"""flowforge: flow-based generative models and the robot policies built on them.

>>> import torch, flowforge
>>> flow = flowforge.flows.RealNVP(2, transforms=4)
>>> flow.sample(3).shape
torch.Size([3, 2])
"""

from importlib.metadata import PackageNotFoundError, version

from flowforge import distributions, flows, matching, nn, transforms, validation

try:
    __version__ = version("flowforge")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "distributions", "flows", "matching", "nn", "transforms", "validation"]
