"""`nanollm sweep` end to end (interrupted and resumed, its table agreeing with its run directories), its fits and plan;
the synthetic task suite against brute-force solvers; the lr/batch scaling rule; skipped non-finite steps."""
from __future__ import annotations

import csv
import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanollm
from nanollm.cli import main
from nanollm.sweep.report import fit_isoflop, fit_power_law
from nanollm.train import tasks
from nanollm.train.health import SPIKE_WARMUP, Health
from nanollm.train.recipe import Recipe
from nanollm.train.scaling import scaled_recipe
from nanollm.train.tokenizer import load_tokenizer

TINY = """vocab_size = 8192
d_model = 64
n_heads = 2
n_kv_heads = 1
head_dim = 32
d_ff = 128
seq_len = 32
repeat 1 < {layers} >
"""
SWEEP_FLAGS = ["--budgets", "5e9,1e10", "--batch-size", "4", "--shuffle-buffer", "8", "--eval-tokens", "256", "--eval-every", "4",
               "--checkpoint-every", "2", "--jobs", "2"]


def tiny_files(folder: Path) -> list[str]:
    """A dense file and a sliding-window hybrid of it."""
    files = []
    for name, layers in (("dense", "global"), ("hybrid", "sliding(8); global")):
        path = folder / f"{name}.arch"
        path.write_text(TINY.format(layers=layers))
        files.append(str(path))
    return files


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_sweep_is_interrupted_resumed_and_its_table_and_plots_agree_with_its_runs(tmp_path):
    files, out = tiny_files(tmp_path), tmp_path / "sweep"
    command = [sys.executable, "-m", "nanollm", "sweep", *files, *SWEEP_FLAGS, "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("runs/*/checkpoints/step_00000002")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 75, output
    interrupted = [run for run in out.glob("runs/*") if (run / "manifest.json").exists()]
    assert interrupted, output

    assert main(["sweep", *files, *SWEEP_FLAGS, "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and {r["file"] for r in rows} == {"dense", "hybrid"} and {r["budget"] for r in rows} == {5e9, 1e10}
    assert {r["status"] for r in rows} <= {"done", "skipped"}
    assert any(json.loads((out / "runs" / r["run"] / "manifest.json").read_text())["resumes"] for r in rows)  # one went on from its checkpoint
    with open(out / "results.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [t["run"] for t in table] == [r["run"] for r in rows]
    for r, t in zip(rows, table):
        run = out / "runs" / r["run"]
        manifest, lines = json.loads((run / "manifest.json").read_text()), read_metrics(run)
        evaluations = [line["eval/loss"] for line in lines if "eval/loss" in line]
        assert r["final_loss"] == evaluations[-1] and float(t["final_loss"]) == pytest.approx(evaluations[-1], rel=1e-12)
        assert r["best_loss"] == min(evaluations)
        assert r["flops"] == manifest["plan"]["flops"] == lines[-1]["flops"] and r["tokens"] == manifest["plan"]["tokens"]
        assert abs(r["flops"] - r["budget"]) <= manifest["plan"]["tokens_per_step"] * manifest["plan"]["flops_per_token"] / 2
        sized = nanollm.compile(out / "archs" / (r["run"].rsplit("-s", 1)[0] + ".arch"))
        assert (r["params"], r["active_params"], r["d_model"]) == (sized.analysis.params_total, sized.analysis.params_active, sized.config.d_model)
        assert r["wall_seconds"] > 0 and r["bad_steps"] == 0
    for name in ("loss_vs_flops", "isoflop", "power_law"):
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<?xml") and (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert all(r["run"] in report for r in rows) and "| dense |" in report and "![power_law](power_law.svg)" in report
    timing = json.loads((out / "timing.json").read_text())
    assert {"sizing", "runs", "report", "total"} <= set(timing)

    before = {r["run"]: (out / "runs" / r["run"] / "metrics.jsonl").read_text() for r in rows}
    assert main(["sweep", *files, *SWEEP_FLAGS, "--out", str(out)]) == 0  # all done: nothing trains again
    assert {r["status"] for r in json.loads((out / "results.json").read_text())} == {"skipped"}
    assert before == {r["run"]: (out / "runs" / r["run"] / "metrics.jsonl").read_text() for r in rows}
    assert main(["sweep", *files, *SWEEP_FLAGS, "--lr", "1e-3", "--out", str(out)]) == 2  # other settings: refused


def test_plan_only_writes_one_accelerate_launch_per_run_and_trains_nothing(tmp_path):
    files, out = tiny_files(tmp_path), tmp_path / "sweep"
    assert main(["sweep", *files, "--budgets", "1e10,2e10", "--seeds", "2", "--sizes", "3", "--plan-only", "--out", str(out)]) == 0
    lines = [line for line in (out / "plan.sh").read_text().splitlines() if not line.startswith("#")]
    assert lines and all(line.startswith("accelerate launch -m nanollm train ") for line in lines)
    assert len(lines) == len({line.split("--out ")[1] for line in lines}) and len(lines) % 2 == 0  # two seeds of each model
    assert not (out / "runs").exists()
    sizes = {line.split()[5] for line in lines}
    assert len(sizes) > 2  # isoFLOP neighbours besides the law's choice
    for path in sizes:
        assert nanollm.compile(Path(path)).analysis.params_active > 0


def test_the_power_law_fit_recovers_a_known_exponent_and_the_isoflop_fit_its_minimum():
    budgets = [1e12, 3e12, 1e13, 3e13] * 2
    noise = random.Random(0)
    losses = [5.0 * c**-0.05 * (1 + 0.001 * noise.uniform(-1, 1)) for c in budgets]
    law = fit_power_law("x", budgets, losses)
    assert law.exponent == pytest.approx(0.05, abs=0.002) and law.a == pytest.approx(5.0, rel=0.05)
    assert law.low < 0.05 < law.high and law.points == 8
    params = [1e6, 2e6, 4e6, 8e6, 16e6]
    minimum = fit_isoflop("x", 1e12, params, [3.0 + 0.1 * (math.log(n) - math.log(3e6)) ** 2 for n in params])
    assert minimum.params == pytest.approx(3e6, rel=1e-6) and minimum.loss == pytest.approx(3.0)
    assert fit_power_law("x", [1e12, 1e12], [3.0, 3.1]) is None and fit_isoflop("x", 1e12, params[:2], [3.0, 3.1]) is None


# ---- the task suite -------------------------------------------------------------------------------------------


def brute_force_answer(name: str, tokens: tuple[int, ...], position: int) -> int:
    """What a solver reading tokens[:position] must predict, found by scanning, not by the generator's bookkeeping."""
    seen = tokens[:position]
    if name == "copy":
        separator = seen.index(max(seen, key=lambda t: t == EOS))  # the EOS between the text and its copy
        return seen[position - separator - 1]
    cue = seen[-1]  # mqar and induction: the token after the cue's earlier occurrence
    earlier = [i for i in range(len(seen) - 1) if seen[i] == cue]
    return seen[earlier[0] + 1]


EOS = load_tokenizer(None).eos_token_id


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_task_answers_match_a_brute_force_solver(name):
    tokenizer = load_tokenizer(None)
    pool = tasks.word_pool(tokenizer)
    assert all(tokenizer.decode([i]).strip().isidentifier() for i in pool[:200])
    for length in tasks.LENGTHS[name]:
        batch = tasks.examples(name, length, pool, EOS)
        assert batch == tasks.examples(name, length, pool, EOS)  # deterministic from the seed
        assert batch != tasks.examples(name, length, pool, EOS, seed=1)
        for example in batch:
            assert len(example.tokens) == tasks.example_length(name, length)
            assert example.targets
            for position, answer in example.targets:
                assert example.tokens[position] == answer == brute_force_answer(name, example.tokens, position)
    if name == "mqar":  # keys are distinct from values, and every key is queried once
        example = tasks.examples(name, 8, pool, EOS)[0]
        keys, values = example.tokens[0:16:2], example.tokens[1:16:2]
        assert not set(keys) & set(values) and sorted(example.tokens[16::2]) == sorted(keys)


class Oracle(torch.nn.Module):
    """A 'model' predicting the brute-force answer at every scored position (and EOS elsewhere)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.zeros(*tokens.shape, 8192)
        for b, row in enumerate(tokens.tolist()):
            for position in range(1, len(row)):
                try:
                    logits[b, position - 1, brute_force_answer(self.name, tuple(row), position)] = 1
                except (ValueError, IndexError):
                    pass
        return logits, torch.zeros(())


def test_an_oracle_scores_one_and_a_constant_model_zero_at_every_length():
    tokenizer = load_tokenizer(None)
    for name in tasks.TASKS:
        scores = tasks.score_tasks(Oracle(name), tokenizer, (name,), 256, 16, torch.device("cpu"))
        fitting = [length for length in tasks.LENGTHS[name] if tasks.example_length(name, length) <= 256]
        assert scores == {**{f"{name}/{length}": 1.0 for length in fitting}, name: 1.0}
    constant = lambda tokens: (torch.zeros(*tokens.shape, 8192), torch.zeros(()))  # argmax: token 0, never an answer
    assert set(tasks.score_tasks(constant, tokenizer, ("mqar",), 64, 16, torch.device("cpu")).values()) == {0.0}


# ---- scaling rule and training health ---------------------------------------------------------------------------


MICRO = TINY.format(layers="global; global")
FAST = ["--batch-size", "4", "--shuffle-buffer", "8", "--eval-tokens", "256", "--eval-every", "0"]


def test_the_deepseek_rule_sets_lr_and_batch_by_the_papers_formulas_and_the_manifest_records_it(tmp_path, capsys):
    for compute in (1e17, 1e20, 3e23):
        recipe, chosen = scaled_recipe(Recipe(scaling_rule="deepseek", budget=compute), 1e9, 4096, 8)
        assert recipe.lr == pytest.approx(0.3118 * compute**-0.125, rel=1e-12)
        assert chosen["batch_tokens"] == pytest.approx(0.2920 * compute**0.3271, rel=1e-12)
        assert recipe.batch_size % 8 == 0 and abs(recipe.batch_size * 4096 - chosen["batch_tokens"]) <= 8 * 4096 / 2
    assert scaled_recipe(Recipe(lr=1e-3, batch_size=16), 1e9, 4096, 1)[0] == Recipe(lr=1e-3, batch_size=16)  # constant: as given
    arch = tmp_path / "micro.arch"
    arch.write_text(MICRO)
    run = tmp_path / "run"
    assert main(["train", str(arch), "--out", str(run), "--budget", "2e10", "--scaling-rule", "deepseek", "--eval-tasks", "copy,induction",
                 *FAST[2:]]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    scaling = manifest["scaling"]
    assert scaling["rule"] == "deepseek" and scaling["compute"] == 2e10
    assert scaling["lr"] == pytest.approx(0.3118 * 2e10**-0.125) and manifest["recipe"]["lr"] == scaling["lr"]
    assert manifest["plan"]["batch_size"] == scaling["batch_size"] == round(0.2920 * 2e10**0.3271 / 32)
    assert read_metrics(run)[0]["lr"] <= scaling["lr"]
    final = read_metrics(run)[-1]  # the tasks scored at the evaluation, as `nanollm eval --tasks` scores the checkpoint
    scores = {k.removeprefix("tasks/"): v for k, v in final.items() if k.startswith("tasks/")}
    assert set(scores) == {"copy/8", "copy", "induction/16", "induction"}  # the lengths that fit in 32 tokens
    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", "copy,induction", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == scores


def test_a_non_finite_step_is_skipped_counted_and_layer_gradient_norms_are_logged(tmp_path, monkeypatch):
    from nanollm.train import trainer

    forward, calls = trainer.NextTokenLoss.forward, []

    def poisoned(self, rows):  # the third step's loss is NaN
        calls.append(1)
        loss, aux = forward(self, rows)
        return (loss * math.nan if len(calls) == 3 else loss), aux

    monkeypatch.setattr(trainer.NextTokenLoss, "forward", poisoned)
    arch, run = tmp_path / "micro.arch", tmp_path / "run"
    arch.write_text(MICRO)
    assert main(["train", str(arch), "--out", str(run), "--steps", "5", "--log-every", "1", "--checkpoint-every", "1",
                 "--keep-checkpoints", "10", *FAST]) == 0
    lines = read_metrics(run)
    assert [line["bad_steps"] for line in lines] == [0, 0, 1, 1, 1]
    assert math.isnan(lines[2]["loss"]) and all(math.isfinite(line["loss"]) for line in lines[3:])
    before, after = (load_file(str(run / "checkpoints" / f"step_0000000{n}" / "model.safetensors")) for n in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed no weight
    third = load_file(str(run / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert any(not torch.equal(after[k], third[k]) for k in after)  # and the next one did
    for line in lines[:2] + lines[3:]:
        groups = {k: v for k, v in line.items() if k.startswith("grad_norm/")}
        assert set(groups) == {"grad_norm/embed", "grad_norm/layers.0", "grad_norm/layers.1", "grad_norm/norm"}
        assert math.sqrt(sum(v * v for v in groups.values())) == pytest.approx(line["grad_norm"], rel=1e-4)


def test_more_non_finite_steps_than_max_bad_steps_stop_the_run(tmp_path, monkeypatch, capsys):
    from nanollm.train import trainer

    forward = trainer.NextTokenLoss.forward
    monkeypatch.setattr(trainer.NextTokenLoss, "forward", lambda self, rows: (forward(self, rows)[0] * math.inf, torch.zeros(())))
    arch = tmp_path / "micro.arch"
    arch.write_text(MICRO)
    assert main(["train", str(arch), "--out", str(tmp_path / "run"), "--steps", "6", "--max-bad-steps", "2", *FAST]) == 2
    assert "non-finite loss or gradient in 3 steps, more than max_bad_steps 2" in capsys.readouterr().err


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    arch, run = tmp_path / "micro.arch", tmp_path / "run"
    arch.write_text(MICRO)
    common = ["--log-every", "1", *FAST]
    assert main(["train", str(arch), "--out", str(run), "--steps", "2", "--tracker", "wandb", "--tracker-group", "g", *common]) == 0
    entry = json.loads((run / "manifest.json").read_text())["tracker"]
    assert entry["name"] == "wandb" and entry["group"] == "g" and entry["project"] == "nanollm"
    assert main(["train", str(arch), "--resume", str(run), "--steps", "3"]) == 0
    assert json.loads((run / "manifest.json").read_text())["tracker"] == entry
    folders = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(name.endswith("-" + entry["run_id"]) for name in folders)


def test_a_loss_far_above_its_running_statistics_is_reported_as_a_spike_and_the_statistics_resume_from_a_checkpoint() -> None:
    steady = [5.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(30)]  # a flat loss with noise of +-0.02
    health = Health(max_bad_steps=3, spike_sigmas=6.0)
    assert all(health.spike(step, loss) is None for step, loss in enumerate(steady))
    resumed = Health(3, 6.0, health.state_dict())  # as a resumed run rebuilds it from the checkpoint's state
    line = resumed.spike(30, 6.0)
    assert line is not None and line.startswith("step 30: loss spike 6.0000") and resumed.spikes == 1
    assert Health(3, 6.0, health.state_dict()).spike(30, 5.02) is None  # within the noise
    assert Health(3, 0.0, health.state_dict()).spike(30, 6.0) is None  # spike_sigmas 0: spikes are not judged
    warming = Health(3, 6.0)
    assert all(warming.spike(step, 100.0 * (step % 2)) is None for step in range(SPIKE_WARMUP))  # no verdict before the warm-up
