"""The demo's own helpers (the demo itself runs in the README's first command, not in the tests)."""

from __future__ import annotations


def test_fit_score_label_names_what_the_number_is():
    # a product without survey errors (MILES, STELIB) must not read as "chi2_nu = 0.00", a perfect fit
    from stellarfield.demo import fit_score_label

    assert fit_score_label(1.234, True) == "chi2_nu = 1.23"
    label = fit_score_label(1.3e-4, False)
    assert "chi2_nu" not in label and "= 0.00013 " in label and "no survey errors" in label
