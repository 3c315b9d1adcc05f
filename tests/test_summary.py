"""The report's summary findings, checked against numbers computed here from the raw table."""
from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from kd_utils import summary
from kd_utils.config import load_study
from kd_utils.gains import gain_table
from kd_utils.report import render_report
from kd_utils.tasks import SCORERS

PARAMS = Path(__file__).resolve().parents[1] / "params"
TASKS = {"math": ["m1", "m2"], "commonsense": ["c1", "c2"]}
SIZES = {"xs": 1e5, "s": 3e5, "m": 1e6}
SEEDS = [0, 1, 2]


def _row(model, kind, student, task, domain, accuracy, teacher="", method=None, temperature=np.nan, seed=0,
         teacher_kind="", noise=0.0):
    return dict(model=model, kind=kind, student=student, teacher=teacher, method=method or kind,
                temperature=temperature, noise=noise, teacher_kind=teacher_kind, seed=seed, task=task,
                domain=domain, n=50, scorer="generate", accuracy=accuracy, ci_low=np.nan, ci_high=np.nan,
                student_params=SIZES[student], teacher_params=SIZES[teacher] if teacher else np.nan, cell_id="c",
                **{f"accuracy_{s}": accuracy if s == "generate" else np.nan for s in SCORERS})


def study_tables(rng_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A small recorded-style results table (3 seeds; teachers m and s; students xs and s; fkl and
    rkl; tau 5, noise 5 and base-teacher ablations on m -> xs fkl) and its fidelity table."""
    rng = np.random.default_rng(rng_seed)
    rows, fid = [], []
    for domain, tasks in TASKS.items():
        for task in tasks:
            rows.append(_row("m/sft", "sft", "m", task, domain, 70 + rng.normal()))
            for seed in SEEDS:
                rows.append(_row(f"s/sft/{seed}", "sft", "s", task, domain, 40 + rng.normal(), seed=seed))
                rows.append(_row(f"xs/sft/{seed}", "sft", "xs", task, domain, 30 + rng.normal(), seed=seed))
            runs = [("m", "xs", "fkl", 1.0, 0.0, "sft", 6), ("m", "xs", "rkl", 1.0, 0.0, "sft", -2),
                    ("m", "s", "fkl", 1.0, 0.0, "sft", 1), ("m", "s", "rkl", 1.0, 0.0, "sft", -5),
                    ("s", "xs", "fkl", 1.0, 0.0, "sft", 5), ("s", "xs", "rkl", 1.0, 0.0, "sft", -1),
                    ("m", "xs", "fkl", 5.0, 0.0, "sft", -8), ("m", "xs", "fkl", 1.0, 5.0, "sft", -10),
                    ("m", "xs", "fkl", 1.0, 0.0, "base", -25)]
            for (t, s, method, tau, noise, kind, shift), seed in itertools.product(runs, SEEDS):
                base = 40 if s == "s" else 30
                model = f"kd/{s}<-{t}/{method}/t{tau:g}/n{noise:g}/{kind}/s{seed}"
                rows.append(_row(model, "kd", s, task, domain, base + shift + rng.normal(), teacher=t, method=method,
                                 temperature=tau, seed=seed, teacher_kind=kind, noise=noise))
                fid.append(dict(model=model, teacher=t, task=task, agreement=rng.uniform(20, 80),
                                bleu=rng.uniform(5, 40)))
    return pd.DataFrame(rows), pd.DataFrame(fid)


def _overall(results: pd.DataFrame, model: str) -> float:
    rows = results[results["model"] == model]
    return float(np.mean([rows[rows["domain"] == d]["accuracy"].mean() for d in TASKS]))


def _t_ci(x):
    x = np.asarray(x, float)
    return x.mean(), *sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))


@pytest.fixture(scope="module")
def tables():
    results, fidelity = study_tables()
    return results, gain_table(results, fidelity, tau=1.0)


def test_each_finding_equals_its_independent_computation(tables):
    results, gains = tables
    found = {f.key: f for f in summary.findings(results, gains)}
    assert list(found) == ["h1", "h3", "h2", "tau", "noise", "base", "h5"]

    gain = {(t, s, me, seed): _overall(results, f"kd/{s}<-{t}/{me}/t1/n0/sft/s{seed}") -
            _overall(results, f"{s}/sft/{seed}") for t, s, me, seed in
            itertools.product(["m", "s"], ["xs", "s"], ["fkl", "rkl"], SEEDS) if t != s}
    fkl = [gain[("m", "xs", "fkl", s)] for s in SEEDS]
    m, lo, hi = _t_ci(fkl)
    h1 = found["h1"]
    assert (h1.estimate, h1.ci_low, h1.ci_high, h1.n) == pytest.approx((m, lo, hi, 3))
    assert h1.matches and "xs <- m" in h1.text and f"fkl {m:+.1f} points (95% CI {lo:+.1f} to {hi:+.1f}" in h1.text

    size = [gain[("m", "xs", me, s)] - gain[("m", "s", me, s)] for me in ("fkl", "rkl") for s in SEEDS]
    assert (found["h3"].estimate, found["h3"].ci_low, found["h3"].n) == pytest.approx((*_t_ci(size)[:2], 6))
    assert found["h3"].matches

    teacher = [gain[("m", "xs", me, s)] - gain[("s", "xs", me, s)] for me in ("fkl", "rkl") for s in SEEDS]
    assert (found["h2"].estimate, found["h2"].ci_high) == pytest.approx((_t_ci(teacher)[0], _t_ci(teacher)[2]))

    for key, name in [("tau", "kd/xs<-m/fkl/t5/n0/sft/s{}"), ("noise", "kd/xs<-m/fkl/t1/n5/sft/s{}"),
                      ("base", "kd/xs<-m/fkl/t1/n0/base/s{}")]:
        diff = [_overall(results, name.format(s)) - _overall(results, f"kd/xs<-m/fkl/t1/n0/sft/s{s}") for s in SEEDS]
        f = found[key]
        assert (f.estimate, f.ci_low, f.ci_high, f.n) == pytest.approx((*_t_ci(diff), 3)), key
        assert f.matches, key

    per_task = gains[(gains["task"] != "Average") & (gains["teacher_kind"] == "sft") & (gains["noise"] == 0)]
    rho = sps.spearmanr(per_task["gain"], per_task["fidelity"])[0]
    assert found["h5"].estimate == pytest.approx(rho) and found["h5"].n == len(per_task)


def test_one_seed_gives_no_interval_and_no_verdict():
    results, fidelity = study_tables()
    one = results[results["seed"] == 0]
    found = {f.key: f for f in summary.findings(one, gain_table(one, fidelity, tau=1.0))}
    assert np.isnan(found["h1"].ci_low) and found["h1"].matches is None and "no CI, 1 seed)" in found["h1"].text
    assert found["tau"].matches is None


def test_a_grid_without_ablations_omits_their_lines():
    results, fidelity = study_tables()
    main = results[(results["temperature"].fillna(1) == 1) & (results["noise"] == 0)
                   & (results["teacher_kind"] != "base")]
    keys = [f.key for f in summary.findings(main, gain_table(main, fidelity, tau=1.0))]
    assert keys == ["h1", "h3", "h2", "h5"]


def test_the_statistics_notebook_and_report_open_with_these_findings_on_a_recorded_table(tmp_path):
    """papermill runs 50_statistics and 40_ablation on a recorded results table (3 seeds); the
    summary the statistics cell saves equals the numbers computed above from the raw table, and the
    rendered report opens with it."""
    from test_notebook_defaults import NOTEBOOKS, execute

    results, fidelity = study_tables()
    study, fid = tmp_path / "study", tmp_path / "fidelity"
    study.mkdir()
    fid.mkdir()
    results.to_csv(study / "results.csv", index=False)
    # a study folder is known by its params; these tables stand for a micro-study's
    (study / "params.resolved.json").write_text(load_study(PARAMS / "micro.yaml").model_dump_json(indent=1))
    gain_table(results, fidelity, tau=1.0).to_csv(fid / "gains.csv", index=False)
    common = dict(study_dir=str(study), fidelity_dir=str(fid), tau="1.0", scorer="generate")
    out = execute(NOTEBOOKS / "50_statistics.ipynb", tmp_path / "statistics.ipynb",
                  cell_dir=str(tmp_path / "statistics"), **common)
    saved = json.loads((tmp_path / "statistics" / "metrics.json").read_text())["summary"]
    expected = summary.findings(results, gain_table(results, fidelity, tau=1.0))
    assert [f["key"] for f in saved] == ["h1", "h3", "h2", "tau", "noise", "base", "h5"]
    fkl = [_overall(results, f"kd/xs<-m/fkl/t1/n0/sft/s{s}") - _overall(results, f"xs/sft/{s}") for s in SEEDS]
    assert (saved[0]["estimate"], saved[0]["ci_low"], saved[0]["ci_high"]) == pytest.approx(_t_ci(fkl))
    assert [f["text"] for f in saved] == [f.text for f in expected]
    shown = [c for c in out["cells"] if "summary" in c["metadata"].get("tags", [])]
    assert len(shown) == 1 and expected[0].text in json.dumps(shown[0]["outputs"])
    execute(NOTEBOOKS / "40_ablation.ipynb", tmp_path / "ablation.ipynb", cell_dir=str(tmp_path / "ablation"),
            **common)
    counts = json.loads((tmp_path / "ablation" / "metrics.json").read_text())
    assert counts["temperature"] == 2 * 4 * 3 and counts["noise"] == 2 * 4 * 3 and counts["teacher_kind"] == 2 * 4 * 3

    # the report: these findings first, in the order computed here, before the table of contents
    cells = [_Executed(stage, tmp_path / f"{stage}.ipynb", study) for stage in ("ablation", "statistics")]
    grid = SimpleNamespace(study_dir=study, cfg=SimpleNamespace(study="recorded"), contamination=None, cells=cells,
                           by_notebook=lambda key: [c for c in cells if c.stage == key])
    page = render_report(grid).read_text()
    top = page[page.index(">Summary<"):page.index(">Contents<")]
    places = [top.index(html.escape(f.text, quote=False)) for f in expected]
    assert places == sorted(places) and page.index(">Contents<") < page.index(">Statistics: which factors")


class _Executed:
    """A stand-in grid cell whose executed notebook is `notebook`."""

    def __init__(self, stage: str, notebook: Path, study: Path) -> None:
        self.stage, self.name, self.id = stage, stage, stage
        (study / stage).mkdir(exist_ok=True)
        (study / stage / "notebook.ipynb").write_text(notebook.read_text())

    def output_dir(self, study: Path) -> Path:
        return study / self.stage


def test_a_collapsed_method_is_named_with_its_measured_answer_rate():
    results, _ = study_tables()
    shift = results["model"].str.startswith("kd/xs<-m/rkl/t1/n0/sft/")
    results.loc[shift, "accuracy"] = 2.0  # rkl from micro-m collapses on every seed
    models = summary.run_averages(results)
    rates = {m: (0.25 if "/rkl/" in m else 0.99) for m in models["model"]}
    found = summary.collapses(models, rates.__getitem__)
    assert [f.key for f in found] == ["collapse rkl m->xs"]
    sft = np.mean([_overall(results, f"xs/sft/{s}") for s in SEEDS])
    assert found[0].estimate == pytest.approx(2.0 - sft) and found[0].n == 3 and found[0].matches is False
    assert "(3 of 3 seeds) averages 2.0% against SFT" in found[0].text
    assert "extractable answer on 25% of test items against 99% for SFT" in found[0].text
