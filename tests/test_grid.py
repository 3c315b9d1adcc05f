"""The grid: params -> cells, dependencies, stable ids, validation before compute, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMOLLM2_GGUF, needs_smollm2
from kd_utils.config import load_study
from kd_utils.grid import NB, expand, main

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    cfg = load_study(PARAMS / "micro.yaml")
    return cfg, expand(cfg, tmp_path_factory.mktemp("study"))


def test_every_dependency_is_a_cell_of_the_grid(micro):
    _, g = micro
    ids = {c.id for c in g.cells}
    assert all(d in ids for c in g.cells for d in c.deps)
    assert len(ids) == len(g.cells)


def test_stages_follow_the_paper_pipeline(micro):
    cfg, g = micro
    stages = {c.stage for c in g.cells}
    assert stages == {"prepare", "distill", "evaluate", "fidelity", "statistics"}
    # SFT'd teachers (their first seed) are prepared before the distill stage; students' SFT baselines
    # of every other seed are distill cells.
    for c in g.cells:
        if c.name.startswith("sft/"):
            model = c.parameters["student"]
            teacher = model in cfg.teachers and c.parameters["seed"] == cfg.seeds[0]
            assert c.stage == ("prepare" if teacher else "distill"), c.name


def test_kd_cells_cover_pairs_methods_and_temperatures(micro):
    cfg, g = micro
    main_kd = [c for c in g.cells if c.name.startswith("kd/") and c.parameters["noise"] == 0
               and c.parameters["teacher_kind"] == "sft"]
    expected = {(t, s, m, tau) for t, s in cfg.kd_pairs() for m in cfg.kd.methods for tau in cfg.kd.temperatures}
    got = {(c.parameters["teacher"], c.parameters["student"], c.parameters["method"], c.parameters["temperature"])
           for c in main_kd}
    assert expected <= got


def test_ablations_add_noise_and_base_teacher_cells(micro):
    cfg, g = micro
    noisy = [c for c in g.cells if c.name.startswith("kd/") and c.parameters["noise"] > 0]
    base = [c for c in g.cells if c.name.startswith("kd/") and c.parameters["teacher_kind"] == "base"]
    assert {c.parameters["noise"] for c in noisy} == {n for a in cfg.ablations for n in a.noise or ()} == {5.0}
    assert base and all("/pretrain/" in c.parameters["teacher_path"].replace("\\", "/") or
                        c.parameters["teacher_path"].endswith("model") for c in base)
    assert any(c.name.endswith("/base") and c.stage == "evaluate" for c in g.cells)


def test_reused_teacher_signals_are_cached_and_single_run_ones_run_live(tmp_path):
    """kd.teacher_cache: true caches a signal when its runs would pass more examples through the
    teacher than one build does; gkd reads its gold batches from the cache too. With 2000 items per
    task and one seed, a single run (9,600 examples) costs less than a build (27,720)."""
    raw = yaml.safe_load((PARAMS / "micro.yaml").read_text())
    raw["world"]["n_train"], raw["seeds"] = 2000, [0]
    # both pairs in the main grid, and gkd as an ablation on micro-m -> micro-xs (params/micro_full.yaml's shape)
    raw["pairs"] = [["micro-m", "micro-xs"], ["micro-s", "micro-xs"]]
    raw["ablations"] = [a for a in raw["ablations"] if a["name"] != "teacher_accuracy"] + [
        {"name": "on_policy", "methods": ["gkd"], "pairs": [["micro-m", "micro-xs"]]}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    g = expand(load_study(tmp_path / "p.yaml"), tmp_path / "study")
    caches = {c.id for c in g.cells if c.notebook == NB["cache"]}
    kd = [c for c in g.cells if c.name.startswith("kd/")]
    main = [c for c in kd if c.parameters["noise"] == 0 and c.parameters["teacher_kind"] == "sft"]
    assert {c.parameters["method"] for c in main} == {"fkl", "rkl", "gkd"}
    for c in main:  # micro-m's 5 runs read 43k examples: cached; micro-s's 2 read 19k: live
        cached = c.parameters["teacher"] == "micro-m"
        assert bool(caches & set(c.deps)) == cached and c.parameters["kd"]["teacher_cache"] is cached, c.name
    single = [c for c in kd if c.parameters["noise"] > 0 or c.parameters["teacher_kind"] == "base"]
    assert single
    for c in single:  # one run each
        assert not caches & set(c.deps) and c.parameters["kd"]["teacher_cache"] is False, c.name
    assert any("run live" in n and "micro-m/base/noise 0" in n for n in g.notes)


@pytest.mark.parametrize("setting, cached", [("always", True), (False, False)])
def test_teacher_cache_always_caches_every_signal_and_false_none(tmp_path, setting, cached):
    raw = yaml.safe_load((PARAMS / "micro.yaml").read_text())
    raw["kd"]["teacher_cache"] = setting
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    g = expand(load_study(path), tmp_path)
    caches = {c.id for c in g.cells if c.notebook == NB["cache"]}
    for c in g.cells:
        if c.name.startswith("kd/"):
            assert bool(caches & set(c.deps)) == cached and c.parameters["kd"]["teacher_cache"] is cached, c.name
    assert not any("read by too few runs" in n for n in g.notes)  # nothing is left live by the rule
    assert any("compares the cache with the live teacher" in n for n in g.notes) == cached  # the probe, when cached


def test_one_cache_cell_per_teacher_and_noise_draw(micro):
    """params/micro.yaml (300 items per task): one run's 9,600 examples outweigh a 3,920-example build,
    so every signal is cached: one cell per teacher, kind and noise draw (a noisy signal per seed)."""
    cfg, g = micro
    keys = [(c.parameters["teacher"], c.parameters["teacher_kind"], c.parameters["noise"], c.parameters["noise_seed"])
            for c in g.cells if c.notebook == NB["cache"]]
    assert len(keys) == len(set(keys))
    assert sorted(k[:3] for k in keys) == sorted([("micro-m", "base", 0.0), ("micro-m", "sft", 0.0),
                                                  ("micro-s", "sft", 0.0)] + [("micro-m", "sft", 5.0)] * len(cfg.seeds))


def test_ids_are_stable_and_change_only_with_what_determines_a_cell(tmp_path):
    cfg = load_study(PARAMS / "micro.yaml")
    a = {c.name: c.id for c in expand(cfg, tmp_path).cells}
    assert a == {c.name: c.id for c in expand(load_study(PARAMS / "micro.yaml"), tmp_path).cells}
    raw = yaml.safe_load((PARAMS / "micro.yaml").read_text())
    raw["training"]["steps"]["micro-xs"] += 1
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    b = {c.name: c.id for c in expand(load_study(path), tmp_path).cells}
    assert a["sft/micro-xs/s0"] != b["sft/micro-xs/s0"]
    assert a["sft/micro-m/s0"] == b["sft/micro-m/s0"]  # the teacher is untouched
    assert a["fidelity"] != b["fidelity"]  # the analysis reads new results


def test_plan_prints_stages_and_a_cost_estimate(tmp_path, capsys):
    assert main(["plan", str(PARAMS / "micro_quick.yaml"), "--outputs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "distill", "evaluate", "fidelity", "statistics"):
        assert f"{stage}:" in out
    assert "estimated compute" in out and "GPU-hours" in out
    assert not (tmp_path / "micro_quick").exists()  # planning computes nothing


@pytest.mark.parametrize("preset", sorted(p.name for p in PARAMS.glob("paper_*.yaml")))
def test_paper_presets_plan_offline(preset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # planning needs no download, only the ids
    assert main(["plan", str(PARAMS / preset), "--outputs", str(tmp_path)]) == 0
    assert "GPU-hours" in capsys.readouterr().out


def test_paper_presets_hold_the_papers_eleven_pairs(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    pairs = set()
    for p in PARAMS.glob("paper_*_math.yaml"):
        cfg = load_study(p)
        pairs |= set(cfg.kd_pairs())
        assert cfg.training.lora is not None and cfg.training.lora.r == 8 and cfg.training.lr == 3e-4
        assert cfg.training.batch_size * cfg.training.grad_accum == 16 and cfg.training.max_length == 256
        assert sorted(cfg.kd.temperatures) == [1.0, 2.0, 5.0]
    assert len(pairs) == 11


def test_a_params_typo_fails_before_any_compute_with_a_suggestion(tmp_path):
    raw = yaml.safe_load((PARAMS / "micro_quick.yaml").read_text())
    raw["training"]["learning_rate"] = raw["training"].pop("lr")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "kd_utils.grid", "run", str(path), "--outputs", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "training.learning_rate" in proc.stderr and "unknown key" in proc.stderr
    assert not (tmp_path / "micro_quick").exists()


def test_an_unknown_method_is_named_with_a_suggestion(tmp_path):
    raw = yaml.safe_load((PARAMS / "micro_quick.yaml").read_text())
    raw["kd"]["methods"] = ["fkl", "rkll"]
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"rkll.*did you mean 'rkl'"):
        load_study(path)


def test_an_unreachable_model_fails_validation_before_compute(tmp_path, monkeypatch):
    raw = yaml.safe_load((PARAMS / "paper_llama_math.yaml").read_text())
    raw["models"]["llama-3.2-1b"] = {"path": str(tmp_path / "missing-model")}
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"models\.llama-3\.2-1b\.path: .*missing-model.* does not exist"):
        load_study(path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not a local directory nor in the hub cache, and HF_HUB_OFFLINE=1"):
        load_study(PARAMS / "paper_llama_math.yaml")


def test_a_model_that_is_teacher_and_student_is_trained_once_and_runs_get_their_batch_size(micro):
    cfg, g = micro
    both = set(cfg.teachers) & set(cfg.students)
    assert both, "params/micro.yaml has a model in both roles, as the paper's grid"
    for m in both:
        sft = [c for c in g.cells if c.name.startswith(f"sft/{m}/")]
        assert len(sft) == len(cfg.seeds) and sft[0].stage == "prepare"
        taught = [c for c in g.cells if c.name.startswith("kd/") and c.parameters["teacher"] == m
                  and c.parameters["teacher_kind"] == "sft"]
        assert taught and all(sft[0].id in c.deps for c in taught)
    for c in g.cells:
        if c.name.startswith(("sft/", "kd/")):
            assert c.parameters["training"]["batch_size"] == cfg.training.batch_for(c.parameters["student"]), c.name
    assert {cfg.training.batch_for(m) for m in cfg.models} == {16, 32}


def test_kd_runs_start_from_the_students_sft_of_their_seed_with_student_init_sft(tmp_path):
    raw = yaml.safe_load((PARAMS / "micro.yaml").read_text())
    raw["seeds"], raw["kd"]["student_init"] = [0, 1], "sft"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    g = expand(load_study(tmp_path / "p.yaml"), tmp_path / "study")
    kd = [c for c in g.cells if c.name.startswith("kd/")]
    assert kd and all(c.name.endswith("/from-sft") for c in kd)
    for c in kd:
        p = c.parameters
        sft = g.model_cells[f"{p['student']}/sft/s{p['seed']}"]
        assert sft.id in c.deps and p["student_path"] == str(sft.output_dir(tmp_path / "study") / "model"), c.name
    base = expand(load_study(PARAMS / "micro.yaml"), tmp_path / "base")
    pretrained = {c.parameters["model"]: str(c.output_dir(tmp_path / "base") / "model")
                  for c in base.cells if c.name.startswith("prepare/pretrain/")}
    kd = [c for c in base.cells if c.name.startswith("kd/")]
    assert kd and all(c.parameters["student_path"] == pretrained[c.parameters["student"]] for c in kd)


# --- real models: GGUF files and pruned students ----------------------------------------------------

SMOL = SMOLLM2_GGUF


def _real_study(tmp_path, models, **extra):
    params = {"study": "real", "models": models, "teachers": ["t"], "students": ["s"],
              "training": {"train_data": str(tmp_path / "train.json"), "steps": 5, "batch_size": 2,
                           "lora": {"r": 4}},
              "evaluation": {"tasks": ["boolq"], "data_root": str(tmp_path / "data")}, **extra}
    (tmp_path / "train.json").write_text('[{"instruction": "Is it?", "output": "the correct answer is true"}]')
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_study(path)


@needs_smollm2
def test_a_gguf_teacher_and_its_pruned_student_get_prepare_cells_and_counted_parameters(tmp_path):
    cfg = _real_study(tmp_path, {"t": {"gguf": SMOL}, "s": {"prune": {"model": "t", "keep": 10, "rule": "ends"}}})
    grid = expand(cfg, tmp_path / "out")
    made = {c.parameters["model"]: c for c in grid.by_notebook("model")}
    assert made["t"].parameters["gguf"] == SMOL
    assert made["s"].parameters["keep"] == 10 and made["t"].id in made["s"].deps
    sft = {c.parameters["student"]: c for c in grid.cells if c.name.startswith("sft/")}
    assert sft["t"].parameters["training"]["lora"]["r"] == 4  # the teacher trains LoRA adapters
    assert sft["s"].parameters["training"]["lora"] is None  # the pruned student trains every weight
    flops = {c.name: grid.cost[c.id] for c in grid.cells}
    # 6 x params x tokens: the pruned student keeps the embedding and final norm and 10 of 30 3.54M layers
    assert flops["sft/t/s0"] == pytest.approx(6 * 134_515_008 * 5 * 2 * 256 / 2)
    assert flops["sft/s/s0"] == pytest.approx(6 * (28_311_552 + 576 + 10 * 3_540_096) * 5 * 2 * 256 / 2)


@needs_smollm2
def test_a_prune_spec_keeping_more_layers_than_exist_fails_before_compute(tmp_path, capsys):
    _real_study(tmp_path, {"t": {"gguf": SMOL}, "s": {"prune": {"model": "t", "keep": 40}}})
    assert main(["plan", str(tmp_path / "real.yaml"), "--outputs", str(tmp_path / "out")]) == 2
    assert "models.s.prune: layer pruning keeps 40 layers but the model has 30 ('t')" in capsys.readouterr().err


def test_a_missing_or_corrupt_gguf_fails_before_compute(tmp_path, capsys):
    _real_study(tmp_path, {"t": {"gguf": str(tmp_path / "none.gguf")}, "s": {"prune": {"model": "t", "keep": 2}}})
    assert main(["plan", str(tmp_path / "real.yaml"), "--outputs", str(tmp_path / "out")]) == 2
    assert "none.gguf does not exist" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    _real_study(tmp_path, {"t": {"gguf": str(tmp_path / "bad.gguf")}, "s": {"prune": {"model": "t", "keep": 2}}})
    assert main(["plan", str(tmp_path / "real.yaml"), "--outputs", str(tmp_path / "out")]) == 2
    assert "bad.gguf" in capsys.readouterr().err


def test_a_student_whose_tokenizer_differs_from_the_teachers_fails_before_compute(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for name, text in (("t", "alpha beta gamma delta"), ("s", "one two three four five")):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator([text] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path / name)
    _real_study(tmp_path, {"t": {"path": str(tmp_path / "t")}, "s": {"path": str(tmp_path / "s")}})
    assert main(["plan", str(tmp_path / "real.yaml"), "--outputs", str(tmp_path / "out")]) == 2
    assert "teacher 't'" in (err := capsys.readouterr().err) and "do not share a tokenizer" in err


@needs_smollm2
def test_plan_warns_when_training_examples_exceed_max_length(tmp_path):
    cfg = _real_study(tmp_path, {"t": {"gguf": SMOL}, "s": {"prune": {"model": "t", "keep": 2}}})
    long = [{"instruction": "word " * 300, "output": "the correct answer is true"},
            {"instruction": "Is it?", "output": "the correct answer is true"}]
    (tmp_path / "train.json").write_text(json.dumps(long))
    notes = expand(cfg, tmp_path / "out").notes
    assert any(n.startswith("warning: 1 of 2 training examples exceed training.max_length=256") for n in notes)
