"""Timing scripts of sparsity_lib: tables printed by ``python -m sparsity_lib.bench`` (``make bench``), never tests.

* :mod:`sparsity_lib.bench.masked_steps`: the cost of a mask in a training step (dense / parametrization /
  ``torch.nn.utils.prune`` hooks) and the run time of every chapter;
* :mod:`sparsity_lib.bench.chapters`: executes chapters one at a time and prints runtime and outcome (``make full``
  runs every chapter at FULL scale with it);
* :mod:`sparsity_lib.bench.layerwise`: the layer-wise second-order solvers (OBC, SparseGPT, magnitude) on one
  layer: seconds and reconstruction error.

Each module runs on its own (``python -m sparsity_lib.bench.layerwise --naive``). The name "benchmark" is kept
free for the all-methods comparison of the book.
"""
