"""The paper's analysis rerun on the authors' published tables.

:func:`load_kd_generalization` reads their math tables (Teacher, Student, Method, tasks...) into
this repository's results and fidelity shapes; ``python -m kd_utils.authors_tables reproduce``
runs the gain table, the hypothesis tests and their sentences on them.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .gains import gain_table, main_condition, parse_tau
from .hypotheses import all_hypotheses
from .prose import describe_hypotheses
from .schema import AVERAGE, FIDELITY_COLUMNS, FIDELITY_KEYS, require_columns

__all__ = ["MATH_TASK_SIZES", "load_kd_generalization", "main"]

#: Items per math test set (the authors' tables hold accuracies only).
MATH_TASK_SIZES = {"gsm8k": 1319, "SVAMP": 1000, "MultiArith": 600, "SingleEq": 508,
                   "AddSub": 395, "AQuA": 254}
_AUTHOR_METHOD = re.compile(r"^student_(KD|RevKD|GKD)(_base_teacher)?_temp_(\d+(?:\.\d+)?)$")
_AUTHOR_NAMES = {"KD": "SeqKD", "RevKD": "RevKD", "GKD": "GKD"}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)B$")
#: fidelity.csv's columns but ROUGE-L, which the authors did not publish.
_AUTHOR_FIDELITY_COLUMNS = [c for c in FIDELITY_COLUMNS if c != "rougeL"]


def _size_b(name: str) -> float:
    m = _SIZE.search(name)
    if not m:
        raise ValueError(f"cannot read a size in billions from model name {name!r}")
    return float(m.group(1))


def _parse_results_table(df: pd.DataFrame, source: str) -> pd.DataFrame:
    require_columns(df, ["Teacher", "Student", "Method", AVERAGE], source)
    tasks = [c for c in df.columns if c not in ("Teacher", "Student", "Method")]
    rows = []
    for _, r in df.iterrows():
        student, method = str(r["Student"]), str(r["Method"])
        teacher, temperature, teacher_kind = "", np.nan, ""
        if method == "BaseModel":
            kind, name, model = "base", "base", f"{student} (base)"
        elif method == "SFT":
            kind, name, model = "sft", "sft", student
        else:
            m = _AUTHOR_METHOD.match(method)
            if not m:
                raise ValueError(f"{source}: unknown Method {method!r}")
            kind, name, temperature = "kd", _AUTHOR_NAMES[m.group(1)], float(m.group(3))
            teacher = str(r["Teacher"]).split("_")[0]
            teacher_kind = "base" if m.group(2) else "sft"
            model = f"{student}-{name}-tau{temperature:g}-from-{teacher}" + (
                "-base-teacher" if m.group(2) else "")
        for task in tasks:
            rows.append(dict(
                model=model, kind=kind, student=student, teacher=teacher, method=name,
                temperature=temperature, noise=0.0, teacher_kind=teacher_kind, seed=0, task=task,
                domain="math", n=MATH_TASK_SIZES.get(task), accuracy=float(r[task]),
                ci_low=np.nan, ci_high=np.nan, student_params=int(round(_size_b(student) * 1e9)),
                teacher_params=_size_b(teacher) * 1e9 if teacher else np.nan,
                cell_id=f"kd_generalization/{source}"))
    out = pd.DataFrame(rows)
    out["n"] = out["n"].astype("Int64")
    return out


def _parse_pair_table(df: pd.DataFrame, source: str, column: str, results: pd.DataFrame) -> pd.DataFrame:
    """The authors' per-pair table: SFT rows are the SFT student vs the teacher; the one KD row
    per pair is attached, as in their notebook, to every KD model of that pair."""
    require_columns(df, ["Teacher", "Student", "Method"], source)
    tasks = [c for c in df.columns if c not in ("Teacher", "Student", "Pair", "Method")]
    kd = results[(results["kind"] == "kd") & (results["teacher_kind"] == "sft")]
    kd_models = kd.groupby(["teacher", "student"])["model"].unique()
    rows = []
    for _, r in df.iterrows():
        teacher, student, method = str(r["Teacher"]), str(r["Student"]), str(r["Method"])
        if method == "SFT":
            models = [student]
        elif method == "KD":
            if (teacher, student) not in kd_models.index:
                raise ValueError(f"{source}: no KD results for the pair {teacher} -> {student}")
            models = list(kd_models[(teacher, student)])
        else:
            raise ValueError(f"{source}: unknown Method {method!r} (expected SFT or KD)")
        rows += [dict(model=m, teacher=teacher, task=t, value=float(r[t]),
                      n=MATH_TASK_SIZES.get(t)) for m in models for t in tasks]
    return pd.DataFrame(rows).rename(columns={"value": column})


def load_kd_generalization(files: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Parse the authors' published math tables into (results, fidelity) frames of this
    repository's shapes.

    Result tables (Teacher, Student, Method, tasks..., Average): teacher checkpoint suffixes
    after the first underscore are stripped; ``student_{KD|RevKD|GKD}_temp_{t}`` becomes a kd
    row with method SeqKD / RevKD / GKD (their names; "SeqKD" is their code's token-level
    forward KL) and temperature t; ``..._base_teacher_...`` rows keep teacher_kind="base";
    BaseModel rows are kind="base". Their published "Average" column is kept as task
    "Average" (it was computed before rounding; use ``gain_table(average=False)``). Student
    size = the billions in the model name. One EM*.csv (agreement) and/or one BLEU*.csv (BLEU)
    file give the fidelity frame (None without them); its chrF and teacher-correct/-wrong
    splits are NaN (not published).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no files given")
    result_parts, pair_files = [], {}
    for path in paths:
        df = pd.read_csv(path)
        if "Pair" in df.columns:
            kind = next((k for k in ("EM", "BLEU") if path.name.upper().startswith(k)), None)
            if kind is None:
                raise ValueError(f"{path}: a per-pair table must be named EM*.csv or BLEU*.csv")
            if kind in pair_files:
                raise ValueError(f"two {kind} tables given ({pair_files[kind][0]}, {path.name}); pass one")
            pair_files[kind] = (path.name, df)
        else:
            result_parts.append(_parse_results_table(df, path.name))
    if not result_parts:
        raise ValueError("no result table (Teacher, Student, Method, ..., Average) among the files")
    results = pd.concat(result_parts, ignore_index=True)
    if not pair_files:
        return results, None
    frames = [_parse_pair_table(df, name, "agreement" if kind == "EM" else "bleu", results)
              for kind, (name, df) in pair_files.items()]
    fidelity = frames[0]
    for other in frames[1:]:
        fidelity = fidelity.merge(other.drop(columns="n"), on=list(FIDELITY_KEYS), how="outer")
    for column in _AUTHOR_FIDELITY_COLUMNS:
        if column not in fidelity.columns:
            fidelity[column] = np.nan
    fidelity["n"] = fidelity["n"].astype("Int64")
    return results, fidelity[_AUTHOR_FIDELITY_COLUMNS]


# --------------------------------------------------------------------------- CLI
def _parse_tau(value: str) -> str | float:
    try:
        return parse_tau(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _reproduce(args: argparse.Namespace) -> int:
    results, fidelity = load_kd_generalization(args.kd_generalization)
    gains = gain_table(results, fidelity, tau=args.tau, average=False)
    table = all_hypotheses(gains)
    args.out.mkdir(parents=True, exist_ok=True)
    gains.to_csv(args.out / "gains.csv", index=False)
    table.to_csv(args.out / "hypotheses.csv", index=False)
    n = len(main_condition(gains).query("task == @AVERAGE"))
    print(f"kd_generalization: {n} KD configurations (SFT'd teacher), tau aggregation "
          f"{gains.attrs['tau']!r}; {len(table)} tests -> {args.out / 'hypotheses.csv'}")
    for line in describe_hypotheses(table):
        print(" ", line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kd_utils.authors_tables reproduce --kd-generalization FILE... --out DIR [--tau max]``"""
    parser = argparse.ArgumentParser(prog="python -m kd_utils.authors_tables", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="rerun the authors' tests on their published tables")
    rep.add_argument("--kd-generalization", nargs="+", required=True, metavar="FILE",
                     help="their CSVs: math_results_main.csv, llama_math_results.csv, EM1.csv, BLEU.csv")
    rep.add_argument("--out", type=Path, required=True, help="output folder (hypotheses.csv, gains.csv)")
    rep.add_argument("--tau", type=_parse_tau, default="max",
                     help="aggregation over temperature: max (theirs), mean, or a value")
    args = parser.parse_args(argv)
    return _reproduce(args)


if __name__ == "__main__":
    raise SystemExit(main())
