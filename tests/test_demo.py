"""The demo's scores: per digit count and on the fixed list of numbers people type."""

from pathlib import Path

import pytest

from vaswani.demo.run import SCORING_MINUTES, DemoResult, exact_match_by_digits, print_demo, run_demo


def test_exact_match_by_digits_groups_by_length():
    numbers = [5, 342, 999, 1000, 123_456]
    references = ["fünf", "dreihundertzweiundvierzig", "neunhundertneunundneunzig", "eintausend", "x"]
    hypotheses = ["fünf", "dreihundertzweiundvierzig", "falsch", "eintausend", "y"]
    assert exact_match_by_digits(numbers, hypotheses, references) == {1: 1.0, 3: 0.5, 4: 1.0, 6: 0.0}


def test_print_demo_reports_every_score(capsys):
    result = DemoResult(
        model_dir=Path("outputs/demo/model"),
        exact_match=0.975,
        test_sentences=1000,
        train_minutes=2.5,
        total_minutes=2.8,
        steps=2500,
        examples=[("forty-two", "zweiundvierzig", "zweiundvierzig"), ("ten", "zehntausend", "zehn")],
        num_beams=1,
        validation_exact_match={1: 0.98, 4: 0.97, 8: 0.98},
        test_by_digits={3: 1.0, 4: 0.99, 5: 0.96, 6: 0.95},
        typed_exact_match=64 / 65,
        typed_misses=[("ten", "zehntausend", "zehn")],
    )
    print_demo(result)
    out = capsys.readouterr().out
    assert "| forty-two | zweiundvierzig | zweiundvierzig | ✓ |" in out and "| ten | zehntausend | zehn | ✗ |" in out
    assert "by length: 3 digits 100.0%, 4 digits 99.0%, 5 digits 96.0%, 6 digits 95.0%" in out
    assert "65 numbers people type" in out and "98.5%" in out
    assert "missed: ten → zehntausend (should be zehn)" in out
    assert "exact match on 1000 held-out numbers: 97.5% (beam 1; trained 2500 steps in 2.5 min, 2.8 min in all)" in out


def test_demo_budget_must_leave_time_to_score(tmp_path):
    with pytest.raises(ValueError, match="--minutes must be above"):
        run_demo(tmp_path, minutes=SCORING_MINUTES)
