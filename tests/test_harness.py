"""`nanollm eval --harness lm-eval`: lm-eval scores a nanollm run through the NanollmLM adapter, offline, on task files
the test writes (a multiple-choice and a loglikelihood-rolling task), and the scores agree with the model's own forward."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from nanollm.cli import main
from nanollm.trained import load_trained

pytest.importorskip("lm_eval", reason="the [eval] extra")

RUN = Path(__file__).resolve().parent / "fixtures" / "run_before_issue_18"
QUESTIONS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two and two make", "choices": [" four", " seven"], "answer": 0},
    {"question": "Once upon a", "choices": [" time", " table", " river"], "answer": 1},
]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog. " * 3}, {"text": "A short second document."}]
TASKS = {
    "nanollm_choice": ("choice.jsonl", QUESTIONS, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                                                  'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
    "nanollm_rolling": ("rolling.jsonl", TEXTS, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                                                'metric_list:\n  - metric: bits_per_byte\n'),
}


def write_tasks(folder: Path) -> None:
    """Local lm-eval task files over local JSON lines (the `json` dataset builder: no download)."""
    folder.mkdir()
    for name, (data, rows, body) in TASKS.items():
        (folder / data).write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
                                             f"test_split: test\n{body}")


def logprob(trained, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one full forward pass."""
    with torch.no_grad():
        logits, _ = trained.model(torch.tensor([context + continuation[:-1]]))
    logprobs = logits[0, len(context) - 1:].log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


def test_lm_eval_scores_a_run_offline_and_agrees_with_the_models_own_likelihoods(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    write_tasks(tmp_path / "tasks")
    assert main(["eval", str(run), "--harness", "lm-eval", "--tasks", "nanollm_choice,nanollm_rolling", "--include", str(tmp_path / "tasks")]) == 0
    assert "scores written to" in capsys.readouterr().out
    results = json.loads((run / "lm_eval.json").read_text())["results"]

    trained = load_trained(run)
    encode = trained.tokenizer.encode
    right = [max(range(len(q["choices"])), key=lambda c: logprob(trained, encode(q["question"]), encode(q["question"] + q["choices"][c])[len(encode(q["question"])):]))
             == q["answer"] for q in QUESTIONS]
    assert results["nanollm_choice"]["acc,none"] == pytest.approx(sum(right) / len(right))
    # Rolling over a 16-token context: the text in 16-token chunks, each conditioned on the token before it (EOS first).
    nats = 0.0
    for doc in TEXTS:
        tokens = [trained.tokenizer.eos_token_id, *encode(doc["text"])]
        chunks = range(1, len(tokens), trained.context)
        nats -= sum(logprob(trained, [tokens[start - 1]], tokens[start:start + trained.context]) for start in chunks)
    assert len(encode(TEXTS[0]["text"])) > 2 * trained.context  # several windows
    total_bytes = sum(len(doc["text"].encode()) for doc in TEXTS)
    assert results["nanollm_rolling"]["bits_per_byte,none"] == pytest.approx(nats / total_bytes / math.log(2), rel=1e-5)


def test_eval_options_of_the_harness_need_it_in_one_line(capsys) -> None:
    for command in (["--tasks", "x"], ["--harness", "lm-eval"]):
        assert main(["eval", str(RUN), *command]) == 2
        assert capsys.readouterr().err.count("\n") == 1
