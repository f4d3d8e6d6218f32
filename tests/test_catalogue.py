"""The catalogue: one explicit list of every method, read by sl.prune, BUDGETS, SCHEDULES and sl.catalogue().

Oracles: each entry's implementation (imported independently with importlib) and its signature; the BibTeX file
for the citation keys; sl.prune's own validation for needs_data.
"""

import importlib
import inspect
import pathlib
import re

import pytest
import torch

import sparsity_lib as sl
from sparsity_lib import catalogue as cat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_available_entry_resolves_to_its_target_and_reports_its_options():
    for entry in cat.entries():
        module, attribute = entry.target.split(":")
        fn = getattr(importlib.import_module(module), attribute)
        assert entry.resolve() is fn
        params = {}
        for f in ([c.__init__ for c in fn.__mro__[::-1] if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]):
            params.update(inspect.signature(f).parameters)  # a subclass's own parameters win
        options = entry.options()
        assert set(options) <= set(params) and not set(options) & {"model", "plan", "data", "loss_fn"}
        for name, value in options.items():
            default = params[name].default
            assert value == ("(required)" if default is inspect.Parameter.empty else default)


class _Base:
    def __init__(self, model, final, *, alpha: float = 0.3, end: int, seed: int = 0):
        pass


class _Child(_Base):
    def __init__(self, model, final, *, beta: float = 0.9, **kwargs):
        super().__init__(model, final, seed=1, **kwargs)


class _Closed(_Base):
    def __init__(self, model, final, gamma: int = 2, **prune_options):
        super().__init__(model, final, end=3)
        self.prune_options = prune_options


def test_options_of_classes_follow_what_init_passes_to_its_base():
    assert cat.signature_options(_Child) == {"beta": 0.9, "alpha": 0.3, "end": "(required)"}
    assert cat.signature_options(_Closed) == {"gamma": 2}  # **prune_options is not passed to the base
    assert cat.signature_options(sl.schedules.GradualPruner) == {"initial": 0.0, "power": 3, "method": "magnitude",
                                                                 "scope": "global"}


def test_catalogue_table_has_every_kind_with_sections_chapters_and_known_citations():
    frame = sl.catalogue()
    columns = ["name", "kind", "section", "chapter", "needs_data", "updates_weights", "options", "description",
               "cite", "where", "builtin", "available"]
    assert list(frame.columns) == columns
    assert {"score", "pruner", "budget", "schedule", "procedure"} <= set(frame.kind)
    assert frame.available.all() and frame.builtin.all()
    assert len(frame) == len(cat.entries())
    bib = (ROOT / "book" / "references.bib").read_text()
    for row in sl.catalogue(as_frame=False):
        assert re.fullmatch(r"§\d+(\.\d+)*", row["section"]), row
        assert 1 <= row["chapter"] <= 14 and row["description"]
        if row["cite"]:
            assert "{" + row["cite"] + "," in bib, f"{row['name']}: unknown BibTeX key {row['cite']}"
    pruners = sl.catalogue("pruner")
    assert set(pruners[pruners.updates_weights].name) == {"obs", "woodfisher", "obc", "sparsegpt"}
    with pytest.raises(ValueError, match="kind must be one of"):
        sl.catalogue("scores")


def test_sl_prune_methods_are_exactly_the_score_and_pruner_entries():
    names = sorted(e.name for e in cat.ENTRIES if e.kind in cat.PRUNE_KINDS)
    assert sl.scores.known_methods() == names
    for name in names:
        method = sl.scores.get_method(name)
        entry = cat.entry(name)
        assert (method.score if entry.kind == "score" else method.pruner) is entry.resolve()
        assert method.needs_data == entry.needs_data == ("data" in inspect.signature(entry.resolve()).parameters)
    assert "edgepopup" not in names and "edge_popup" not in names, "edge-popup trains: a procedure, not a criterion"
    with pytest.raises(ValueError, match="method must be one of"):
        sl.prune(sl.models.mlp(4, (4,), 2), 0.5, method="edgepopup")


