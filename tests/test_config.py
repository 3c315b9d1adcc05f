"""Typed study parameters (kd_utils.config): every mistake in a params file is reported with
the file, the key and a suggestion before any compute starts; notebook jobs validate the same way."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from kd_utils.config import (CacheJob, DistillJob, EvalJob, ModelJob, PretrainJob, StudyConfig, TrainingConfig,
                             job_from_namespace, load_study, notebook_parameter_names, validate_job)

PARAMS = sorted((Path(__file__).resolve().parents[1] / "params").glob("*.yaml"))

BASE = {
    "study": "tiny",
    "world": {"n_train": 10, "n_test": 5},
    "models": {"micro-s": {"micro": "micro-s"}, "micro-xs": {"micro": "micro-xs"}, "micro-m": {"micro": "micro-m"}},
    "teachers": ["micro-m", "micro-s"],
    "students": ["micro-xs", "micro-s"],
    "training": {"steps": 10},
}


def _write(tmp_path: Path, cfg) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def _error(tmp_path: Path, **changes) -> str:
    path = _write(tmp_path, {**BASE, **changes})
    with pytest.raises(ValueError) as err:
        load_study(path)
    msg = str(err.value)
    assert str(path) in msg, "the error names the params file"
    return msg


# --- a valid study ------------------------------------------------------------------------------

def test_a_minimal_study_loads_with_defaults_and_default_pairs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_study(_write(tmp_path, BASE))
    assert isinstance(cfg, StudyConfig) and cfg.study == "tiny"
    assert cfg.kd_pairs() == [("micro-m", "micro-xs"), ("micro-m", "micro-s"), ("micro-s", "micro-xs")]
    assert cfg.kd.methods == ["fkl", "rkl", "gkd"] and cfg.training.lr == 3e-4


def test_overrides_replace_top_level_sections(tmp_path):
    cfg = load_study(_write(tmp_path, BASE), overrides={"training": {"steps": 3}, "seeds": [1, 2]})
    assert cfg.training.steps == 3 and cfg.seeds == [1, 2]


def test_per_model_steps_and_batch_sizes_are_read_and_a_missing_or_unknown_model_is_named(tmp_path):
    per_model = {"steps": {"micro-xs": 5, "micro-s": 7, "micro-m": 9}, "batch_size": {"micro-xs": 4, "micro-s": 4,
                                                                                     "micro-m": 8}}
    cfg = load_study(_write(tmp_path, {**BASE, "training": per_model}))
    assert (cfg.steps_for("micro-xs"), cfg.steps_for("micro-m")) == (5, 9)
    assert (cfg.training.batch_for("micro-s"), cfg.training.batch_for("micro-m")) == (4, 8)
    assert load_study(_write(tmp_path, BASE)).steps_for("micro-m") == 10
    for key in ("steps", "batch_size"):
        missing = {**per_model, key: {"micro-xs": 5, "micro-s": 7}}
        with pytest.raises(ValueError, match=rf"training.{key} has no entry for \['micro-m'\]"):
            load_study(_write(tmp_path, {**BASE, "training": missing}))
        typo = {**per_model, key: {**per_model[key], "micro-mm": 3}}
        with pytest.raises(ValueError, match=rf"training.{key}: 'micro-mm' is not in models.*micro-m"):
            load_study(_write(tmp_path, {**BASE, "training": typo}))
    with pytest.raises(ValueError, match="training.batch_size.micro-s must be positive"):
        load_study(_write(tmp_path, {**BASE, "training": {**per_model, "batch_size": {**per_model["batch_size"],
                                                                                      "micro-s": 0}}}))


# --- file-level errors --------------------------------------------------------------------------

def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_study(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,match", [("study: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping")])
def test_malformed_yaml_raises_value_error_naming_the_file(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as err:
        load_study(path)
    assert str(path) in str(err.value)


# --- typos and unknown names --------------------------------------------------------------------

@pytest.mark.parametrize("changes,key,suggestion", [
    ({"trainig": {"steps": 3}}, "trainig", "training"),
    ({"training": {"steps": 10, "batch_sise": 8}}, "training.batch_sise", "batch_size"),
    ({"training": {"steps": 10, "lora": {"alhpa": 16}}}, "training.lora.alhpa", "alpha"),
    ({"kd": {"temperatrues": [2.0]}}, "kd.temperatrues", "temperatures"),
    ({"evaluation": {"max_new_token": {}}}, "evaluation.max_new_token", "max_new_tokens"),
    ({"ablations": [{"name": "a", "metods": ["fkl"]}]}, "ablations.0.metods", "methods"),
    ({"models": {**BASE["models"], "micro-s": {"mikro": "micro-s"}}}, "models.micro-s.mikro", "micro"),
])
def test_a_typo_key_is_unknown_with_a_did_you_mean(tmp_path, changes, key, suggestion):
    msg = _error(tmp_path, **changes)
    assert f"{key}: unknown key (did you mean {suggestion!r}?)" in msg, msg


def test_an_unknown_kd_method_gets_a_suggestion_and_the_known_list(tmp_path):
    msg = _error(tmp_path, kd={"methods": ["fkl", "rkll"]})
    assert "'rkll'" in msg and "did you mean 'rkl'" in msg and "skew_fkl" in msg


def test_sft_as_a_kd_method_is_rejected_without_suggesting_itself(tmp_path):
    msg = _error(tmp_path, kd={"methods": ["sft"]})
    assert "'sft'" in msg and "did you mean 'sft'" not in msg


@pytest.mark.parametrize("changes,name", [
    ({"teachers": ["micro-l"]}, "micro-l"),
    ({"students": ["micro-xs", "micro-S"]}, "micro-S"),
    ({"pairs": [["micro-m", "micro-xxs"]]}, "micro-xxs"),
    ({"ablations": [{"name": "gap", "pairs": [["micro-q", "micro-xs"]]}]}, "micro-q"),
    ({"pretrain": {"steps": {"micro-mm": 5}}}, "micro-mm"),
])
def test_a_model_name_not_in_models_is_named(tmp_path, changes, name):
    msg = _error(tmp_path, **changes)
    assert f"{name!r} is not in models" in msg, msg


def test_a_near_miss_model_name_gets_a_suggestion(tmp_path):
    assert "did you mean 'micro-s'" in _error(tmp_path, students=["micro-S"])


@pytest.mark.parametrize("spec,match", [({"micro": "micro-s", "path": "Qwen/Qwen2.5-0.5B"}, "exactly one"),
                                        ({}, "exactly one"), ({"micro": "micro-xxl"}, "micro-xs"),
                                        ({"gguf": "a.gguf", "path": "Qwen/Qwen2.5-0.5B"}, "exactly one"),
                                        ({"prune": {"model": "micro-m", "keep": 0}}, "greater than 0"),
                                        ({"prune": {"model": "micro-m", "keep": 2, "rule": "middle"}}, "'even'")])
def test_a_model_spec_needs_exactly_one_known_source(tmp_path, spec, match):
    assert match in _error(tmp_path, models={**BASE["models"], "micro-s": spec})


def test_a_pruned_model_names_an_unpruned_source_in_models(tmp_path):
    msg = _error(tmp_path, models={**BASE["models"], "p": {"prune": {"model": "micro-mm", "keep": 2}}})
    assert "models.p.prune.model: 'micro-mm' is not in models (did you mean 'micro-m'?)" in msg
    msg = _error(tmp_path, models={**BASE["models"], "p": {"prune": {"model": "micro-m", "keep": 2}},
                                   "q": {"prune": {"model": "p", "keep": 1}}})
    assert "'p' is itself pruned" in msg


def test_pruned_models_fine_tune_every_weight_unless_told_otherwise():
    from kd_utils.config import ModelSpec
    pruned = ModelSpec(prune={"model": "t", "keep": 2})
    assert not pruned.uses_lora(training_lora=True)
    assert ModelSpec(prune={"model": "t", "keep": 2}, finetune="lora").uses_lora(training_lora=False)
    assert ModelSpec(path="x").uses_lora(training_lora=True) and not ModelSpec(path="x").uses_lora(False)
    assert not ModelSpec(path="x", finetune="full").uses_lora(training_lora=True)


def test_micro_models_need_a_world_section(tmp_path):
    cfg = {k: v for k, v in BASE.items() if k != "world"}
    path = _write(tmp_path, cfg)
    with pytest.raises(ValueError, match="world"):
        load_study(path)


def test_hub_models_need_no_world_section(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "q0.5").mkdir()
    cfg = {**{k: v for k, v in BASE.items() if k != "world"},
           "models": {"big": {"path": "Qwen/Qwen2.5-7B"}, "small": {"path": str(tmp_path / "q0.5")}},
           "teachers": ["big"], "students": ["small"]}
    assert load_study(_write(tmp_path, cfg)).kd_pairs() == [("big", "small")]


def test_a_missing_local_model_path_is_named(tmp_path):
    cfg = {**{k: v for k, v in BASE.items() if k != "world"},
           "models": {"big": {"path": str(tmp_path / "nowhere")}, "small": {"path": str(tmp_path)}},
           "teachers": ["big"], "students": ["small"]}
    assert "models.big.path" in _error(tmp_path, **cfg) and "does not exist" in _error(tmp_path, **cfg)


@pytest.mark.parametrize("training", [{"steps": 10, "epochs": 2}, {"lr": 1e-3}])
def test_training_needs_exactly_one_of_steps_or_epochs(tmp_path, training):
    assert "exactly one of 'steps' or 'epochs'" in _error(tmp_path, training=training)


@pytest.mark.parametrize("kd", [{"temperatures": [0.0]}, {"temperatures": [2.0, -1.0]}, {"lmbda": 1.5},
                                {"cache_k": 0}, {"teacher_kinds": ["raw"]}])
def test_out_of_range_kd_options_are_rejected(tmp_path, kd):
    assert "kd." in _error(tmp_path, kd=kd)


# --- size warnings -------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs,warned", [
    ([["micro-s", "micro-m"]], True),     # student larger
    ([["micro-s", "micro-xs"], ["micro-m", "micro-s"]], False),
])
def test_a_student_larger_than_its_teacher_warns_naming_both(tmp_path, pairs, warned):
    path = _write(tmp_path, {**BASE, "pairs": pairs})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_study(path)
    messages = [str(w.message) for w in caught]
    if warned:
        assert any("'micro-m'" in m and "'micro-s'" in m and "not smaller" in m for m in messages), messages
    else:
        assert not messages, messages


def test_a_student_as_large_as_its_teacher_warns(tmp_path):
    cfg = {**BASE, "models": {**BASE["models"], "other-s": {"micro": "micro-s"}}, "pairs": [["micro-s", "other-s"]]}
    with pytest.warns(UserWarning, match="not smaller"):
        load_study(_write(tmp_path, cfg))


# --- DistillJob and notebook namespaces ----------------------------------------------------------

TRAINING = {"steps": 5}


@pytest.mark.parametrize("method", ["fkl", "rkl", "gkd", "seqkd", "tvd"])
def test_a_kd_job_requires_a_teacher_path(method):
    with pytest.raises(ValueError, match="teacher_path"):
        DistillJob(student="s", student_path="/m/s", method=method, training=TRAINING)
    job = DistillJob(student="s", student_path="/m/s", method=method, teacher="t", teacher_path="/m/t",
                     training=TRAINING)
    assert job.method == method and isinstance(job.training, TrainingConfig)


def test_an_sft_job_needs_no_teacher():
    assert DistillJob(student="s", student_path="/m/s", training=TRAINING).method == "sft"


def test_a_job_with_an_unknown_method_gets_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'gjsd'"):
        DistillJob(student="s", student_path="/m/s", method="gjds", teacher_path="/m/t", training=TRAINING)


def test_a_job_temperature_must_be_among_its_cache_temperatures():
    with pytest.raises(ValueError, match="cache_temperatures"):
        DistillJob(student="s", student_path="/m/s", method="fkl", teacher_path="/m/t", temperature=5.0,
                   cache_temperatures=[1.0, 2.0], training=TRAINING)
    DistillJob(student="s", student_path="/m/s", method="fkl", teacher_path="/m/t", temperature=2.0,
               cache_temperatures=[1.0, 2.0], training=TRAINING)


def test_job_from_namespace_takes_the_fields_and_ignores_other_variables():
    namespace = {"student": "micro-xs", "student_path": "/m/xs", "method": "rkl", "teacher": "micro-s",
                 "teacher_path": "/m/s", "temperature": 2.0, "training": {"steps": 7, "lr": 1e-3},
                 "kd": {"lmbda": 0.25}, "In": [], "np": object(), "_": None}
    job = job_from_namespace(DistillJob, namespace, "10_distill.ipynb")
    assert (job.student, job.method, job.temperature, job.training.steps, job.kd.lmbda) == (
        "micro-xs", "rkl", 2.0, 7, 0.25)


def test_job_from_namespace_names_the_source_and_the_bad_key():
    namespace = {"student": "micro-xs", "training": {"steps": 7, "lr": -1.0}}
    with pytest.raises(ValueError) as err:
        job_from_namespace(DistillJob, namespace, "10_distill.ipynb")
    msg = str(err.value)
    assert "10_distill.ipynb" in msg and "student_path" in msg and "training.lr" in msg


def test_job_from_namespace_suggests_for_a_nested_typo():
    namespace = {"student": "s", "student_path": "/m/s", "training": {"steps": 7, "warmup_step": 3}}
    with pytest.raises(ValueError, match=r"training.warmup_step: unknown key \(did you mean 'warmup_steps'\?\)"):
        job_from_namespace(DistillJob, namespace, "nb")


def test_eval_job_from_namespace():
    job = job_from_namespace(EvalJob, {"model": "m", "model_path": "/m", "kind": "kd", "student": "s",
                                       "evaluation": {"limit": 3}}, "20_evaluate.ipynb")
    assert job.kind == "kd" and job.evaluation.limit == 3
    with pytest.raises(ValueError, match="kind"):
        job_from_namespace(EvalJob, {"model": "m", "model_path": "/m", "kind": "teacher", "student": "s"}, "nb")


def test_a_job_round_trips_through_json():
    """Jobs travel to notebooks as plain parameters: dump -> validate gives the same job."""
    job = DistillJob(student="s", student_path="/m/s", method="gkd", teacher_path="/m/t", training=TRAINING,
                     kd={"lmbda": 1.0})
    again = job_from_namespace(DistillJob, json.loads(job.model_dump_json()), "nb")
    assert again == job


def test_a_parameter_that_is_not_a_field_is_an_error_naming_it_with_a_suggestion():
    namespace = {"student": "s", "student_path": "/m/s", "training": TRAINING, "temprature": 2.0}
    with pytest.raises(ValueError) as err:
        job_from_namespace(DistillJob, namespace, "10_distill parameters",
                           names=["student", "student_path", "training", "temprature", "cell_dir", "rerun"])
    msg = str(err.value)
    assert msg.startswith("invalid params in 10_distill parameters:")
    assert "temprature: unknown parameter (did you mean 'temperature'?)" in msg
    assert "cell_dir" not in msg.splitlines()[1] and "rerun:" not in msg  # the notebook's own names are fine


def test_unknown_parameters_and_invalid_values_are_reported_together():
    with pytest.raises(ValueError) as err:
        job_from_namespace(ModelJob, {"model": "m", "keep": 3}, "02_model parameters", names=["model", "kepp", "rerun"])
    msg = str(err.value)
    assert "kepp: unknown parameter (did you mean 'keep'?)" in msg
    assert "rerun: unknown parameter" in msg  # 02_model re-runs no cell: `rerun` is not its own
    assert "exactly one of 'gguf'" in msg


def test_the_parameters_a_kernel_ran_are_read_from_its_input_history():
    """In a notebook the names come from `In`: papermill's injected cell ('# Parameters') and the
    parameters cell (only `name = literal` lines); imports, other variables and scratch cells are not parameters."""
    parameters_cell = 'student = "micro-s"\nstudent_path = "/m/s"\ntraining = {"steps": 5}'
    scratch = "x = 5"
    current = "import json\njob = job_from_namespace(DistillJob, globals(), 'nb')"
    namespace = {"student": "micro-s", "student_path": "/m/s", "training": TRAINING, "json": json, "x": 5}
    ok = ["", parameters_cell, '# Parameters\ncell_dir = "/tmp/c"\nstudy_dir = "/tmp/s"\n', scratch, current]
    assert notebook_parameter_names({**namespace, "In": ok}, DistillJob) == {
        "student", "student_path", "training", "cell_dir", "study_dir"}
    assert job_from_namespace(DistillJob, {**namespace, "In": ok}, "nb").student == "micro-s"
    injected = ["", parameters_cell, '# Parameters\nstudnet = "micro-xs"\ncell_dir = "/tmp/c"\n', current]
    with pytest.raises(ValueError, match=r"studnet: unknown parameter \(did you mean 'student'\?\)"):
        job_from_namespace(DistillJob, {**namespace, "In": injected}, "nb")
    declared = ["", parameters_cell + "\nteacher_knd = 'sft'", current]
    with pytest.raises(ValueError, match=r"teacher_knd: unknown parameter \(did you mean 'teacher_kind'\?\)"):
        job_from_namespace(DistillJob, {**namespace, "In": declared}, "nb")
    edited = declared[:2] + [parameters_cell, current]  # the parameters cell run again, fixed
    assert job_from_namespace(DistillJob, {**namespace, "In": edited}, "nb").student == "micro-s"


def test_pretrain_and_cache_jobs_validate_their_notebooks_parameters():
    job = PretrainJob(model="m", micro="micro-s", world_dir="/w", pretrain={"lr": 1e-3}, steps=10)
    assert job.params() == {"model": "m", "micro": "micro-s", "world_dir": "/w", "seed": 0, "steps": 10,
                            "pretrain": {"lr": 1e-3, "batch_size": 32, "block": 64, "warmup_steps": 50}}
    with pytest.raises(ValueError, match="did you mean 'micro-s'"):
        validate_job(PretrainJob, {**job.params(), "micro": "micro-ss"}, "01_pretrain parameters")
    with pytest.raises(ValueError, match=r"pretrain.steps: unknown key"):  # steps are the job's own
        validate_job(PretrainJob, {**job.params(), "pretrain": {"steps": {"m": 3}}}, "01_pretrain parameters")
    cache = CacheJob(teacher="t", teacher_path="/m/t", teacher_kind="sft", temperatures=[1.0, 2.0], training=TRAINING)
    assert "memory" not in cache.params()  # the default budget keeps the cells' ids
    assert validate_job(CacheJob, {**cache.params(), "memory": {"chunk_mb": 64}}, "nb").params()["memory"] == {
        "chunk_mb": 64}
    for bad in ({"temperatures": []}, {"temperatures": [0.0]}, {"teacher_kind": ""}, {"noise": -1.0}):
        with pytest.raises(ValueError):
            validate_job(CacheJob, {**cache.params(), **bad}, "05_teacher_cache parameters")


# --- the project's params files -----------------------------------------------------------------

@pytest.mark.skipif(not PARAMS, reason="no params/*.yaml in this checkout")
@pytest.mark.parametrize("path", PARAMS, ids=[p.name for p in PARAMS])
def test_every_params_file_loads_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_study(path)
    assert cfg.kd_pairs(), "a study distills at least one pair"
    for teacher, student in cfg.kd_pairs():
        assert teacher in cfg.models and student in cfg.models and teacher != student
        if isinstance(cfg.training.steps, dict):
            assert cfg.steps_for(student) > 0


def _micro_params():
    out = []
    for p in PARAMS:
        raw = yaml.safe_load(p.read_text()) or {}
        if raw.get("world"):
            big = raw["world"].get("corpus_lines", 60000) > 10_000
            marks = [pytest.mark.slow] if big else []
            out.append(pytest.param(p, marks=marks, id=p.name))
    return out


@pytest.mark.skipif(not _micro_params(), reason="no micro params files")
@pytest.mark.parametrize("path", _micro_params())
def test_micro_world_examples_fit_the_training_max_length(path, tmp_path):
    """With the study's own world and tokenizer, no training or test example is truncated."""
    from kd_utils.models import load_tokenizer
    from kd_utils.prepare import build_world
    from kd_utils.tasks import resolve_tasks, training_pairs

    cfg = load_study(path)
    build_world(cfg.world, tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer")
    too_long = {}
    for task in resolve_tasks("micro"):
        for split in ("train", "test"):
            items = json.loads((tmp_path / "data" / task.name / f"{split}.json").read_text())
            prompts, responses = training_pairs(items)
            prompts, responses = tok(prompts)["input_ids"], tok(responses, add_special_tokens=False)["input_ids"]
            longest = max(len(p) + len(r) + 1 for p, r in zip(prompts, responses))  # + eos
            if longest > cfg.training.max_length:
                too_long[f"{task.name}/{split}"] = longest
    assert not too_long, f"max_length {cfg.training.max_length}: {too_long}"


@pytest.mark.parametrize("method,authors,tau", [("gkd", True, 1.0), ("gkd", False, 2.0), ("fkl", True, 2.0)])
def test_under_authors_gkd_applies_no_temperature(method, authors, tau):
    """Their kd_trainer calls generalized_jsd_loss without the temperature: GKD 'tau 2' runs are tau 1."""
    from kd_utils.distill import effective_temperature
    job = DistillJob(student="s", student_path="p", method=method, teacher="t", teacher_path="q",
                     temperature=2.0, training=TrainingConfig(steps=1), authors=authors)
    assert effective_temperature(job) == tau


def test_the_statistics_scorer_is_one_the_evaluation_ran(tmp_path):
    cfg = load_study(_write(tmp_path, BASE))
    assert cfg.stats.scorer_of(cfg.evaluation) == "generate"
    msg = _error(tmp_path, stats={"scorer": "loglik"})
    assert "stats.scorer: 'loglik' is not among the evaluation's scorers ['generate']" in msg
    cfg = load_study(_write(tmp_path, {**BASE, "stats": {"scorer": "loglik"},
                                       "evaluation": {"extra_scorers": ["loglik"]}}))
    assert cfg.stats.scorer_of(cfg.evaluation) == "loglik"


def test_validating_params_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from kd_utils.config import load_study; "
            "[load_study(p) for p in ('params/micro.yaml', 'params/paper_qwen_math.yaml')]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
