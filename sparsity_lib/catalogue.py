"""The catalogue: every method of the library, listed once, here.

``sl.catalogue()`` (this module is callable: it calls :func:`catalogue`) is the table of all of them (name, kind, survey section, chapter, options, whether it needs
data, where it lives); ``sl.prune``'s method names, :data:`sparsity_lib.budgets.BUDGETS` and
:data:`sparsity_lib.schedules.SCHEDULES` are read from this list. Registration is explicit: a method exists for
the library because it has one line in :data:`ENTRIES` below, not because some module was imported. Each line
names its implementation by a lazy ``"module:attribute"`` string, resolved (imported) only when the method is
used or the catalogue is shown, so this module imports nothing of the library and there is no import cycle.

The kinds (:data:`KINDS`), in pipeline order:

========== ================================================================================================
kind       what it is and how it is used
========== ================================================================================================
score      one-shot score, higher = keep: ``sl.prune(model, s, method=name)``
pruner     one-shot pruner with its own selection rule, updating the surviving weights where
           ``updates_weights``: ``sl.prune(model, s, method=name)``
budget     per-layer sparsities: ``sl.prune(model, s, scope=sl.budgets.BUDGETS[name](model, s))``
schedule   when and how much to prune while training: ``sl.schedules.SCHEDULES[name](model, ...)``
growth     dynamic sparse training, drop and grow at constant sparsity (``sl.growth``, Chapter 09)
regularizer a penalty or learned gate that drives weights to zero while training (``sl.regularize``, Chapter 07)
procedure  a training procedure that finds a mask: IMP, retraining strategies, edge-popup (they train, so they
           are not ``sl.prune`` methods; :mod:`sparsity_lib.experiments` runs them as recipes)
========== ================================================================================================

**Adding a method** is one line in :data:`ENTRIES`, in its kind's section, e.g. for a growth rule and a
regularizer::

    Entry("rigl", "growth", "sparsity_lib.growth:RigL", "§4.2", 9, needs_data=True, cite="evci2020rigging",
          description="drop smallest |w|, grow largest dense |grad|"),
    Entry("l1", "regularizer", "sparsity_lib.regularize:L1", "§3.6", 7, needs_data=True, description="..."),

An entry whose *module* does not exist yet (a chapter still being written) is kept but not shown
(``sl.catalogue(include_missing=True)`` shows it, with ``available`` False); a missing *attribute* of an existing
module is an error, so a renamed function cannot silently drop out of the book. Chapter 09's growth rules and
Chapter 07's regularizers are listed below. User code that
defines its own score or pruner registers it with :func:`sparsity_lib.scores.register` /
:func:`~sparsity_lib.scores.register_pruner`; ``sl.catalogue()`` lists those too (``builtin`` False).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional

KINDS = {
    "score": "one-shot score, higher = keep: sl.prune(model, s, method=name)",
    "pruner": "one-shot pruner with its own selection (and weight update, where updates_weights): sl.prune(..., method=name)",
    "budget": "per-layer sparsities: sl.prune(model, s, scope=sl.budgets.BUDGETS[name](model, s))",
    "schedule": "when and how much to prune while training: sl.schedules.SCHEDULES[name](model, ...)",
    "growth": "dynamic sparse training: drop and grow at constant sparsity (sl.growth)",
    "regularizer": "a penalty or learned gate that drives weights to zero while training (sl.regularize)",
    "procedure": "a training procedure that finds a mask (run as a recipe by sl.experiments)",
}
#: the kinds that ``sl.prune(method=...)`` accepts
PRUNE_KINDS = ("score", "pruner")
#: arguments that are the method's inputs, not options
_INPUTS = ("self", "model", "plan", "data", "loss_fn")


@dataclass(frozen=True)
class Entry:
    """One method of the library: ``target`` is ``"module:attribute"``, imported only by :meth:`resolve`."""

    name: str
    kind: str
    target: str
    section: str
    chapter: Optional[int]
    needs_data: bool = False
    updates_weights: bool = False
    description: str = ""
    cite: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r} (entry {self.name!r})")
        if not isinstance(self.name, str) or not self.name or self.name != self.name.lower():
            raise ValueError(f"method names are short lowercase strings, got {self.name!r}")
        if self.target.count(":") != 1:
            raise ValueError(f"target must be 'module:attribute', got {self.target!r} (entry {self.name!r})")

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    @property
    def attribute(self) -> str:
        return self.target.split(":")[1]

    @property
    def available(self) -> bool:
        """False when the entry's module does not exist (yet); any other import error is raised."""
        try:
            importlib.import_module(self.module)
        except ModuleNotFoundError as error:
            if error.name == self.module:
                return False
            raise
        return True

    def resolve(self):
        """The function or class itself (imports its module). A missing attribute raises ``AttributeError``."""
        module = importlib.import_module(self.module)
        try:
            return getattr(module, self.attribute)
        except AttributeError:
            raise AttributeError(f"catalogue entry {self.name!r} points at {self.target!r}, which does not exist: "
                                 f"fix its line in sparsity_lib/catalogue.py") from None

    def options(self) -> Dict[str, Any]:
        """``{option: default}``: the parameters of the signature that have a default (``"(required)"`` for a
        keyword-only one without), except the inputs ``model``, ``plan``, ``data``, ``loss_fn``."""
        return signature_options(self.resolve())

    def record(self) -> Dict[str, Any]:
        """The row of :func:`catalogue`."""
        available = self.available
        return {"name": self.name, "kind": self.kind, "section": self.section, "chapter": self.chapter,
                "needs_data": self.needs_data, "updates_weights": self.updates_weights,
                "options": self.options() if available else None, "description": self.description,
                "cite": self.cite, "where": self.target, "builtin": True, "available": available}


