"""The statistics: gain table (gains), hypothesis tests and corrections (hypotheses), their sentences
(prose), the mixed model, the authors' published figures (authors_tables)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from kd_utils import authors_tables
from kd_utils.authors_tables import load_kd_generalization
from kd_utils.gains import gain_table
from kd_utils.hypotheses import (adjust_pvalues, all_hypotheses, h1_kd_vs_sft, h2_teacher_expertise,
                                 h2_teacher_performance, h3_student_size, method_differences)
from kd_utils.mixed_model import mixed_model
from kd_utils.prose import describe_hypotheses
from kd_utils.schema import HYPOTHESIS_COLUMNS

SHARED = Path(os.environ.get("KD_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
AUTHORS = SHARED / "reference" / "kd_generalization"
AUTHOR_FILES = ["math_results_main.csv", "llama_math_results.csv", "EM1.csv", "BLEU.csv"]


# --------------------------------------------------------------------------- builders
def _row(model, kind, student, task, accuracy, *, teacher="", method=None, temperature=np.nan,
         seed=0, teacher_kind="", noise=0.0, student_params=1e6, teacher_params=np.nan,
         domain="math"):
    return dict(model=model, kind=kind, student=student, teacher=teacher,
                method=method or kind, temperature=temperature, noise=noise,
                teacher_kind=teacher_kind, seed=seed, task=task, domain=domain, n=100,
                accuracy=accuracy, ci_low=np.nan, ci_high=np.nan, student_params=student_params,
                teacher_params=teacher_params, cell_id="c")


def _kd(student, task, accuracy, temperature, *, teacher="T", method="fkl", seed=0, **kw):
    model = f"{student}-{method}-{temperature}-{seed}-{kw.get('teacher_kind', 'sft')}"
    kw.setdefault("teacher_kind", "sft")
    return _row(model, "kd", student, task, accuracy, teacher=teacher, method=method,
                temperature=temperature, seed=seed, teacher_params=4e6, **kw)


def _gains(values, *, methods=None, sizes=None, task="t1", **extra):
    """A gains-shaped frame with the given gains (one row per value)."""
    n = len(values)
    return pd.DataFrame(dict(
        teacher="T", student=[f"s{i}" for i in range(n)],
        method=methods if methods is not None else ["fkl"] * n, noise=0.0, teacher_kind="sft",
        seed=0, task=task, domain="math", tau_used=1.0, accuracy=50 + np.asarray(values, float),
        sft_accuracy=50.0, teacher_accuracy=70.0, gain=np.asarray(values, float),
        student_params=sizes if sizes is not None else np.arange(1, n + 1) * 1e6,
        teacher_params=1e8, **extra))


@pytest.fixture
def results():
    """Student s (2 tasks), teacher T; KD at tau 1, 2, 5 with known accuracies."""
    rows = [
        _row("s", "sft", "s", "t1", 40.0), _row("s", "sft", "s", "t2", 60.0),
        _row("T", "sft", "T", "t1", 80.0, student_params=4e6),
        _row("T", "sft", "T", "t2", 90.0, student_params=4e6),
    ]
    acc = {1.0: (50.0, 62.0), 2.0: (55.0, 58.0), 5.0: (30.0, 70.0)}
    for tau, (a1, a2) in acc.items():
        rows += [_kd("s", "t1", a1, tau), _kd("s", "t2", a2, tau)]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- gain table
def test_tau_aggregation_selects_rows(results):
    g = gain_table(results, tau="max", average=False).set_index("task")
    assert g.loc["t1", "accuracy"] == 55.0 and g.loc["t1", "tau_used"] == 2.0
    assert g.loc["t2", "accuracy"] == 70.0 and g.loc["t2", "tau_used"] == 5.0
    assert g.loc["t1", "gain"] == 15.0 and g.loc["t1", "teacher_accuracy"] == 80.0
    mean = gain_table(results, tau="mean", average=False).set_index("task")
    assert mean.loc["t1", "accuracy"] == pytest.approx(45.0)
    assert mean.loc["t1", "tau_used"] == "mean"
    fixed = gain_table(results, tau=1.0, average=False)
    assert fixed.set_index("task")["accuracy"].to_dict() == {"t1": 50.0, "t2": 62.0}
    assert fixed.attrs["tau"] == 1.0 and mean.attrs["tau"] == "mean"


def test_average_rows_are_averaged_per_model_before_aggregation(results):
    g = gain_table(results, tau="max").set_index("task")
    # per-model averages: tau1 56, tau2 56.5, tau5 50 -> max 56.5 (not the mean of per-task maxima)
    assert g.loc["Average", "accuracy"] == pytest.approx(56.5)
    assert g.loc["Average", "tau_used"] == 2.0
    assert g.loc["Average", "sft_accuracy"] == pytest.approx(50.0)
    assert g.loc["Average", "teacher_accuracy"] == pytest.approx(85.0)
    with pytest.raises(ValueError, match="Average"):
        gain_table(pd.concat([results, results.head(1).assign(task="Average")]))


def test_each_domain_average_is_compared_with_the_same_domain_average():
    """A student's SFT (and the teacher's) Average is per domain, not pooled over domains."""
    rows = []
    for task, domain, sft, teacher, kd in (("m1", "math", 10.0, 90.0, 14.0), ("m2", "math", 20.0, 100.0, 22.0),
                                           ("c1", "commonsense", 40.0, 50.0, 41.0), ("c2", "commonsense", 60.0, 40.0, 63.0)):
        rows += [_row("s", "sft", "s", task, sft, domain=domain),
                 _row("T", "sft", "T", task, teacher, student_params=4e6, domain=domain),
                 _kd("s", task, kd, 1.0, domain=domain)]
    g = gain_table(pd.DataFrame(rows), tau="max")
    avg = g[g["task"] == "Average"].set_index("domain")
    assert avg.loc["math", "sft_accuracy"] == pytest.approx(15.0) and avg.loc["math", "gain"] == pytest.approx(3.0)
    assert avg.loc["commonsense", "sft_accuracy"] == pytest.approx(50.0)
    assert avg.loc["commonsense", "gain"] == pytest.approx(2.0)
    assert avg.loc["math", "teacher_accuracy"] == pytest.approx(95.0)
    assert avg.loc["commonsense", "teacher_accuracy"] == pytest.approx(45.0)


def test_fidelity_follows_the_chosen_temperature(results):
    kd = results[results["kind"] == "kd"]
    fid = kd[["model", "teacher", "task"]].assign(
        agreement=kd["temperature"].to_numpy() * 10, bleu=kd["temperature"].to_numpy())
    g = gain_table(results, fid, tau="max", average=False).set_index("task")
    assert g.loc["t1", "agreement"] == 20.0 and g.loc["t2", "fidelity"] == 5.0
    m = gain_table(results, fid, tau="mean", average=True).set_index("task")
    assert m.loc["Average", "agreement"] == pytest.approx(80 / 3)


def test_sft_seed_fallback_warns():
    rows = [_row("s0", "sft", "s", "t1", 40.0, seed=0), _row("s2", "sft", "s", "t1", 50.0, seed=2),
            _row("T", "sft", "T", "t1", 90.0), _kd("s", "t1", 60.0, 1.0, seed=1)]
    with pytest.warns(UserWarning, match="averaged over seeds"):
        g = gain_table(pd.DataFrame(rows), average=False)
    assert g["sft_accuracy"].iloc[0] == 45.0 and g["gain"].iloc[0] == 15.0


def test_gain_table_rejects_bad_input(results):
    with pytest.raises(ValueError, match="tau aggregation"):
        gain_table(results, tau="median")
    with pytest.raises(ValueError, match="teacher_kind"):
        gain_table(results.drop(columns="teacher_kind"))
    with pytest.raises(ValueError, match="duplicate"):
        gain_table(pd.concat([results, results.tail(1)]))


# --------------------------------------------------------------------------- tests
def test_h1_detects_a_known_positive_shift():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 1.0, 12)
    t = h1_kd_vs_sft(_gains(values))
    tt = t[(t["test"] == "ttest") & (t["method"] == "all")].iloc[0]
    ref = sps.ttest_1samp(values, 0, alternative="greater")
    assert tt["statistic"] == pytest.approx(ref.statistic)
    assert tt["p_value"] == pytest.approx(ref.pvalue) and tt["p_value"] < 0.05
    assert tt["effect"] == pytest.approx(values.mean() / values.std(ddof=1))
    assert tt["ci_high"] == np.inf and tt["ci_low"] < values.mean()
    assert {"ttest", "wilcoxon"} == set(t["test"])
    null = h1_kd_vs_sft(_gains(values - values.mean()))
    assert (null["p_value"] > 0.3).all()


def test_method_tests_skip_gains_without_variance():
    g = pd.concat([_gains(np.zeros(4)).assign(method=m) for m in ("fkl", "rkl")], ignore_index=True)
    assert method_differences(g).empty


def test_cohens_d_keeps_the_sign_of_a_loss():
    values = np.random.default_rng(1).normal(-3.0, 1.0, 12)
    t = h1_kd_vs_sft(_gains(values))
    tt = t[(t["test"] == "ttest") & (t["method"] == "all")].iloc[0]
    assert tt["effect"] == pytest.approx(values.mean() / values.std(ddof=1)) and tt["effect"] < 0


def test_monotone_relation_gives_rho_minus_one():
    values = np.arange(10.0, 0.0, -1.0)
    t = h3_student_size(_gains(values))
    row = t[t["method"] == "all"].iloc[0]
    assert row["statistic"] == pytest.approx(-1.0) and row["n"] == 10
    assert h2_teacher_performance(_gains(values)).empty  # constant teacher accuracy


def test_method_differences_match_scipy():
    rng = np.random.default_rng(1)
    methods = ["a", "b", "c"] * 6
    shift = {"a": 0.0, "b": 2.0, "c": 4.0}
    values = np.array([shift[m] for m in methods]) + rng.normal(0, 1, 18)
    g = _gains(values, methods=methods)
    g["student"] = [f"s{i // 3}" for i in range(18)]  # 6 (teacher, student) subjects x 3 methods
    t = method_differences(g)
    anova = t[t["test"] == "anova"].iloc[0]
    ref = sps.f_oneway(*(values[np.array(methods) == m] for m in "abc"))
    assert anova["statistic"] == pytest.approx(ref.statistic) and anova["n"] == 18
    assert t[t["test"] == "rm_anova"]["n"].iloc[0] == 6
    pairs = t[t["test"] == "pairwise_ttest"].set_index("method")
    assert set(pairs.index) == {"a vs b", "a vs c", "b vs c"}
    assert pairs.loc["a vs c", "estimate"] < 0 and (pairs["p_holm_pairs"] >= pairs["p_value"]).all()


def test_teacher_expertise_paired_difference():
    g = _gains(np.zeros(5))
    base = g.assign(teacher_kind="base", accuracy=g["accuracy"] - [8, 9, 10, 11, 12])
    t = h2_teacher_expertise(pd.concat([g, base]))
    row = t[(t["test"] == "ttest") & (t["method"] == "all")].iloc[0]
    assert row["estimate"] == pytest.approx(10.0) and row["n"] == 5 and row["p_value"] < 0.01
    assert h2_teacher_expertise(g).empty


def test_adjust_pvalues_equals_statsmodels():
    p = np.array([0.001, 0.02, 0.03, 0.2, 0.04])
    table = pd.DataFrame(dict(hypothesis="H1", test="ttest", method="all", p_value=p,
                              task=list("abcde")))
    other = table.assign(method="fkl", p_value=p[::-1])
    out = adjust_pvalues(pd.concat([table, other], ignore_index=True))
    for method, pv in (("all", p), ("fkl", p[::-1])):
        fam = out[out["method"] == method]
        assert np.allclose(fam["p_holm"], multipletests(pv, method="holm")[1])
        assert np.allclose(fam["p_bh"], multipletests(pv, method="fdr_bh")[1])


def test_all_hypotheses_skips_absent_and_small_inputs():
    rng = np.random.default_rng(2)
    big = _gains(rng.normal(2, 1, 8), agreement=rng.uniform(0, 100, 8))
    small = _gains([1.0, 2.0], task="t2", agreement=[1.0, 2.0])
    table = all_hypotheses(pd.concat([big, small], ignore_index=True))
    assert list(table.columns) == HYPOTHESIS_COLUMNS
    assert set(table["task"]) == {"t1"} and not table["statistic"].isna().any()
    assert "H4_agreement" in set(table["hypothesis"])
    assert not {"H5_fidelity", "H2_teacher_accuracy"} & set(table["hypothesis"])
    lines = describe_hypotheses(table)
    assert lines[0].startswith("H1 (KD > SFT), math: mean gain") and "t1" in lines[0]
    significant = (table["method"] == "all") & (table["p_holm"] < 0.05)
    assert set(table.loc[significant & (table["test"] == "ttest"), "hypothesis"]) == {"H1"}
    short = describe_hypotheses(table, collapse=True)
    assert short[0] == lines[0], "a significant hypothesis keeps its sentence"
    assert short[-1].startswith("Not significant after Holm at 0.05: H3 (gain vs student size), math (p=")
    assert "; H4 (gain vs teacher-student agreement), math (p=" in short[-1]
    assert len(short) == 2


def test_mixed_model_recovers_slope_and_warns_when_singular():
    rng = np.random.default_rng(3)
    sizes = np.tile([1e6, 4e6, 16e6, 64e6], 6)
    tasks = np.repeat([f"t{i}" for i in range(6)], 4)
    task_effect = dict(zip([f"t{i}" for i in range(6)], rng.normal(0, 3, 6)))
    gain = -2.0 * np.log(sizes) + np.array([task_effect[t] for t in tasks]) + rng.normal(0, 0.3, 24)
    g = _gains(gain, sizes=sizes, methods=["fkl", "rkl"] * 12).assign(
        task=tasks, teacher_accuracy=rng.uniform(60, 90, 24))
    coef = mixed_model(g).set_index("term")
    assert coef.loc["log_student_params", "coef"] == pytest.approx(-2.0, abs=0.2)
    assert "task Var" in coef.index
    flat = g.assign(gain=-2.0 * np.log(sizes) + rng.normal(0, 1, 24))
    with pytest.warns(RuntimeWarning, match="singular"):
        mixed_model(flat)


def test_load_kd_generalization_parses_their_format(tmp_path):
    (tmp_path / "main.csv").write_text(
        "Teacher,Student,Method,gsm8k,AQuA,Average\n"
        "-,Q-0.5B,BaseModel,1,2,1.5\n-,Q-0.5B,SFT,10,20,15\n-,Q-3B,SFT,50,30,40\n"
        "Q-3B_ckpt2400,Q-0.5B,student_KD_temp_2.0,12,22,17\n"
        "Q-3B,Q-0.5B,student_RevKD_temp_1.0,13,21,17\n"
        "Q-3B,Q-0.5B,student_KD_base_teacher_temp_1.0,5,6,5.5\n")
    (tmp_path / "EM1.csv").write_text(
        "Teacher,Student,Pair,Method,gsm8k,AQuA\nQ-3B,Q-0.5B,Q-3B -> Q-0.5B,SFT,40,50\n"
        "Q-3B,Q-0.5B,Q-3B -> Q-0.5B,KD,60,70\n")
    res, fid = load_kd_generalization([tmp_path / "main.csv", tmp_path / "EM1.csv"])
    kd = res[res["kind"] == "kd"]
    assert set(kd["teacher"]) == {"Q-3B"} and set(kd["method"]) == {"SeqKD", "RevKD"}
    assert set(kd["temperature"]) == {1.0, 2.0} and set(res["task"]) == {"gsm8k", "AQuA", "Average"}
    assert sorted(kd["teacher_kind"].unique()) == ["base", "sft"]
    assert (res.loc[res["student"] == "Q-0.5B", "student_params"] == 500_000_000).all()
    assert set(res["kind"]) == {"base", "sft", "kd"}
    kd_fid = fid[fid["model"] != "Q-0.5B"]
    assert len(kd_fid) == 4 and set(kd_fid["agreement"]) == {60.0, 70.0}  # SeqKD + RevKD models
    assert fid["bleu"].isna().all()
    bad = tmp_path / "bad.csv"
    bad.write_text("Teacher,Student,Method,gsm8k,Average\nQ-3B,Q-0.5B,student_XKD_temp_1.0,1,1\n")
    with pytest.raises(ValueError, match="student_XKD_temp_1.0"):
        load_kd_generalization([bad])


# --------------------------------------------------------------------------- the authors' figures
needs_authors = pytest.mark.skipif(not AUTHORS.is_dir(), reason=f"no shared data at {AUTHORS}")


@pytest.fixture(scope="module")
def authors_table():
    res, fid = load_kd_generalization([AUTHORS / f for f in AUTHOR_FILES])
    gains = gain_table(res, fid, tau="max", average=False)
    return gains, all_hypotheses(gains)


def _get(table, hypothesis, task, test, method="all"):
    rows = table[(table["hypothesis"] == hypothesis) & (table["task"] == task)
                 & (table["test"] == test) & (table["method"] == method)]
    assert len(rows) == 1
    return rows.iloc[0]


@needs_authors
def test_published_math_figures(authors_table):
    _, table = authors_table
    h1 = _get(table, "H1", "Average", "ttest")
    assert (round(h1["statistic"], 2), h1["n"]) == (8.47, 33)
    assert h1["p_value"] == pytest.approx(5.7e-10, rel=0.01)
    anova = _get(table, "methods", "gsm8k", "anova")
    assert round(anova["statistic"], 2) == 5.62 and round(anova["p_value"], 3) == 0.008
    size = _get(table, "H3_student_size", "Average", "spearman")
    assert round(size["statistic"], 2) == -0.66 and size["p_value"] == pytest.approx(3.4e-5, rel=0.01)
    assert round(_get(table, "H3_student_size", "MultiArith", "spearman")["statistic"], 2) == -0.83
    # H4 / H5 as the authors' notebook pairs them: the pair's KD row of EM1.csv / BLEU.csv
    # joined to all three methods (n = 33); their printed values.
    h4 = _get(table, "H4_agreement", "MultiArith", "spearman")
    assert (round(h4["statistic"], 2), h4["n"]) == (-0.63, 33)
    assert h4["p_value"] == pytest.approx(7.97e-5, rel=0.01)
    assert round(_get(table, "H4_agreement", "SVAMP", "spearman")["statistic"], 2) == -0.37
    h5 = _get(table, "H5_fidelity", "MultiArith", "spearman")
    assert round(h5["statistic"], 2) == -0.46 and round(h5["p_value"], 4) == 0.0071
    assert not ((table["hypothesis"] == "H4_agreement") & (table["task"] == "Average")).any()


@needs_authors
def test_reproduce_cli_writes_hypotheses(tmp_path, capsys):
    files = [str(AUTHORS / f) for f in AUTHOR_FILES]
    assert authors_tables.main(["reproduce", "--kd-generalization", *files, "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "hypotheses.csv")
    assert {"hypothesis", "method", "task", "statistic", "p_value", "n"} <= set(table.columns)
    h1 = table.query("hypothesis == 'H1' and task == 'Average' and test == 'ttest' and method == 'all'")
    assert round(h1["statistic"].iloc[0], 2) == 8.47
    out = capsys.readouterr().out
    assert "33 KD configurations" in out and "H1 (KD > SFT), math" in out


# --------------------------------------------------------------------------- scorer views
def test_statistics_run_on_any_scorer_the_evaluation_ran():
    from kd_utils.results import scored_by, scorer_views

    rows = [dict(_row("s", "sft", "s", "gsm8k", 10.0), scorer="generate", accuracy_generate=10.0, accuracy_loglik=None),
            dict(_row("s", "sft", "s", "boolq", 20.0, domain="commonsense"), scorer="generate", ci_low=15.0,
                 accuracy_generate=20.0, accuracy_loglik=60.0),
            dict(_kd("s", "boolq", 30.0, 1.0, domain="commonsense"), scorer="generate",
                 accuracy_generate=30.0, accuracy_loglik=70.0)]
    results = pd.DataFrame(rows)
    loglik = scored_by(results, "loglik")
    assert loglik["task"].tolist() == ["boolq", "boolq"], "the generation-only task leaves the loglik view"
    assert loglik["accuracy"].tolist() == [60.0, 70.0] and set(loglik["scorer"]) == {"loglik"}
    assert loglik["ci_low"].isna().all(), "the main scorer's interval is not the loglik accuracy's"
    assert scored_by(results, "generate")["ci_low"].tolist()[1] == 15.0
    with pytest.warns(UserWarning, match="no SFT row for teacher"):
        gains = gain_table(loglik, tau=1.0)
    assert gains.loc[gains["task"] == "boolq", "gain"].item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no model was scored by 'loglik'"):
        scored_by(results.assign(accuracy_loglik=None), "loglik")
    with pytest.raises(ValueError, match="unknown scorer 'bleu'"):
        scored_by(results, "bleu")
    views = scorer_views(results.assign(accuracy_loglik_norm=None, accuracy_loglik_label=None))
    assert views.loc["s", "generate"] == pytest.approx(15.0) and views.loc["s", "generate tasks"] == 2
    assert views.loc["s", "loglik"] == pytest.approx(60.0) and views.loc["s", "loglik tasks"] == 1
    assert "loglik_norm" not in views
