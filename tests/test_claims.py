"""sparsity_lib.claims (claim cells) and the table builder of tools/book_claims.py (the page "What held")."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from docutils import nodes

import sparsity_lib as sl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import book_claims  # noqa: E402

ARGS = dict(chapter="04_layer_budgets", key="global beats uniform", literature="Global beats uniform at 98%",
            source="Hoefler et al. (2021) §3.9")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(sl.claims.ENV_VAR, raising=False)


def test_numbers_rounded_without_float_noise():
    assert sl.claims.fmt(0.020000000000000004) == "0.02"
    assert sl.claims.fmt(0.1 + 0.2) == "0.3"
    assert sl.claims.fmt(2 / 3) == "0.6667"
    assert sl.claims.fmt(12345.6) == "12,346"
    assert sl.claims.fmt(123456) == "123,456" and sl.claims.fmt(7) == "7"
    assert sl.claims.fmt(1.23456e-5) == "1.23e-05"
    assert sl.claims.fmt(0.0) == "0" and sl.claims.fmt(np.float32(0.5)) == "0.5"
    assert sl.claims.fmt(True) == "True"
    assert sl.claims.fmt(0.123456, 3) == "0.123" and sl.claims.fmt(1.23456e-5, 2) == "1.2e-05"


def test_per_seed_summary_mean_sd_min_max():
    values = [0.9, 0.92, 0.94]
    text = sl.claims.summarize(values)
    assert text == "0.92 ± 0.02  [0.9, 0.94]  (3 seeds)"
    assert sl.claims.summarize(torch.tensor([1.0, 3.0])).startswith("2 ± 1.4  [1, 3]")
    assert sl.claims.summarize(np.float64(0.020000000000000004)) == "0.02"
    assert sl.claims.summarize("3 of 3 seeds") == "3 of 3 seeds"
    assert sl.claims.summarize(np.ones((3, 4))).endswith("(12 values)")


def test_check_prints_a_short_table(capsys):
    rec = sl.claims.check(**ARGS, measured={"gap": np.array([0.05, 0.06, 0.07]), "seeds": 3}, holds=True)
    out = capsys.readouterr().out
    assert "claim 'global beats uniform' (held)" in out
    assert "0.06 ± 0.01  [0.05, 0.07]  (3 seeds)" in out and "0.050000" not in out
    assert rec["verdict"] == "held" and rec["asserted"] and rec["measured"]["seeds"] == "3"


def test_records_only_when_env_set(tmp_path, monkeypatch):
    sl.claims.check(**ARGS, measured={"gap": 0.1}, holds=True)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(sl.claims.ENV_VAR, str(tmp_path / "claims"))
    sl.claims.check(**ARGS, measured={"gap": 0.1}, holds=True)
    sl.claims.check(**{**ARGS, "key": "weak"}, measured={"gap": [0.01, -0.02]}, verdict="did not hold")
    lines = (tmp_path / "claims" / "04_layer_budgets.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["key"] for r in recs] == ["global beats uniform", "weak"]
    assert recs[1]["verdict"] == "did not hold" and not recs[1]["asserted"]
    assert book_claims.read_records(tmp_path / "claims") == recs


def test_assertion_error_when_claim_fails_and_nothing_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(sl.claims.ENV_VAR, str(tmp_path))
    with pytest.raises(AssertionError, match="global beats uniform.*04_layer_budgets.*gap = 0.01"):
        sl.claims.check(**ARGS, measured={"gap": 0.01}, holds=bool(0.01 > 0.03))
    with pytest.raises(AssertionError):
        sl.claims.check(**ARGS, measured={"gap": 0.01}, holds=False, verdict="held weakly")
    assert not list(tmp_path.glob("*.jsonl"))


@pytest.mark.parametrize("bad, match", [
    (dict(chapter="ch4"), "chapter must be a notebook stem"),
    (dict(key=""), "key must be a non-empty string"),
    (dict(verdict="mostly"), "verdict must be one of"),
    (dict(measured={}), "measured must be a non-empty dict"),
    (dict(measured={"gap": []}), r"measured\['gap'\] is empty"),
    (dict(measured={"gap": object()}), r"measured\['gap'\] must be a number"),
    (dict(holds=np.array([True, False])), "holds must be a bool"),
    (dict(holds=None), "holds is required"),
])
def test_bad_arguments_refused(bad, match):
    kwargs = {**ARGS, "measured": {"gap": 0.1}, "holds": True, **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        sl.claims.check(**kwargs)


def test_table_builder_on_fake_records():
    recs = [
        {"chapter": "01_foundations", "key": "a", "literature": "A holds", "source": "survey §2",
         "measured": {"x": "0.5"}, "verdict": "held", "asserted": True, "note": ""},
        {"chapter": "10_lottery_tickets", "key": "b", "literature": "Tickets win", "source": "Frankle & Carbin",
         "measured": {"gap": "-0.01 ± 0.02  [-0.03, 0.01]  (3 seeds)"}, "verdict": "did not hold",
         "asserted": False, "note": "no ticket at toy scale"},
    ]
    summary, table = book_claims.build_table(recs, chapter_link=lambda s: f"../chapters/{s}.html",
                                             chapter_title=lambda s: {"01_foundations": "1. Foundations"}.get(s))
    assert summary.astext() == "2 claims: 1 held, 0 held weakly, 1 did not hold."
    rows = list(table.findall(nodes.row))
    assert len(rows) == 3   # header + 2
    refs = list(table.findall(nodes.reference))
    assert [r["refuri"] for r in refs] == ["../chapters/01_foundations.html", "../chapters/10_lottery_tickets.html"]
    assert refs[0].astext() == "1. Foundations" and refs[1].astext() == "10_lottery_tickets"
    text = rows[2].astext()
    assert "Tickets win" in text and "Frankle & Carbin" in text and "did not hold (not asserted)" in text
    assert "no ticket at toy scale" in text and "-0.01 ± 0.02" in text
    empty = book_claims.build_table([])
    assert "0 claims" in empty[0].astext() and "No claim was recorded" in empty[1].astext()
