"""Solver settings as written on the command line, and their labels."""

import pytest

from sparsedecomp.errors import InputError
from sparsedecomp.solver_settings import SolverSetting, parse_solver_setting, unique_labels


@pytest.mark.parametrize("text, method, params, space, label", [
    ("pinv", "pinv", {}, "z", "pinv"),
    ("nn_omp:n_nonzero=8,tol=0.01", "nn_omp", {"n_nonzero": 8, "tol": 0.01}, "z", "nn_omp_n_nonzero8_tol0.01"),
    ("nn_lasso:alpha=0.2@residual", "nn_lasso", {"alpha": 0.2}, "residual", "nn_lasso_alpha0.2_residual"),
    ("lasso:alpha=1e-3,alpha_is_fraction_of_max=false", "lasso", {"alpha": 0.001, "alpha_is_fraction_of_max": False},
     "z", "lasso_alpha0.001_alpha_is_fraction_of_maxfalse"),
])
def test_parse_and_label(text, method, params, space, label):
    setting = parse_solver_setting(text)
    assert (setting.method, setting.params, setting.space, setting.label) == (method, params, space, label)
    assert type(setting.params.get("n_nonzero", 0)) is int


@pytest.mark.parametrize("text, match", [
    ("nn_omp:n_nonzero", "NAME=VALUE"), ("nn_omp:tol=abc", "not a number"), ("pinv@mlp", "space"), ("", "METHOD"),
])
def test_bad_settings_are_refused(text, match):
    with pytest.raises(InputError, match=match):
        parse_solver_setting(text)


def test_duplicate_labels_are_refused():
    with pytest.raises(InputError, match="share the label"):
        unique_labels([SolverSetting("pinv"), parse_solver_setting("pinv@z")])
