"""Beyond the paper: a linear mixed model of the gains (:mod:`kd_utils.gains`), with a random
intercept per task."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from .gains import main_condition
from .schema import AVERAGE, GAIN_KEYS, require_columns

__all__ = ["mixed_model"]


def mixed_model(gains: pd.DataFrame) -> pd.DataFrame:
    """Beyond the paper: ``gain ~ log(student_params) + teacher_accuracy + C(method)`` with a
    random intercept per task (statsmodels MixedLM, REML), on the per-task rows of the main
    condition. Terms that do not vary are dropped (warned). A singular or non-converged fit
    (task-intercept variance ~0, the usual case with few tasks) is warned about: its fixed
    effects are then close to OLS. Returns term, coef, std_err, z, p_value, ci_low, ci_high
    (the last row, "task Var", is the random-intercept variance)."""
    require_columns(gains, GAIN_KEYS + ["gain", "student_params", "teacher_accuracy"], "gains")
    d = main_condition(gains)
    d = d[d["task"] != AVERAGE].dropna(subset=["gain", "student_params", "teacher_accuracy"])
    d = d.assign(log_student_params=np.log(d["student_params"].astype(float)))
    candidates = {"log_student_params": "log_student_params",
                  "teacher_accuracy": "teacher_accuracy", "method": "C(method)"}
    terms = [t for c, t in candidates.items() if d[c].nunique() > 1]
    dropped = [c for c, t in candidates.items() if t not in terms]
    if dropped:
        warnings.warn(f"mixed_model: {dropped} do not vary and are left out", stacklevel=2)
    if not terms:
        raise ValueError("mixed_model: no predictor varies in the gains")
    if d["task"].nunique() < 2:
        raise ValueError("mixed_model: a random intercept per task needs at least 2 tasks")
    formula = "gain ~ " + " + ".join(terms)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm(formula, d, groups=d["task"]).fit(reml=True)
        except np.linalg.LinAlgError as err:
            raise ValueError(f"mixed_model: singular design for {formula!r} ({err})") from err
    variance = float(np.asarray(fit.cov_re)[0, 0])
    singular = (not fit.converged or variance < 1e-8 * max(float(fit.scale), 1e-12)
                or any(issubclass(w.category, ConvergenceWarning) for w in caught))
    if singular:
        warnings.warn(f"mixed_model: singular or non-converged fit (task-intercept variance "
                      f"{variance:.3g}); the task random effect is not identified and the fixed "
                      "effects are close to an OLS fit", RuntimeWarning, stacklevel=2)
    ci = fit.conf_int()
    out = pd.DataFrame({"term": fit.params.index.str.replace("Group Var", "task Var"),
                        "coef": fit.params.to_numpy(), "std_err": fit.bse.to_numpy(),
                        "z": fit.tvalues.to_numpy(), "p_value": fit.pvalues.to_numpy(),
                        "ci_low": ci[0].to_numpy(), "ci_high": ci[1].to_numpy()})
    out.attrs.update(formula=formula, n=len(d), n_tasks=int(d["task"].nunique()), singular=singular)
    return out
