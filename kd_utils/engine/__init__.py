"""The notebook-DAG engine: run a DAG of parameterized notebooks with papermill, never losing finished work.

A *cell* is one notebook run with one set of parameters. Layout of a study directory:

    <study>/<stage>/<cell.id>/            complete result: the notebook's files, metrics.json, notebook.ipynb
    <study>/<stage>/<cell.id>.failed/     last failure: error.txt, notebook.ipynb (partial), log.txt, partial files
    <study>/<stage>/.tmp-<cell.id>-<r>/   a cell being executed (never read; removed by the next run)
    <study>/logs/<cell.id>.log            kernel stdout/stderr of every attempt
    <study>/.locks/                       flock files: study.lock (one per runner) and <cell.id>.lock
    <study>/.slurm/                       submitit's folder for the SLURM executor

A notebook receives its parameters plus ``cell_dir`` (a temporary directory), writes its files there
and ``metrics.json`` last. The engine then renames the directory into place atomically: a cell is
complete iff ``<study>/<stage>/<cell.id>/metrics.json`` exists. Its kernel gets ``KD_THREADS``,
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to the threads allotted to it, and this package on
``PYTHONPATH``.

Modules, one job each (this package imports none of them, so importing it costs nothing):
  cells     the Cell (its id and completion), CellResult and RunSummary
  plan      the DAG checked and ordered, the status table (stale cells), selecting cells
  files     a study's files: study and cell locks, results installed atomically, leftovers tidied
  worker    executing one cell under its lock: papermill, its log, its failure or its result
  kernels   a cell's Jupyter kernel: Unix-socket channels, exit cause and peak memory, warm starts
  local     the local executor: ``python -c`` worker processes and their pool
  slurm     the SLURM executor: one submitit job per cell, followed through squeue
  schedule  `run`: plan, lock the study, and schedule the cells on an executor in dependency order
"""
