"""Exploring a finished study from a notebook.

    study = open_study("micro")        # outputs/micro, read through its own params.resolved.json
    study.plan                         # every cell with its status
    study.results, study.fidelity      # the tidy tables
    cell = study.cell("kd/micro-xs<-micro-m/fkl/t1/n0/sft/s0")   # a name, id, model name or glob
    cell.parameters, cell.metrics, cell.history, cell.predictions, cell.load_model()
    study.pairs()                      # every student beside its teacher: accuracy, agreement, BLEU, paradox counts
    study.compare(student)             # per item: prompt, gold, both outputs, who is right, agreement, BLEU

The notebooks start with `at_repo_root(cell_dir)`, so relative paths mean the repository root
whether the kernel runs in notebooks/ (JupyterLab) or at the root (the grid), and with
`rerun_parameters` they re-run a cell of the study when opened as they are.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

import numpy as np
import pandas as pd

from .config import load_study
from .grid import REPO, expand
from .engine.cells import Cell
from .engine.plan import plan

#: Below this sentence BLEU (0-100) against the teacher's output, an agreeing answer counts as
#: reached by another rationale.
OTHER_RATIONALE_BELOW = 50.0
STUDENT_ONLY = "student right, teacher wrong"
OTHER_RATIONALE = "same answer, other rationale"
#: What `select` (and the explore notebook's `show`) can keep.
SHOW = ("paradox", "all", STUDENT_ONLY, OTHER_RATIONALE)


class StudyNotReady(Exception):
    """A study, or a cell of it, that has not run yet; the message is one sentence saying what to run."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows this line instead of a traceback."""
        return [f"{type(self).__name__}: {self}"]


