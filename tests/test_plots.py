"""The report's figures: what their rows are and in which order."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from kd_utils import plots  # noqa: E402
from test_summary import study_tables  # noqa: E402


def test_the_accuracy_heatmap_has_one_row_per_run_over_seeds_by_size_then_method():
    results, _ = study_tables()
    fig = plots.accuracy_heatmap(results)
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows[:4] == ["xs sft", "xs <- m fkl t1", "xs <- m fkl t1 base teacher", "xs <- m fkl t1 noise 5"]
    assert rows.index("s sft") > rows.index("xs <- s rkl t1") and rows[-1] == "m sft"
    assert len(rows) == results.apply(plots.run_label, axis=1).nunique() < results["model"].nunique()
    assert ax.get_title() == "Accuracy per model and task (mean over 3 seeds)"
    image = ax.images[0].get_array()
    xs_sft = results[(results["model"].str.startswith("xs/sft/")) & (results["task"] == "m1")]["accuracy"].mean()
    assert abs(image[0, list(t.get_text() for t in ax.get_xticklabels()).index("m1")] - xs_sft) < 1e-9