def _forwarded(init, varkw: str):
    """How ``init`` calls ``super().__init__``: ``(number of positional arguments, explicit keyword names)`` when
    it passes its ``**varkw`` on, else ``None``."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
                and node.func.value.func.id == "super"):
            if any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == varkw for k in node.keywords):
                return len(node.args), {k.arg for k in node.keywords if k.arg is not None}
    return None


def signature_options(fn) -> Dict[str, Any]:
    """``{option: default}`` of a function or a class (its ``__init__``), as :meth:`Entry.options`. For a class
    whose ``__init__`` passes its ``**kwargs`` on to ``super().__init__``, the base class's options are included
    (except those the call sets itself)."""
    out: Dict[str, Any] = {}
    if not inspect.isclass(fn):
        chain = [(inspect.signature(fn), 0, set())]
    else:
        chain, skip_pos, skip_kw = [], 0, set()
        for cls in fn.__mro__:
            if cls is object or "__init__" not in vars(cls):
                continue
            init = vars(cls)["__init__"]
            signature = inspect.signature(init)
            chain.append((signature, skip_pos, skip_kw))
            varkw = [n for n, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD]
            forwarded = _forwarded(init, varkw[0]) if varkw else None
            if forwarded is None:
                break
            skip_pos, skip_kw = forwarded
    for signature, skip_pos, skip_kw in chain:
        params = [(n, p) for n, p in signature.parameters.items() if n != "self"]
        for i, (name, p) in enumerate(params):
            if (i < skip_pos and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)) or name in skip_kw:
                continue
            if name in _INPUTS or name in out or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is not p.empty or p.kind == p.KEYWORD_ONLY:
                out[name] = "(required)" if p.default is p.empty else p.default
    return out


E = Entry
#: Every method of the library, in the order of the book. One line per method (see the module docstring).
ENTRIES = (
    # ------------------------------------------------------------ one-shot scores: sl.prune(method=name)
    E("magnitude", "score", "sparsity_lib.scores:magnitude", "§3.2", 1, cite="han2015learning",
      description="|w|: keep the largest weights"),
    E("random", "score", "sparsity_lib.scores:random", "§3.1", 1,
      description="uniform random scores: the baseline every criterion must beat"),
    E("apoz", "score", "sparsity_lib.scores.activations:apoz", "§3.3", 5, needs_data=True, cite="hu2016network",
      description="1 - APoZ: keep neurons that are rarely zero"),
    E("mean_activation", "score", "sparsity_lib.scores.activations:mean_activation", "§3.3", 5, needs_data=True,
      description="mean |activation| of each neuron (energy, DropNet)"),
    E("output_sensitivity", "score", "sparsity_lib.scores.activations:output_sensitivity", "§3.3", 5,
      needs_data=True, description="RMS sensitivity of the network output to each neuron"),
    E("taylor", "score", "sparsity_lib.scores.first_order:taylor", "§3.4", 5, needs_data=True,
      cite="molchanov2019importance", description="(g*w)^2 averaged over batches"),
    E("taylor_neuron", "score", "sparsity_lib.scores.first_order:taylor_neuron", "§3.4", 5, needs_data=True,
      cite="molchanov2019importance",
      description="neuron Taylor (sum_row g*w + g_b*b)^2, broadcast to the row: use structure='neuron'"),
    E("movement", "score", "sparsity_lib.scores.first_order:movement", "§3.4", 5, cite="sanh2020movement",
      description="-sum_t g*w accumulated during fine-tuning by a MovementScore"),
    E("snip", "score", "sparsity_lib.scores.at_init:snip", "§2.4.3", 8, needs_data=True, cite="lee2019snip",
      description="connection sensitivity |g*w| on one batch"),
    E("grasp", "score", "sparsity_lib.scores.at_init:grasp", "§2.4.3", 8, needs_data=True, cite="wang2020picking",
      description="gradient signal preservation: keep by w*Hg"),
    E("obd", "score", "sparsity_lib.obs:obd", "§3.5.1", 6, needs_data=True, cite="lecun1990optimal",
      description="Optimal Brain Damage: 1/2 H_qq w_q^2, exact Hessian diagonal"),
    E("l1_filter", "score", "sparsity_lib.structure:l1_filter", "§6.1", 12, cite="li2017pruning",
      description="L1 norm of each filter / row, broadcast to it: use structure='neuron' or prune_channels"),
    E("bn_scale", "score", "sparsity_lib.structure:bn_scale", "§6.1", 12, cite="liu2017learning",
      description="|gamma| of the batch norm after each channel (network slimming); +inf without BN"),
    E("taylor_channel", "score", "sparsity_lib.structure:taylor_channel", "§6.1", 12, needs_data=True,
      cite="molchanov2019importance", description="(sum over the channel of g*w)^2: first-order channel removal cost"),
    E("head_importance", "score", "sparsity_lib.attention:head_importance_scores", "§6.2.1", 12, needs_data=True,
      cite="michel2019sixteen", description="E|dL/d xi_h| of each head's gate on its q/k/v rows; +inf elsewhere"),
    # ------------------------------------------ one-shot pruners (own selection, maybe weight updates)
    E("synflow", "pruner", "sparsity_lib.scores.at_init:synflow_pruner", "§2.4.3", 8, cite="tanaka2020pruning",
      description="iterative synaptic flow, data-free"),
    E("wanda", "pruner", "sparsity_lib.layerwise:wanda_pruner", "§3.3", 5, needs_data=True, cite="sun2023simple",
      description="|W|*||X_j||, pruned within each output row"),
    E("obs", "pruner", "sparsity_lib.obs:obs_pruner", "§3.5.1", 6, needs_data=True, updates_weights=True,
      cite="hassibi1993second",
      description="Optimal Brain Surgeon: exact damped loss Hessian, greedy removal with updates"),
    E("woodfisher", "pruner", "sparsity_lib.obs:woodfisher_pruner", "§3.5.5", 6, needs_data=True,
      updates_weights=True, cite="singh2020woodfisher",
      description="WoodFisher: block-diagonal empirical Fisher, Woodbury inverse, OBS per block"),
    E("obc", "pruner", "sparsity_lib.layerwise:obc_pruner", "§3.5.5", 6, needs_data=True, updates_weights=True,
      cite="frantar2022optimal", description="Optimal Brain Compression: exact greedy OBS per output row of each layer"),
    E("sparsegpt", "pruner", "sparsity_lib.layerwise:sparsegpt_pruner", "§3.5.5", 6, needs_data=True,
      updates_weights=True, cite="frantar2023sparsegpt",
      description="SparseGPT: column-wise layer-wise OBS with a Cholesky factor and lazy updates"),
    # -------------------------------------------------------- per-layer budgets: scope=BUDGETS[name](model, s)
    E("uniform", "budget", "sparsity_lib.budgets:uniform", "§3.9", 4, description="every layer at the same sparsity"),
    E("er", "budget", "sparsity_lib.budgets:erdos_renyi", "§3.9", 4, cite="mocanu2018scalable",
      description="Erdős–Rényi: density proportional to (n_in + n_out) / (n_in * n_out)"),
    E("erk", "budget", "sparsity_lib.budgets:erk", "§3.9", 4, cite="evci2020rigging",
      description="Erdős–Rényi-Kernel: ER with the kernel dimensions of convolutions"),
    # --------------------------------------------------------------- schedules: SCHEDULES[name](model, ...)
    E("one-shot", "schedule", "sparsity_lib.schedules:OneShot", "§2.4.1", 2,
      description="prune once after `at` steps, then train on sparse"),
    E("iterative", "schedule", "sparsity_lib.schedules:IterativePruner", "§2.4.2", 2, cite="han2015learning",
      description="prune-retrain cycles to a growing target"),
    E("gradual", "schedule", "sparsity_lib.schedules:GradualPruner", "§2.4.2", 2, cite="zhu2017prune",
      description="Zhu & Gupta's polynomial schedule, a cut every `frequency` steps"),
    E("iht", "schedule", "sparsity_lib.schedules:IHT", "§2.4.2", 2,
      description="iterative hard thresholding: alternate sparse and dense phases"),
    E("dsd", "schedule", "sparsity_lib.schedules:DSD", "§2.4.2", 2, cite="han2017dsd",
      description="dense-sparse-dense training"),
    # ---------------------------------------------- growth rules: dynamic sparse training (Chapter 09, §4)
    E("static", "growth", "sparsity_lib.growth:Static", "§2.4.3", 9,
      description="the baseline: a random sparse mask, never updated"),
    E("set", "growth", "sparsity_lib.growth:SET", "§4.1", 9, cite="mocanu2018scalable",
      description="drop the smallest |w|, grow at random"),
    E("deepr", "growth", "sparsity_lib.growth:DeepR", "§4.1", 9, cite="bellec2018deep",
      description="fixed signs, noisy updates; connections whose value crosses zero are replaced at random"),
    E("dsr", "growth", "sparsity_lib.growth:DSR", "§4.1", 9, cite="mostafa2019parameter",
      description="adaptive global magnitude threshold, regrowth redistributed by survivors"),
    E("snfs", "growth", "sparsity_lib.growth:SNFS", "§4.2", 9, needs_data=True, cite="dettmers2019sparse",
      description="grow by the momentum of the dense gradient, redistribute across layers"),
    E("rigl", "growth", "sparsity_lib.growth:RigL", "§4.2", 9, needs_data=True, cite="evci2020rigging",
      description="drop the smallest |w|, grow the largest dense |dL/dw|"),
    E("topkast", "growth", "sparsity_lib.growth:TopKAST", "§4.2", 9, cite="jayakumar2020top",
      description="top-k forward set, larger backward set"),
    # ------------------------------------------------- regularizers (Chapter 07, §3.6-3.8): one line each
    E("l1", "regularizer", "sparsity_lib.regularize:l1", "§3.6.1", 7, cite="tibshirani1996regression",
      description="penalty sum |w|; exact zeros only with the proximal step (soft threshold)"),
    E("group_lasso", "regularizer", "sparsity_lib.regularize:group_lasso", "§3.6.3", 7, cite="wen2016learning",
      description="penalty sum_g sqrt(n_g) ||w_g||_2 over output rows / channels: removes whole neurons"),
    E("hoyer_square", "regularizer", "sparsity_lib.regularize:hoyer_square", "§3.6.1", 7,
      cite="yang2020deephoyer", description="scale-invariant penalty (sum |w|)^2 / sum w^2"),
    E("proximal", "regularizer", "sparsity_lib.regularize:Proximal", "§3.6.1", 7, cite="tibshirani1996regression",
      description="training callback: soft-threshold (or group soft-threshold) after each optimizer step"),
    E("l0", "regularizer", "sparsity_lib.regularize:add_l0_gates", "§3.6.2", 7, cite="louizos2018learning",
      description="hard-concrete L0 gates (per weight or per neuron), expected-L0 penalty l0_penalty"),
    E("variational_dropout", "regularizer", "sparsity_lib.regularize:add_variational_dropout", "§3.7", 7,
      cite="molchanov2017variational", description="sparse variational dropout: learned log alpha, KL penalty, "
      "weights with log alpha >= 3 removed by finalize"),
    # ------------------------------------------------------- procedures: they train (recipes of experiments)
    E("prune_neurons_iteratively", "procedure", "sparsity_lib.scores.activations:prune_neurons_iteratively",
      "§3.3", 5, needs_data=True, description="remove neurons a few at a time, re-scoring after each step"),
    E("imp", "procedure", "sparsity_lib.lottery:imp", "§8.3", 10, cite="frankle2019lottery",
      description="iterative magnitude pruning: train, prune a fraction, rewind to theta_0 or theta_k, repeat"),
    E("retrain", "procedure", "sparsity_lib.lottery:retrain", "§8.3", 10, cite="renda2020comparing",
      description="fine-tuning, weight rewinding or learning-rate rewinding after pruning"),
    E("edge_popup", "procedure", "sparsity_lib.lottery:edge_popup", "§8.3.1", 10, needs_data=True,
      cite="ramanujan2020whats", description="learn a supermask over frozen random weights (top-k of scores)"),
)
del E


def _check_unique(entries) -> None:
    seen = {}
    prune_names = set()
    for entry in entries:
        key = (entry.kind, entry.name)
        if key in seen:
            raise ValueError(f"catalogue: {entry.kind} {entry.name!r} is listed twice")
        seen[key] = entry
        if entry.kind in PRUNE_KINDS:
            if entry.name in prune_names:
                raise ValueError(f"catalogue: method {entry.name!r} is listed twice")
            prune_names.add(entry.name)


_check_unique(ENTRIES)


def entries(kind: Optional[str] = None, include_missing: bool = False) -> List[Entry]:
    """The :data:`ENTRIES` of one ``kind`` (all by default), without those whose module does not exist unless
    ``include_missing``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)} or None, got {kind!r}")
    return [e for e in ENTRIES if (kind is None or e.kind == kind) and (include_missing or e.available)]