def repo_path(path: str | os.PathLike) -> Path:
    """`path` as is when absolute, else relative to the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO / path


def at_repo_root(cell_dir: str | os.PathLike) -> str:
    """Make the repository root the working directory, as in grid runs, so that every relative path
    parameter means the same from JupyterLab (whose kernels start in notebooks/); return cell_dir
    resolved and created."""
    os.chdir(REPO)
    out = repo_path(cell_dir)
    out.mkdir(parents=True, exist_ok=True)
    return str(out)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _outputs(outputs: str | os.PathLike | None = None) -> Path:
    """The outputs root: `outputs`, else $KD_OUTPUTS, else outputs/ (as `python -m kd_utils.grid`)."""
    return repo_path(outputs or os.environ.get("KD_OUTPUTS") or "outputs")


def _todo(study_dir: Path) -> str:
    """The command that makes a study: `make study` or `make quick` for theirs, else its grid run."""
    make = {"micro": "make study", "micro_quick": "make quick"}
    if study_dir.name in make and study_dir.parent == _outputs().resolve():
        return make[study_dir.name]
    params = REPO / "params" / f"{study_dir.name}.yaml"
    return f"python -m kd_utils.grid run {_shown(params) if params.is_file() else '<its params file>'}"


def open_study(study: str | os.PathLike = "micro", outputs: str | os.PathLike | None = None) -> "Study":
    """A study by name (a folder of `outputs`, default $KD_OUTPUTS or outputs/) or by path (relative to the
    repository root). Raises StudyNotReady when it has not been run."""
    given = Path(study)
    folder = (_outputs(outputs) / given if len(given.parts) == 1 else repo_path(given)).resolve()
    if not (folder / "params.resolved.json").is_file():
        raise StudyNotReady(f"There is no study at {_shown(folder)} yet: run `{_todo(folder)}` first.")
    return Study(folder)


def rerun_parameters(study_dir: str | os.PathLike, cell: str) -> dict:
    """The parameters of a finished cell of a study (see `Study.cell`), for a notebook to run it again."""
    found = open_study(study_dir).cell(cell)
    found.require_done()
    print(f"Re-running {found.name} of {_shown(found.study.dir)} (cell {found.id}) with its parameters.")
    return dict(found.parameters)


class Study:
    """A study's outputs folder, read through the params it ran with (`params.resolved.json`).

    Pass `grid` (a `kd_utils.grid.Grid` of this folder) to skip expanding the params again."""

    def __init__(self, study_dir: str | os.PathLike, grid=None):
        self.dir = Path(study_dir).resolve()
        self._grid = grid

    def __repr__(self) -> str:
        return f"Study({_shown(self.dir)!r})"

    @property
    def grid(self):
        """The study's cells, expanded from its params as `python -m kd_utils.grid` does."""
        if self._grid is None:
            self._grid = expand(load_study(self.dir / "params.resolved.json"), self.dir)
        return self._grid

    @property
    def plan(self) -> pd.DataFrame:
        """One row per cell, stage by stage: stage, name, id, status (done, todo, failed-before)."""
        return plan(self.grid.cells, self.dir)

    def _table(self, name: str) -> pd.DataFrame:
        path = self.dir / name
        if not path.is_file():
            raise StudyNotReady(f"{_shown(self.dir)} has no {name} yet: run `{_todo(self.dir)}` first.")
        return pd.read_csv(path)

    @property
    def results(self) -> pd.DataFrame:
        """results.csv: one row per evaluated model and task."""
        return self._table("results.csv")

    @property
    def fidelity(self) -> pd.DataFrame:
        """fidelity.csv: one row per student model, teacher and task."""
        return self._table("fidelity.csv")

    def gains(self, fidelity_dir: str | os.PathLike | None = None) -> pd.DataFrame:
        """gains.csv of the fidelity cell at `fidelity_dir`, else of this study's fidelity cell."""
        folder = repo_path(fidelity_dir) if fidelity_dir else self.cell("fidelity").require_done().dir
        path = folder / "gains.csv"
        if not path.is_file():
            raise StudyNotReady(f"{_shown(path)} does not exist yet: run `{_todo(self.dir)}` first.")
        return pd.read_csv(path)

    def cell(self, key: str) -> "StudyCell":
        """A cell by name, id, model name (results.csv's `model`: its training cell, or its evaluation
        for a base model) or glob over names (the first match in the order the params list them: the main
        grid before the ablations)."""
        cells = self.grid.cells
        by_name = {c.name: c for c in cells}
        found = (next((c for c in cells if c.id == key), None) or by_name.get(key)
                 or self.grid.model_cells.get(key) or by_name.get(f"evaluate/{key}")
                 or next((c for c in cells if fnmatch.fnmatchcase(c.name, key)), None))
        if found is None:
            close = get_close_matches(key, list(by_name), n=3)
            raise KeyError(f"{key!r} is no cell of {self}" + (f"; did you mean {close}?" if close else ""))
        return StudyCell(self, found)

    def _evaluations(self, **where) -> list["StudyCell"]:
        """Evaluate cells whose parameters have the given values, by cell id (as results.collect_fidelity)."""
        return [StudyCell(self, c) for c in sorted(self.grid.by_notebook("evaluate"), key=lambda c: c.id)
                if all(c.parameters[k] == v for k, v in where.items())]

    def teacher_of(self, student: str, teacher: str | None = None) -> "StudyCell":
        """The evaluation fidelity.csv compares `student` with: that of the model named `teacher` (default:
        a KD model's own teacher, an SFT model's first teacher), SFT'd or base as the KD model's teacher was."""
        p = self.cell(student).evaluation.parameters
        kd = p["kind"] == "kd"
        if teacher is None and not kd:
            teachers = sorted({e.parameters["teacher"] for e in self._evaluations(kind="kd", student=p["student"])})
            if not teachers:
                raise ValueError(f"{student!r} is distilled from no teacher in {self}: name one")
            teacher = teachers[0]
        name = teacher or p["teacher"]
        kind = p["teacher_kind"] if kd else "sft"
        found = self._evaluations(kind=kind, student=name)
        if not found:
            raise ValueError(f"{self} evaluates no {kind} model {name!r}")
        return found[0]

    def compare(self, student: str, teacher: str | None = None,
                other_rationale_below: float = OTHER_RATIONALE_BELOW) -> pd.DataFrame:
        """A student (a model name of results.csv, or a cell) and its teacher (see `teacher_of`) side by
        side on the test items both answered (see `side_by_side`). attrs: both models' names in results.csv."""
        from .tasks import load_items

        s, t = self.cell(student).evaluation, self.teacher_of(student, teacher)
        preds = s.predictions
        p = s.parameters
        items = {(task, it["id"]): it for task in preds["task"].unique()
                 for it in load_items(task, p["data_root"] or p["evaluation"]["data_root"],
                                      limit=p["evaluation"]["limit"])}
        out = side_by_side(preds, t.predictions, items, other_rationale_below)
        out.attrs.update(student=p["model"], teacher=t.parameters["model"])
        return out

    def pairs(self, other_rationale_below: float = OTHER_RATIONALE_BELOW) -> pd.DataFrame:
        """One row per student model and teacher of fidelity.csv (means over tasks): the method and tau,
        both accuracies, agreement and BLEU as in fidelity.csv, and the paradox cases among the items."""
        results = self.results
        accuracy = results.groupby("model")["accuracy"].mean()
        runs = results.drop_duplicates("model").set_index("model")
        rows = []
        for (model, teacher), f in self.fidelity.groupby(["model", "teacher"], sort=False):
            items = self.compare(model, teacher, other_rationale_below)
            counts = items["paradox"].value_counts()
            rows.append({"model": model, "teacher": teacher, "method": runs.at[model, "method"],
                         "tau": runs.at[model, "temperature"], "accuracy": accuracy[model],
                         "teacher_accuracy": accuracy[items.attrs["teacher"]], "agreement": f["agreement"].mean(),
                         "bleu": f["bleu"].mean(), STUDENT_ONLY: counts.get(STUDENT_ONLY, 0),
                         OTHER_RATIONALE: counts.get(OTHER_RATIONALE, 0), "items": len(items)})
        return pd.DataFrame(rows).set_index("model")