def test_data_driven_entries_are_refused_without_data():
    model = sl.models.mlp(6, (8,), 3, seed=0)
    for name in sl.scores.known_methods():
        if cat.entry(name).needs_data:
            with pytest.raises(ValueError, match="data"):
                sl.prune(model, 0.5, method=name, scope="layerwise")
    assert not sl.get_masks(model)["fc1.weight"].logical_not().any(), "refusals leave the model unchanged"


def test_budgets_and_schedules_are_views_of_the_catalogue():
    assert list(sl.budgets.BUDGETS) == ["uniform", "er", "erk"]
    assert sl.budgets.BUDGETS["erk"] is sl.budgets.erk and sl.budgets.BUDGETS["er"] is sl.budgets.erdos_renyi
    assert "uniform" in sl.budgets.BUDGETS and "global" not in sl.budgets.BUDGETS
    assert dict(sl.schedules.SCHEDULES) == {"one-shot": sl.schedules.OneShot, "iterative": sl.schedules.IterativePruner,
                                            "gradual": sl.schedules.GradualPruner, "iht": sl.schedules.IHT,
                                            "dsd": sl.schedules.DSD}
    with pytest.raises(KeyError):
        sl.budgets.BUDGETS["erk2"]


def test_no_library_module_registers_by_side_effect_and_users_can_add_methods():
    assert sl.scores.user_methods() == []

    @sl.scores.register("test_abs_cubed", description="|w|^3")
    def abs_cubed(model):
        return {n: w.detach().abs() ** 3 for n, w in sl.prunable(model).items()}

    try:
        model = sl.models.mlp(6, (8,), 3, seed=0)
        masks = sl.prune(model, 0.5, method="test_abs_cubed")
        reference = sl.prune(sl.models.mlp(6, (8,), 3, seed=0), 0.5, method="magnitude")
        assert all(torch.equal(masks[n], reference[n]) for n in masks), "|w|^3 ranks like |w|"
        rows = [r for r in sl.catalogue(as_frame=False) if r["name"] == "test_abs_cubed"]
        assert rows and rows[0]["builtin"] is False and rows[0]["kind"] == "score"
        assert rows[0]["where"].endswith(":test_no_library_module_registers_by_side_effect_and_users_can_add_methods"
                                         ".<locals>.abs_cubed")
        with pytest.raises(ValueError, match="method of the library"):
            sl.scores.register("magnitude")(abs_cubed)
        with pytest.raises(TypeError, match="cannot be removed"):
            del sl.scores.METHODS["magnitude"]
    finally:
        sl.scores.METHODS.pop("test_abs_cubed")
    assert "test_abs_cubed" not in sl.scores.known_methods()


def test_missing_modules_are_pending_and_missing_attributes_are_errors():
    pending = cat.Entry("future", "growth", "sparsity_lib.not_written_yet:Future", "§4", 9)
    assert pending.available is False
    assert pending.record()["options"] is None
    broken = cat.Entry("broken", "score", "sparsity_lib.scores:no_such_score", "§3", 3)
    assert broken.available is True
    with pytest.raises(AttributeError, match="does not exist"):
        broken.resolve()
    with pytest.raises(ValueError, match="kind must be one of"):
        cat.Entry("x", "trick", "sparsity_lib.scores:magnitude", "§3", 3)
    with pytest.raises(ValueError, match="lowercase"):
        cat.Entry("Magnitude", "score", "sparsity_lib.scores:magnitude", "§3", 3)
    with pytest.raises(ValueError, match="listed twice"):
        cat._check_unique([cat.ENTRIES[0], cat.ENTRIES[0]])
    listed = {e.name for e in cat.entries(include_missing=True)}
    assert {"rigl", "set"} <= listed  # Chapter 09's growth rules, shown once sparsity_lib.growth exists
    with pytest.raises(ValueError, match="name must be one of"):
        cat.entry("rigl2")
