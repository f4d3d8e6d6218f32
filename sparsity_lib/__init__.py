"""sparsity_lib: pruning and growth of neural networks, the library of the executable book
*Sparsity in Deep Learning* (after Hoefler et al., JMLR 2021, and Gale et al., 2019).

Every method is a combination of the same parts: **score** (how important is each weight?), **select**
(which to remove: scope, budget, structure), **mask** (parametrizations that keep pruned weights at zero),
**schedule** (when and how much), **train** (a small explicit loop). Quick start::

    import sparsity_lib as sl
    masks = sl.prune(model, 0.9, method="magnitude", scope="global")
    print(sl.sparsity(model), sl.sparsity_report(model))
    sl.remove_masks(model)   # make it permanent, dense state_dict keys again
"""

from . import budgets, config, schedules, scores, select
from .masks import apply_masks, get_masks, prunable, remove_masks, set_weights, sparsity, sparsity_report
from .pruning import prune
from . import compare, data, ephemeral, ephemeral_runs, formats, hessian, lottery, models, moe, train, viz, widgets  # noqa: E402  (register methods)

__version__ = "0.1.0"

__all__ = [
    "prunable", "prune", "apply_masks", "get_masks", "remove_masks", "set_weights", "sparsity", "sparsity_report",
    "budgets", "compare", "config", "data", "formats", "hessian", "lottery", "models", "schedules", "scores",
    "select", "train", "viz", "widgets",
]