@dataclass(frozen=True)
class StudyCell:
    """One cell of a study: its parameters, and once it ran, its folder's products."""

    study: Study
    cell: Cell

    def __repr__(self) -> str:
        return f"StudyCell({self.name!r}, id={self.id!r}, {self.status})"

    @property
    def name(self) -> str:
        return self.cell.name

    @property
    def id(self) -> str:
        return self.cell.id

    @property
    def stage(self) -> str:
        return self.cell.stage

    @property
    def parameters(self) -> dict:
        """What the grid passes to the cell's notebook (cell_dir aside)."""
        return dict(self.cell.parameters)

    @property
    def dir(self) -> Path:
        return self.cell.output_dir(self.study.dir)

    @property
    def status(self) -> str:
        """done, todo or failed-before (a `<id>.failed/` folder holds its traceback)."""
        if self.cell.is_complete(self.study.dir):
            return "done"
        return "failed-before" if (self.study.dir / self.stage / f"{self.id}.failed").is_dir() else "todo"

    def require_done(self) -> "StudyCell":
        if self.status != "done":
            raise StudyNotReady(f"Cell {self.name} of {_shown(self.study.dir)} has not run yet: "
                                f"run `{_todo(self.study.dir)}` first.")
        return self

    @property
    def notebook(self) -> Path:
        """The executed notebook: every number of the cell, with the parameters it ran with."""
        return self.require_done().dir / "notebook.ipynb"

    @property
    def metrics(self) -> dict:
        return json.loads((self.require_done().dir / "metrics.json").read_text())

    @property
    def history(self) -> pd.DataFrame:
        """The loss curve of a training cell (pretraining, SFT, KD): step, loss, lr, seconds, val_loss."""
        metrics = self.metrics
        if "history" not in metrics:
            raise ValueError(f"cell {self.name} trains nothing: it has no loss history")
        return pd.DataFrame(metrics["history"])

    @property
    def model_path(self) -> str:
        """The model the cell made (training, model preparation) or evaluated (evaluation)."""
        if "model_path" in self.cell.parameters:
            return self.cell.parameters["model_path"]
        path = self.dir / "model"
        if not path.is_dir():
            raise ValueError(f"cell {self.name} makes no model")
        return str(path)

    @property
    def evaluation(self) -> "StudyCell":
        """The evaluate cell of this cell's model (itself for an evaluate cell)."""
        if "model_path" in self.cell.parameters:
            return self
        path = str(self.dir / "model")
        for c in self.study.grid.by_notebook("evaluate"):
            if c.parameters["model_path"] == path:
                return StudyCell(self.study, c)
        raise ValueError(f"no cell of {self.study} evaluates the model of {self.name}")

    @property
    def predictions(self) -> pd.DataFrame:
        """predictions.jsonl of the cell's evaluation: one row per test item."""
        from .evaluation import load_predictions
        return load_predictions(self.evaluation.require_done().dir)

    def load_model(self, **kwargs):
        """(model, tokenizer) of `model_path`; keyword arguments go to `kd_utils.models.load_model`."""
        from .models import load_model
        self.require_done()
        return load_model(self.model_path, **kwargs)


