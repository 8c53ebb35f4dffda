"""The champion rules of the gate, on their own: which split must improve, and the test split's floor."""

from __future__ import annotations

from tasks.config import PromotionRules
from tasks.refs import Comparison, EvalReport
from tasks.register import _champion_rules


def _report(feedback: Comparison | None) -> EvalReport:
    return EvalReport.model_construct(
        comparisons={}, split_comparisons={"feedback": {"champion": feedback}} if feedback else {}
    )


def _vs(low: float, high: float) -> Comparison:
    return Comparison(against="champion", accuracy_diff=(low + high) / 2, ci_low=low, ci_high=high)


def test_the_test_split_must_improve_by_default() -> None:
    rules = _champion_rules(PromotionRules(), _report(None), _vs(0.01, 0.05))
    assert list(rules) == ["beats_champion"] and rules["beats_champion"].passed
    assert not _champion_rules(PromotionRules(), _report(None), _vs(-0.01, 0.05))["beats_champion"].passed


def test_improving_on_feedback_needs_a_win_there_and_no_regression_on_test() -> None:
    rules = PromotionRules(improve_on="feedback", max_regression=0.03)
    win, flat, worse = _vs(0.2, 0.4), _vs(-0.025, 0.02), _vs(-0.05, -0.01)
    ok = _champion_rules(rules, _report(win), flat)
    assert ok["beats_champion_on_feedback"].passed and ok["no_regression_on_test"].passed
    assert not _champion_rules(rules, _report(win), worse)["no_regression_on_test"].passed
    assert not _champion_rules(rules, _report(_vs(-0.1, 0.3)), flat)["beats_champion_on_feedback"].passed
    missing = _champion_rules(rules, _report(None), flat)["beats_champion_on_feedback"]
    assert not missing.passed and "no 'feedback' split" in missing.value
