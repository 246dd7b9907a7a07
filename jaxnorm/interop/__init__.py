"""Bridges between jaxnorm/Flax variable trees and other frameworks.

* :mod:`jaxnorm.interop.torch`: torch ``state_dict``/``nn.Module`` <-> Flax
  ``{'params': ..., 'batch_stats': ...}`` for normalization, convolution and linear
  layers, with the conventions (momentum, running variance, eps) converted too.

Submodules import their framework lazily, inside functions: ``import jaxnorm`` (and
``import jaxnorm.interop.torch``) never needs torch installed.
"""
