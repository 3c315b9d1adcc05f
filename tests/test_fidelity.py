"""kd_utils.fidelity: answer agreement, rationale similarity, distribution fidelity."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from kd_utils import fidelity as fd
from kd_utils.schema import FIDELITY_COLUMNS


def _preds(task, extracted, correct=None, outputs=None, hashes=None):
    n = len(extracted)
    return pd.DataFrame(dict(
        task=task, item_id=list(range(n)), prompt_hash=hashes or [f"h{i}" for i in range(n)],
        output=outputs or [f"the answer is {e}" for e in extracted], extracted=extracted,
        label="0", correct=correct if correct is not None else [True] * n))


def test_agreement_known_shares():
    teacher = pd.concat([
        _preds("math", ["3", "4", "5", None, "7"], correct=[True, True, False, False, True]),
        _preds("mc", ["A", "B", "C", "D"]),
    ])
    student = pd.concat([
        _preds("math", ["3.0", "4.0005", "5.01", None, "1,000"]),
        _preds("mc", ["A", "B", "C", "a"]),
    ])
    out = fd.agreement(student, teacher).set_index("task")
    # math: 3.0~3 and 4.0005~4 agree (tolerance 1e-3); 5.01 != 5; None/None disagree; 1000 != 7
    assert out.loc["math", "agreement"] == pytest.approx(40.0)
    assert out.loc["math", "agreement_teacher_correct"] == pytest.approx(200 / 3)
    assert out.loc["math", "agreement_teacher_wrong"] == 0.0
    assert (out.loc["math", "n"], out.loc["math", "n_teacher_wrong"]) == (5, 2)
    assert out.loc["mc", "agreement"] == 75.0  # "a" != "D"
    assert pd.isna(out.loc["mc", "agreement_teacher_wrong"])  # the teacher never erred


def test_same_answer_rules():
    assert fd.same_answer("1,000", "1000.0004")
    assert not fd.same_answer(None, None)
    assert not fd.same_answer("true", "false") and fd.same_answer(" true", "true")


def test_prompt_hash_mismatch_raises():
    teacher = _preds("math", ["1", "2"])
    student = _preds("math", ["1", "2"], hashes=["h0", "other"])
    with pytest.raises(ValueError, match="different prompts"):
        fd.agreement(student, teacher)


def test_partial_overlap_warns_and_missing_fields_raise():
    teacher = _preds("math", ["1", "2", "3"])
    with pytest.warns(UserWarning, match="common"):
        out = fd.agreement(teacher.head(2), teacher)
    assert out["n"].iloc[0] == 2 and out["agreement"].iloc[0] == 100.0
    with pytest.raises(ValueError, match="prompt_hash"):
        fd.agreement(teacher.drop(columns="prompt_hash"), teacher)


def test_identical_outputs_give_bleu_100_and_different_less():
    text = ["Tom has 3 apples and buys 4 more , so he has 7 apples . The answer is 7 .",
            "She walks 2 km each day for 5 days , which is 10 km in total . The answer is 10 ."]
    teacher = _preds("math", ["7", "10"], outputs=text)
    same = fd.rationale_similarity(teacher, teacher).iloc[0]
    assert same["bleu"] == pytest.approx(100.0)
    assert same["chrf"] == pytest.approx(100.0) and same["n"] == 2
    other = _preds("math", ["7", "10"], outputs=["7", "I think it is 10 km"])
    assert fd.rationale_similarity(other, teacher).iloc[0]["bleu"] < 20


def test_fidelity_table_from_files(tmp_path):
    def write(name, frame):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
        return path

    teacher = _preds("math", ["1", "2", "3", "4"], outputs=["a b c d e"] * 4)
    files = {"T": write("T", teacher), "s": write("s", _preds("math", ["1", "2", "0", "0"],
                                                                outputs=["a b c d e"] * 4))}
    table = fd.fidelity_table(files, [("s", "T")])
    assert list(table.columns) == FIDELITY_COLUMNS
    row = table.iloc[0]
    assert (row["model"], row["teacher"], row["agreement"], row["n"]) == ("s", "T", 50.0, 4)
    assert row["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="missing"):
        fd.fidelity_table(files, [("missing", "T")])


def _tiny_qwen(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


def _batches():
    torch.manual_seed(0)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 100, (3, 12))
        attn = torch.ones_like(ids)
        attn[0, 9:] = 0  # right padding
        labels = ids.clone()
        labels[:, :4] = -100  # prompt
        labels[attn == 0] = -100
        out.append(dict(input_ids=ids, attention_mask=attn, labels=labels))
    return out


def test_distribution_fidelity_of_a_model_with_itself():
    model, other = _tiny_qwen(0), _tiny_qwen(1)
    batches = _batches()
    expected = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    same = fd.distribution_fidelity(model, model, batches)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["n_tokens"] == expected and model.training  # training flag restored
    diff = fd.distribution_fidelity(model, other, batches, mask_key="attention_mask")
    assert diff["kl"] > 1e-3 and diff["top1_agreement"] < 1.0
    assert diff["n_tokens"] == sum(int(b["attention_mask"][:, 1:].sum()) for b in batches)
    with pytest.raises(ValueError, match="mask_key"):
        fd.distribution_fidelity(model, model, batches, mask_key="loss_mask")


def test_the_teacher_is_its_sft_at_the_studys_first_seed_whatever_the_folder_order(tmp_path):
    """A teacher trained once (at the study's first seed) also has SFT evaluations at the other seeds
    as a student; fidelity compares its students with the one that taught them, not the one whose
    cell folder sorts first."""
    from kd_utils.results import collect_fidelity

    study = tmp_path / "study"
    (study / "evaluate").mkdir(parents=True)
    (study / "params.resolved.json").write_text(json.dumps({"seeds": [0, 1, 2]}))

    def cell(folder, model, kind, seed, answer, teacher=""):
        d = study / "evaluate" / folder
        d.mkdir()
        d.joinpath("metrics.json").write_text(json.dumps(dict(
            model=model, kind=kind, student="s" if kind == "sft" else "xs", teacher=teacher,
            teacher_kind="sft" if teacher else "", seed=seed)))
        rows = [dict(task="t", item_id=i, prompt_hash="h", output=f"so {answer}", extracted=answer, label="a",
                     correct=answer == "a") for i in range(4)]
        d.joinpath("predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    cell("a-first", "s/sft/s2", "sft", 2, "b")
    cell("b", "s/sft/s1", "sft", 1, "b")
    cell("z-last", "s/sft/s0", "sft", 0, "a")  # the teacher
    cell("c", "kd/xs<-s/fkl/s0", "kd", 0, "a", teacher="s")
    table = collect_fidelity(study, write=False)
    assert table.set_index("model").loc["kd/xs<-s/fkl/s0", "agreement"] == 100.0