def side_by_side(student: pd.DataFrame, teacher: pd.DataFrame, items: dict,
                 other_rationale_below: float = OTHER_RATIONALE_BELOW) -> pd.DataFrame:
    """Two models' predictions (frames of predictions.jsonl) matched by (task, item_id), one row per item:
    task, item_id, prompt (instruction and input of `items[(task, item_id)]`, without the template), gold,
    both outputs and extracted answers, `right` (both, teacher, student, neither), `agree` (same answer,
    as fidelity.csv), `bleu` (sentence BLEU of the student's output against the teacher's, 0-100) and
    `paradox`: STUDENT_ONLY, OTHER_RATIONALE (agreeing answers under `other_rationale_below` BLEU) or ""."""
    import sacrebleu

    from .evaluation import prompt_hash
    from .fidelity import same_answer
    from .tasks import build_prompt

    both = student.merge(teacher, on=["task", "item_id"], suffixes=("_s", "_t"))
    rows = [items[key] for key in zip(both["task"], both["item_id"])]
    hashes = [prompt_hash(build_prompt(it["instruction"], it["input"])) for it in rows]
    if hashes != list(both["prompt_hash_s"]) or hashes != list(both["prompt_hash_t"]):
        raise ValueError("the items' prompts are not those both models were evaluated on")
    out = pd.DataFrame({
        "task": both["task"], "item_id": both["item_id"],
        "prompt": [it["instruction"] + (f"\n{it['input']}" if it["input"] else "") for it in rows],
        "gold": both["label_s"].astype(str), "teacher_output": both["output_t"].fillna(""),
        "student_output": both["output_s"].fillna(""), "teacher_answer": both["extracted_t"],
        "student_answer": both["extracted_s"]})
    cs, ct = both["correct_s"].to_numpy(bool), both["correct_t"].to_numpy(bool)
    out["right"] = np.select([cs & ct, ct, cs], ["both", "teacher", "student"], "neither")
    out["agree"] = [same_answer(a, b) for a, b in zip(both["extracted_s"], both["extracted_t"])]
    out["bleu"] = [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(out["student_output"], out["teacher_output"])]
    other = out["agree"].to_numpy(bool) & (out["bleu"].to_numpy() < other_rationale_below)
    out["paradox"] = np.select([cs & ~ct, other], [STUDENT_ONLY, OTHER_RATIONALE], "")
    return out


def select(items: pd.DataFrame, show: str = "paradox", task: str = "") -> pd.DataFrame:
    """Rows of `Study.compare` to look at: `show` one of SHOW ("paradox": both kinds), `task` "" for all."""
    if show not in SHOW:
        raise ValueError(f"show={show!r}: use one of {SHOW}")
    if show == "paradox":
        items = items[items["paradox"] != ""]
    elif show != "all":
        items = items[items["paradox"] == show]
    return items[items["task"] == task] if task else items


def browser(study: Study, pairs: pd.DataFrame, other_rationale_below: float = OTHER_RATIONALE_BELOW):
    """Widgets over `study.compare`: pick a pair (a row of `pairs`), what to show and a task."""
    import ipywidgets as w
    from IPython.display import display

    pair = w.Dropdown(options=[(f"{m}  <-  {t}", (m, t)) for m, t in zip(pairs.index, pairs["teacher"])],
                      description="pair", layout=w.Layout(width="90%"))
    show = w.ToggleButtons(options=SHOW, description="show")
    task = w.Dropdown(options=[("all", "")] + [(t, t) for t in sorted(study.results["task"].unique())],
                      description="task")
    compared: dict[tuple[str, str], pd.DataFrame] = {}

    def view(pair, show, task):
        if pair not in compared:
            compared[pair] = study.compare(*pair, other_rationale_below=other_rationale_below)
        rows = select(compared[pair], show, task)
        print(f"{len(rows)} of {len(compared[pair])} items")
        with pd.option_context("display.max_colwidth", None, "display.max_rows", 200):
            display(rows)

    out = w.interactive_output(view, {"pair": pair, "show": show, "task": task})
    return w.VBox([pair, show, task, out])
