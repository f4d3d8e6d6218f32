"""sparsity_lib: pruning and growth of neural networks, the library of the executable book
*Sparsity in Deep Learning* (after Hoefler et al., JMLR 2021, and Gale et al., 2019).

Every method is a combination of the same parts: **score** (how important is each weight?), **select**
(which to remove: scope, budget, structure), **mask** (parametrizations that keep pruned weights at zero),
**schedule** (when and how much), **train** (a small explicit loop). Quick start::

    import sparsity_lib as sl
    masks = sl.prune(model, 0.9, method="magnitude", scope="global")
    print(sl.sparsity(model), sl.sparsity_report(model))
    sl.remove_masks(model)   # make it permanent, dense state_dict keys again
    sl.catalogue()           # every method of the library: kind, survey section, chapter, options

What lives where, one concept per file, in pipeline order:

=====================  ===========================================================================================
``masks``              masks as parametrizations; any parametrization with ``hard_mask()`` is a mask (learned
                       supermasks, gates); reading, attaching, removing; foreign transforms and tied weights refused
``mask_property``      the masked weight's property: a fast getter (``original * mask``), ``functional_call``
                       by the dense name
``mask_growth``        masks that change during training: dense gradients, ``replace_masks`` (revival),
                       optimizer-state reset (re-exported by ``masks``)
``select``             scores -> masks: top-k, global / layer-wise scopes, neurons, blocks, N:M, ``drop_and_grow``
``budgets``            per-layer sparsities: uniform, Erdos-Renyi, ERK
``scores/``            one-shot scores by family: magnitude/random, activations, first order, at initialization
``curvature``          Hessians and Fisher matrices by autodiff (second order, survey 3.5)
``obs``                OBD, OBS (plain and batched greedy), WoodFisher
``layerwise``          layer-wise reconstruction: OBC, SparseGPT, Wanda
``pruning``            ``sl.prune``: validate, score, select, mask (and agree on one mask across processes)
``distributed``        pruning inside a process group: broadcast or all-reduce, divergence checks
``schedules``          when and how much: one-shot, iterative, gradual (Zhu & Gupta), IHT / DSD
``growth``             dynamic sparse training: SET, DeepR, SNFS, RigL, DSR, Top-KAST
``growth_runs``        chapter 09's runs: DST vs static masks vs gradual pruning at equal steps, training cost
``regularize``         L1, group lasso, Hoyer-square, proximal steps; L0 hard-concrete gates; sparse VD
``ephemeral``          ephemeral sparsity: activation sparsity and penalties, DropConnect / targeted dropout,
                       top-k / random-k gradient compression with error feedback, meProp
``moe``                conditional computation: a top-k (Switch for k = 1) mixture-of-experts layer
``ephemeral_runs``     chapter 11's runs (compressed training, activation penalties, dropout, MoE)
``lottery``            rewinding, IMP, controls, edge-popup supermasks
``structure``          coupled channel groups (residual adds, concatenation), channel scores, ``compact`` into a
                       smaller dense CNN
``attention``          sparse attention patterns (window, strided, Longformer, BigBird, top-k), head importance,
                       head pruning and ``compact_heads``
``catalogue``          the one explicit list of every method (``sl.catalogue()``); ``sl.prune`` reads it
``experiments``        the runner: recipe x sparsities x seeds -> records (one-shot, gradual, IMP, at-init, ...)
``benchmark``          chapter 14: every method on one task, model and budget, several seeds (resumable CSV)
``claims``             claim cells: check a literature claim, print its numbers, record it for "What held"
``compare``            mask overlap (IoU, agreement), what a method would prune
``formats``            storage costs of sparse formats (closed forms and exact counts)
``export``, ``speed``  real sparse inference with ``torch.sparse``; timing, roofline, speed-up tables
``plumbing``           shared mechanics: calibration batches, eval mode, input capture (attention in plain
                       operations), conv unfolding, checks
``data``, ``models``   offline data sets and the book's models
``train``              the explicit training loop with callbacks
``viz``, ``widgets``   figures, source display, live explorers
``handson``            the "your turn" checks of the chapters (``student``, not imported: ``make student``)
``config``             seeds, threads, FAST / FULL scale
``bench/``             timing tables of ``make bench`` (masked steps, layer-wise solvers, DST steps)
=====================  ===========================================================================================
"""

from . import budgets, config, schedules, scores, select
from .masks import apply_masks, get_masks, prunable, remove_masks, set_weights, sparsity, sparsity_report
from .masks import dense_gradients, replace_masks, reset_optimizer_state, track_dense_gradients, trainable
from .pruning import prune
from . import attention, benchmark, catalogue, claims, compare, curvature, data, distributed, ephemeral, ephemeral_runs, experiments, export, formats, growth, growth_runs, handson, layerwise, lottery, models, moe, obs, plumbing, regularize, speed, structure, train, viz, widgets  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "prunable", "prune", "apply_masks", "get_masks", "remove_masks", "set_weights", "sparsity", "sparsity_report",
    "dense_gradients", "replace_masks", "reset_optimizer_state", "track_dense_gradients", "trainable", "attention",
    "benchmark", "budgets", "catalogue", "claims", "compare", "config", "curvature", "data", "distributed", "ephemeral",
    "ephemeral_runs", "experiments", "export", "formats", "growth", "growth_runs", "handson", "layerwise", "lottery",
    "models", "moe", "obs", "plumbing", "regularize", "schedules", "scores", "select", "speed", "structure", "train",
    "viz", "widgets",
]