def entry(name: str, kind: Optional[str] = None) -> Entry:
    """The entry called ``name`` (of ``kind``, when names of different kinds coincide)."""
    found = [e for e in ENTRIES if e.name == name and (kind is None or e.kind == kind)]
    if not found:
        known = sorted({e.name for e in ENTRIES if kind is None or e.kind == kind})
        raise ValueError(f"name must be one of {known}, got {name!r}")
    if len(found) > 1:
        raise ValueError(f"{name!r} names several entries ({[e.kind for e in found]}): pass kind=")
    return found[0]


class Table(Mapping):
    """A read-only ``{name: function or class}`` view of one kind of the catalogue, resolved on access (what
    :data:`sparsity_lib.budgets.BUDGETS` and :data:`sparsity_lib.schedules.SCHEDULES` are)."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        self.kind = kind

    def _names(self) -> List[str]:
        return [e.name for e in ENTRIES if e.kind == self.kind]

    def __getitem__(self, name):
        for e in ENTRIES:
            if e.kind == self.kind and e.name == name:
                return e.resolve()
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return f"catalogue.Table({self.kind!r}: {self._names()})"


def table(kind: str) -> Table:
    """``{name: function or class}`` of one kind, resolved lazily (see :class:`Table`)."""
    return Table(kind)


def records(kind: Optional[str] = None, include_missing: bool = False) -> List[Dict[str, Any]]:
    """:func:`catalogue` as a list of dicts (no pandas needed)."""
    rows = [e.record() for e in entries(kind, include_missing)]
    if kind is None or kind in PRUNE_KINDS:
        from . import scores  # user-registered scores and pruners (sl.scores.register)

        for method in scores.user_methods():
            if kind is None or method.kind == kind:
                fn = method.score or method.pruner
                rows.append({"name": method.name, "kind": method.kind, "section": "", "chapter": None,
                             "needs_data": method.needs_data, "updates_weights": None,
                             "options": signature_options(fn), "description": method.description, "cite": "",
                             "where": f"{fn.__module__}:{fn.__qualname__}", "builtin": False, "available": True})
    return rows


def catalogue(kind: Optional[str] = None, include_missing: bool = False, as_frame: bool = True):
    """Every method of the library: one row per method with ``name``, ``kind`` (:data:`KINDS`), survey
    ``section``, ``chapter``, ``needs_data``, ``updates_weights``, ``options`` (``{option: default}`` from the
    signature), ``description``, ``cite`` (BibTeX key), ``where`` (``"module:attribute"``), ``builtin`` (False
    for methods registered by user code) and ``available``.

    ``kind`` keeps one kind; ``include_missing`` also lists entries whose module does not exist yet. Returns a
    pandas ``DataFrame`` (``as_frame=False``, or without pandas: the list of dicts).

    Example::

        >>> cat = sl.catalogue()
        >>> cat[cat.kind == "pruner"][["name", "section", "updates_weights"]]
        >>> sl.catalogue("budget", as_frame=False)[0]["name"]
        'uniform'
    """
    rows = records(kind, include_missing)
    if not as_frame:
        return rows
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency of the book
        return rows
    return pd.DataFrame(rows, columns=list(rows[0]) if rows else None)


class _CallableModule(types.ModuleType):
    """This module, callable: ``sl.catalogue()`` is :func:`catalogue`, and ``sl.catalogue.ENTRIES``,
    ``sl.catalogue.entry(...)`` the rest of the module."""

    def __call__(self, kind: Optional[str] = None, include_missing: bool = False, as_frame: bool = True):
        return catalogue(kind, include_missing, as_frame)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["KINDS", "PRUNE_KINDS", "Entry", "ENTRIES", "entries", "entry", "table", "Table", "records", "catalogue",
           "signature_options"]
