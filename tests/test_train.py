"""`nanollm train` and `nanollm eval` end to end on CPU: learning, exact resumption, crash-safe checkpoints,
multi-process runs under `accelerate launch`, run records, compute budgets, and clear errors."""
from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_group

import nanollm
import nanollm.train.checkpoint as checkpoint_module
from nanollm.cli import main
from nanollm.ir import arch_to_json
from nanollm.train.checkpoint import latest_checkpoint, load_checkpoint
from nanollm.train.evaluate import HeldOut, evaluate
from nanollm.train.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
MICRO = """vocab_size = 8192
d_model = 64
n_heads = 4
n_kv_heads = 2
head_dim = 16
d_ff = 128
seq_len = 64
repeat 2 < global >
"""
# The same with MoE FFNs: DeepSeek-V3's bias balancing and router noise make resuming depend on restored state.
MICRO_MOE = MICRO.replace("repeat 2 < global >", "repeat 2 < global ffn=moe(top=2, experts=4, d_ff=64, balance=bias, jitter=0.05) >")
FAST = ["--batch-size", "4", "--shuffle-buffer", "8", "--eval-tokens", "512", "--eval-every", "0", "--checkpoint-every", "0"]


@pytest.fixture
def arch(tmp_path: Path) -> Path:
    path = tmp_path / "micro.arch"
    path.write_text(MICRO)
    return path


@pytest.fixture
def moe_arch(tmp_path: Path) -> Path:
    path = tmp_path / "micro_moe.arch"
    path.write_text(MICRO_MOE)
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(*args: str | Path) -> int:
    return main(["train", *map(str, args)])


def test_loss_falls_on_the_embedded_corpus(arch, tmp_path):
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--steps", 40, "--log-every", 1, *FAST, "--eval-tokens", 4096) == 0
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 40 and losses[0] == pytest.approx(math.log(8192), abs=0.3)  # starts at chance
    assert sum(losses[-5:]) / 5 < losses[0] - 2.5
    final = metrics(run)[-1]
    # held-out text, never trained on, got likelier too (its first files, whatever the seed, are harder than the average)
    assert final["eval/loss"] < math.log(8192) - 1.0
    assert final["tokens"] == 40 * 4 * 64


def test_resume_continues_bit_for_bit(moe_arch, tmp_path):
    """Kill a run after step 6 (drop its later checkpoints), resume: steps 7-10 repeat the uninterrupted losses exactly.

    The model routes with noise and a selection bias updated every step, so this needs the generators and
    the bias restored, not only weights, optimiser and data.
    """
    arch = moe_arch
    run = tmp_path / "run"
    common = ["--steps", 10, "--log-every", 1, *FAST, "--checkpoint-every", 3, "--keep-checkpoints", 10]
    assert train(arch, "--out", run, *common) == 0
    uninterrupted = metrics(run)
    for late in ("step_00000009", "step_00000010"):
        shutil.rmtree(run / "checkpoints" / late)
    (run / "checkpoints" / "latest").write_text("step_00000006")
    assert train(arch, "--resume", run, "--steps", 10) == 0
    resumed = metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 11))  # the lines after step 6 were replaced, not appended
    for before, after in zip(uninterrupted, resumed):
        assert before == {**after, "tokens_per_s": before["tokens_per_s"]}  # every figure but the speed
    manifest = json.loads((run / "manifest.json").read_text())
    assert [r["step"] for r in manifest["resumes"]] == [6]


def test_steps_count_from_the_start_of_the_run(arch, tmp_path):
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--steps", 3, "--log-every", 1, *FAST) == 0
    assert train(arch, "--resume", run, "--steps", 5) == 0
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]
    assert train(arch, "--resume", run, "--steps", 5) == 0  # complete: nothing more to do
    assert len(metrics(run)) == 5


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one(arch, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = checkpoint_module.save_tensors
    writes = []

    def dying_save(path: Path, tensors: dict) -> dict:
        writes.append(path.name)
        if len(writes) == 5:  # the second checkpoint: model written, then the process dies writing the optimiser
            path.write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        return real_save(path, tensors)

    monkeypatch.setattr(checkpoint_module, "save_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(arch, "--out", run, "--steps", 4, *FAST, "--checkpoint-every", 2)
    monkeypatch.setattr(checkpoint_module, "save_tensors", real_save)
    assert writes[3:] == ["model.safetensors", "optimizer.safetensors"]
    assert (run / "checkpoints" / ".step_00000004.tmp").is_dir()  # the half-written one, never renamed
    previous = latest_checkpoint(run)
    assert previous.name == "step_00000002"
    compiled = nanollm.compile(arch)
    model = compiled.build()
    from nanollm.optim import build_optimizers

    optimizers = build_optimizers(model, Recipe().optimizer_settings())
    for optimizer in optimizers:  # as in the trainer: schedulers add `initial_lr` to the saved groups
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = load_checkpoint(previous, model, optimizers)
    assert state["step"] == 2 and state["tokens"] == 2 * 4 * 64
    assert train(arch, "--resume", run) == 0  # and the run goes on from it
    assert latest_checkpoint(run).name == "step_00000004"
    assert not list((run / "checkpoints").glob(".*"))  # the debris is cleared


def test_run_directory_records_everything(arch, tmp_path):
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--steps", 4, "--log-every", 2, *FAST) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    compiled = nanollm.compile(arch)
    assert manifest["arch_text"] == MICRO
    assert manifest["arch"] == json.loads(json.dumps(arch_to_json(compiled.arch)))
    assert manifest["recipe"]["steps"] == 4 and manifest["recipe"]["batch_size"] == 4
    assert manifest["analysis"]["params_total"] == compiled.analysis.params_total
    assert manifest["plan"]["flops_per_token"] == compiled.analyze(64).flops_per_token_train
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["hardware"]["device"] == "cpu" and manifest["hardware"]["processes"] == 1
    assert "git" in manifest
    data = manifest["data"]
    assert (data["held_out_tokens"], data["held_out_sequences"]) == (512, 8) and len(data["held_out_fingerprint"]) == 16
    assert data["held_out_sets"] == [{"after_step": 0, "fingerprint": data["held_out_fingerprint"]}]

    lines = metrics(run)
    assert [m["step"] for m in lines] == [2, 4]
    for key in ("loss", "lr", "tokens", "flops", "tokens_per_s", "grad_norm"):
        assert all(math.isfinite(m[key]) for m in lines), key
    assert lines[-1]["flops"] == 4 * 4 * 64 * manifest["plan"]["flops_per_token"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "flops", "eval/loss", "eval/loss_stderr", "eval/bits_per_byte"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert events.Scalars("loss")[-1].value == pytest.approx(lines[-1]["loss"])

    assert main(["eval", str(run), "--json"]) == 0
    assert latest_checkpoint(run).name == "step_00000004"


def test_eval_reports_what_the_trainer_measured(arch, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--steps", 3, *FAST) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = metrics(run)[-1]
    assert result["step"] == 3 and result["tokens"] == 512 and result["sequences"] == 8
    assert result["loss"] == pytest.approx(final["eval/loss"], rel=1e-12)
    assert result["loss_stderr"] == pytest.approx(final["eval/loss_stderr"], rel=1e-9) and result["loss_stderr"] > 0
    fingerprint = json.loads((run / "manifest.json").read_text())["data"]["held_out_fingerprint"]
    assert result["fingerprint"] == result["run_fingerprint"] == fingerprint
    assert result["bits_per_byte"] == pytest.approx(final["eval/bits_per_byte"], rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])


def test_the_standard_error_is_that_of_the_per_sequence_losses():
    """eval/loss_stderr is the sample standard deviation of the sequences' mean losses over the root of their count,
    whatever the micro-batching (7 rows in micro-batches of 3)."""
    torch.manual_seed(0)
    table = torch.randn(50, 50) * 3  # a bigram "model" whose losses vary a lot from sequence to sequence
    model = lambda tokens: (table[tokens], torch.zeros(()))
    rows = torch.randint(0, 50, (7, 17))
    result = evaluate(model, HeldOut(rows, bytes=100), micro_batch=3, device=torch.device("cpu"))
    per_token = torch.nn.functional.cross_entropy(table[rows[:, :-1]].flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    per_sequence = per_token.view(7, 16).double().mean(dim=1).tolist()
    assert result["loss"] == pytest.approx(statistics.fmean(per_sequence), rel=1e-12)
    assert result["loss_stderr"] == pytest.approx(statistics.stdev(per_sequence) / math.sqrt(7), rel=1e-9)
    assert result["loss_stderr"] > 0.05


FIXTURE = ROOT / "tests" / "fixtures" / "run_before_issue_18"


def test_a_run_from_before_evaluation_set_fingerprints_resumes_and_says_its_evaluations_scored_another_set(tmp_path, capsys):
    """A run directory written by nanollm at commit fc8e0fe (2 steps of a tiny model, evaluated at both on the
    held-out set chosen in the seed's document order) resumes. The console and the manifest say that the
    evaluations up to step 2 scored that older set and those after it the fingerprinted one; nanollm eval says
    the same of the checkpoint at step 2."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    before = json.loads((run / "manifest.json").read_text())
    assert "held_out_fingerprint" not in before["data"]
    arch = tmp_path / "tiny.arch"
    arch.write_text(before["arch_text"])
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "the run's own evaluations at step 2 scored an older set" in " ".join(capsys.readouterr().out.split())

    assert train(arch, "--resume", run, "--steps", 3) == 0
    out = " ".join(capsys.readouterr().out.split())
    manifest = json.loads((run / "manifest.json").read_text())
    fingerprint = manifest["data"]["held_out_fingerprint"]
    assert "the evaluations logged up to step 2 scored an older held-out set" in out and f"score set {fingerprint}" in out
    assert manifest["data"]["held_out_sets"] == [{"after_step": 0, "fingerprint": None}, {"after_step": 2, "fingerprint": fingerprint}]
    lines = metrics(run)
    assert lines[:2] == metrics(FIXTURE) and lines[2]["step"] == 3 and lines[2]["eval/loss_stderr"] > 0
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fingerprint"] == result["run_fingerprint"] == fingerprint
    assert result["loss"] == pytest.approx(lines[2]["eval/loss"], rel=1e-12)


def test_budget_sets_the_length_from_the_models_flops(arch, tmp_path):
    run = tmp_path / "run"
    per_token = nanollm.compile(arch).analyze(64).flops_per_token_train
    budget = 7.4 * per_token * 4 * 64  # 7.4 steps' worth
    assert train(arch, "--out", run, "--budget", f"{budget!r}", "--log-every", 1, *FAST) == 0
    lines = metrics(run)
    assert len(lines) == 7
    assert lines[-1]["flops"] == 7 * 4 * 64 * per_token
    assert abs(lines[-1]["flops"] - budget) <= 0.5 * 4 * 64 * per_token  # within half a step


def test_muon_recipe_trains(arch, tmp_path):
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--recipe", ROOT / "runtime/train/pretrain_muon.yaml", "--steps", 20, "--log-every", 1, *FAST) == 0
    losses = [m["loss"] for m in metrics(run)]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5


def test_local_data_and_tokenizer(arch, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Sentence number {i} is about {'cats' if i % 2 else 'dogs'}.\n"}) for i in range(300)))
    from nanollm.train.tokenizer import embedded_tokenizer_dir

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(embedded_tokenizer_dir(), tokenizer)
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--data", corpus, "--tokenizer", tokenizer, "--eval-share", 0.2, "--steps", 3, *FAST) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["source"] == str(corpus) and manifest["data"]["tokenizer"] == str(tokenizer)


def test_recipes():
    assert load_recipe(ROOT / "runtime/train/pretrain_adamw.yaml", {}) == Recipe()  # the embedded default
    muon = load_recipe(ROOT / "runtime/train/pretrain_muon.yaml", {"lr": 1e-3, "steps": 7})
    assert (muon.optimizer, muon.schedule, muon.lr, muon.steps) == ("muon", "wsd", 1e-3, 7)


def run_cli(*args: str | Path, cwd: Path | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m", "nanollm"]) + [str(a) for a in args]
    return run_group(command, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def in_process_error(capsys, args: list, text: str) -> None:
    """`nanollm ...` called in this process: exit code 2 and one line on stderr naming the problem."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and text in err[0], err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing/corpus.jsonl"], "no such file or folder"),
        (["--data", "{empty}"], "the corpus is empty"),
        (["--tokenizer", "{no_eos}"], "has no EOS token"),
        (["--seq-len", "128"], "over the model's context of 64"),
        (["--recipe", "{bad_recipe}"], "unknown recipe key 'lrr' (did you mean 'lr'?)"),
        (["--lr", "fast"], "argument --lr: takes a number"),
        (["--steps", "10", "--budget", "1e12"], "steps and budget both set the run's length"),
        (["--optimizer", "sgd"], "choose one of adamw, muon"),
        (["--batch-size", "6", "--micro-batch-size", "4"], "not a multiple of micro_batch_size"),
    ],
    ids=["missing-data", "empty-corpus", "tokenizer-without-eos", "seq-len", "recipe-key", "flag-type", "two-lengths",
         "choice", "batch-layout"],
)
def test_bad_input_is_one_line(arch, tmp_path, capsys, extra, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.yaml").write_text("lrr: 0.1\n")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bare).save_pretrained(tmp_path / "no_eos")
    names = {"empty": tmp_path / "empty.jsonl", "bad_recipe": tmp_path / "bad.yaml", "no_eos": tmp_path / "no_eos"}
    extra = [e.format(**names) for e in extra]
    in_process_error(capsys, ["train", arch, "--out", tmp_path / "run", "--steps", 1, *extra], message)
    assert not (tmp_path / "run").exists()


def test_the_console_script_reports_without_traceback(arch, tmp_path):
    one_line_error(run_cli("train", arch, "--data", "missing/corpus.jsonl"), "no such file or folder")


def test_resuming_with_another_model_is_refused(arch, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--steps", 1, *FAST) == 0
    other = tmp_path / "other.arch"
    other.write_text(MICRO.replace("d_ff = 128", "d_ff = 256"))
    in_process_error(capsys, ["train", other, "--resume", run, "--steps", 2], "is not the model this run trains")
    in_process_error(capsys, ["train", arch, "--resume", run, "--lr", "0.1"], "cannot change lr")
    in_process_error(capsys, ["train", arch, "--out", run, "--steps", 2], "already holds a run")
    in_process_error(capsys, ["eval", tmp_path], "no checkpoint there")


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.mark.parametrize("config, parallel, optimizer, extra", [
    ("multi_gpu_ddp.yaml", "ddp", "adamw", []),
    ("multi_gpu_fsdp2.yaml", "fsdp", "muon", ["--activation-checkpointing"]),  # FSDP chosen by the config alone
    ("multi_gpu_ddp.yaml", "fsdp", "adamw", ["--parallel", "fsdp", "--compile"]),
])
def test_two_processes_match_one(tmp_path, config, parallel, optimizer, extra):
    """Two gloo processes give the one-process figures for the same global batch (an MoE model with bias balancing):
    DDP, whose buffer broadcast must not overwrite each process's MoE statistics; FSDP2 from the FSDP launch config
    (which Accelerate itself would run as DDP on CPUs), sharding with Muon on DTensors (expert stacks included) and
    activation checkpointing; and FSDP2 under torch.compile, as GPUs run by default. Per-expert balance is
    compared, not just totals."""
    arch = tmp_path / "moe.arch"  # router noise is drawn per process, so a noisy router would differ by design: none here
    arch.write_text(MICRO_MOE.replace(", jitter=0.05", ""))
    # batch 8 in micro-batches of 2: one process accumulates 4 of them, two processes 2 each (the same 4)
    common = ["--steps", 3, "--log-every", 1, "--batch-size", 8, "--micro-batch-size", 2, "--optimizer", optimizer, *extra, *FAST[2:]]
    assert train(arch, "--out", tmp_path / "single", *common) == 0
    launcher = ACCELERATE + ["--config_file", ROOT / "runtime/accelerate" / config, "--num_processes", "2", "-m", "nanollm"]
    result = run_cli("train", arch, "--out", tmp_path / "multi", *common, launcher=[str(a) for a in launcher])
    assert result.returncode == 0, result.stderr[-3000:]
    single, multi = metrics(tmp_path / "single"), metrics(tmp_path / "multi")
    plan = json.loads((tmp_path / "multi" / "manifest.json").read_text())["plan"]
    assert (plan["processes"], plan["parallel"], plan["compile"]) == (2, parallel, "--compile" in extra)
    fingerprints = [json.loads((tmp_path / run / "manifest.json").read_text())["data"]["held_out_fingerprint"] for run in ("single", "multi")]
    assert fingerprints[0] == fingerprints[1]  # one evaluation set whatever the process count
    assert len(single) == len(multi) == 3
    assert histogram_sums(tmp_path / "single", "layers.1.ffn/load") == histogram_sums(tmp_path / "multi", "layers.1.ffn/load")
    for a, b in zip(single, multi):
        assert a.keys() == b.keys()
        for key in a:  # losses, gradient norm, MoE balance figures (over the same global batch)
            if key == "eval/perplexity":  # exp of a loss equal to 1e-5
                assert b[key] == pytest.approx(a[key], rel=1e-5)
            elif key == "grad_norm" or key.startswith("grad_norm/"):  # the gradients are equal; torch's fp32 norm of them is good to ~1e-4 on CPU
                assert b[key] == pytest.approx(a[key], rel=2e-4)
            elif key != "tokens_per_s":
                assert abs(a[key] - b[key]) < 1e-5, key
    # the sharded checkpoint gathers into the same full state a single process writes
    assert latest_checkpoint(tmp_path / "multi").name == "step_00000003"
    # and a one-process run resumes on two (the second process takes the generators of the first)
    result = run_cli("train", arch, "--resume", tmp_path / "single", "--steps", 4, launcher=[str(a) for a in launcher])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(tmp_path / "single")] == [1, 2, 3, 4]


def test_bf16_mixed_precision_trains(tmp_path):
    """The GPU default, exercised on the CPU: bf16 autocast in one process, and FSDP2's bf16 parameters with fp32
    gradient reduction over two, on an MoE model; their losses are the fp32 run's within bf16 rounding."""
    arch = tmp_path / "moe.arch"
    arch.write_text(MICRO_MOE.replace(", jitter=0.05", ""))
    common = ["--steps", 3, "--log-every", 1, "--batch-size", 8, "--micro-batch-size", 2, *FAST[2:]]
    assert train(arch, "--out", tmp_path / "fp32", *common) == 0
    # a process of its own: Accelerate keeps the first precision a process asked for
    result = run_cli("train", arch, "--out", tmp_path / "autocast", "--mixed-precision", "bf16", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = ACCELERATE + ["--config_file", ROOT / "runtime/accelerate/multi_gpu_ddp.yaml", "--num_processes", "2", "-m", "nanollm"]
    result = run_cli("train", arch, "--out", tmp_path / "fsdp", "--parallel", "fsdp", "--mixed-precision", "bf16", *common,
                     launcher=[str(a) for a in launcher])
    assert result.returncode == 0, result.stderr[-3000:]
    reference = [m["loss"] for m in metrics(tmp_path / "fp32")]
    for run in ("autocast", "fsdp"):
        assert json.loads((tmp_path / run / "manifest.json").read_text())["plan"]["mixed_precision"] is True
        losses = [m["loss"] for m in metrics(tmp_path / run)]
        assert losses != reference and losses == pytest.approx(reference, abs=0.02), run


def test_fsdp_materialises_a_layer_at_a_time(tmp_path, monkeypatch):
    """Under FSDP2 the meta model gets its weights layer by layer, each layer sharded before the next is made, and
    they are bit for bit those of an unsharded build with the same seed (tied embeddings, MoE with a shared expert)."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp
    from torch.distributed.tensor import DTensor

    from nanollm.train.parallel import shard

    compiled = nanollm.compile(MICRO_MOE.replace("repeat 2 < global ffn=moe(", "tie_embeddings = true\nrepeat 3 < global ffn=moe(shared=1, "))
    torch.manual_seed(0)
    reference = compiled.build()
    full_at_shard = []  # the unsharded real parameters present at each fully_shard call
    original = fsdp.fully_shard

    def recording(module, **kwargs):
        full_at_shard.append({name for name, p in model.named_parameters() if not isinstance(p, DTensor) and not p.is_meta})
        return original(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", recording)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = copy.deepcopy(compiled.graph)
        shard(model, torch.device("cpu"), mixed_precision=False)
        state = {name: p.full_tensor() for name, p in model.named_parameters()}
        state.update(model.named_buffers())
    finally:
        dist.destroy_process_group()
    expected = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in state)
    layer = lambda i: {name for name, _ in reference.named_parameters() if name.startswith(f"layers.{i}.")}
    assert full_at_shard == [{"embed.weight"} | layer(0), {"embed.weight"} | layer(1), {"embed.weight"} | layer(2),
                             {"embed.weight", "norm.weight"}]


def test_the_one_process_cpu_launch_is_refused(arch, tmp_path):
    launcher = [str(a) for a in ACCELERATE + ["--cpu", "--num_processes", "2", "-m", "nanollm"]]
    result = run_cli("train", arch, "--out", tmp_path / "run", "--steps", 1, launcher=launcher)
    assert result.returncode != 0
    assert "asked for 2 processes but started 1" in result.stderr and "--multi_gpu --num_processes 2" in result.stderr
    assert not (tmp_path / "run").exists()


def histogram_sums(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    return [event.histogram_value.sum for event in events.Histograms(tag)]


def test_moe_metrics_are_logged_and_summarised(moe_arch, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(moe_arch, "--out", run, "--steps", 3, "--log-every", 1, *FAST) == 0
    out = capsys.readouterr().out
    lines = metrics(run)
    for layer in (0, 1):
        for name in ("max_load", "cv", "entropy", "dropped", "balance_loss", "z_loss"):
            assert all(math.isfinite(m[f"layers.{layer}.ffn/{name}"]) for m in lines), name
        assert all(m[f"layers.{layer}.ffn/max_load"] >= 1 and 0 <= m[f"layers.{layer}.ffn/entropy"] <= 1 for m in lines)
        # the per-expert load, a histogram per step: every token's top-2 assignments, counted once
        assert histogram_sums(run, f"layers.{layer}.ffn/load") == [4 * 64 * 2] * 3
    assert "components over the run" in out and "layers.0.ffn" in out and "layers.1.ffn" in out
    assert "entropy" in out and "max_load" in out


def test_compiled_training_matches_eager(moe_arch, tmp_path):
    """torch.compile (one cold compile, ~1 min here) with activation checkpointing: the eager losses, and MoE
    statistics counted once per forward pass (compiled graphs do not replay buffer updates in the recompute)."""
    common = ["--steps", 3, "--log-every", 1, "--activation-checkpointing", *FAST]
    assert train(moe_arch, "--out", tmp_path / "eager", "--no-compile", *common) == 0
    assert train(moe_arch, "--out", tmp_path / "compiled", "--compile", *common) == 0
    assert json.loads((tmp_path / "compiled" / "manifest.json").read_text())["plan"]["compile"] is True
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["eval/loss" if "eval/loss" in a else "aux_loss"] - b["eval/loss" if "eval/loss" in b else "aux_loss"]) < 1e-5
    for run in ("eager", "compiled"):
        assert histogram_sums(tmp_path / run, "layers.0.ffn/load") == [4 * 64 * 2] * 3, run


def test_a_model_too_big_for_memory_is_refused_before_building(arch, tmp_path, capsys, monkeypatch):
    import nanollm.train.trainer as trainer

    run = tmp_path / "run"
    assert train(arch, "--out", run, "--steps", 1, *FAST) == 0
    planned = json.loads((run / "manifest.json").read_text())["plan"]["memory_bytes"]
    compiled = nanollm.compile(arch)
    params = compiled.analysis.params_total
    assert planned["state"] == 16 * params  # fp32 weights, gradients and AdamW's two moments
    logits = 2 * 4 * 4 * 64 * 8192  # fp32 logits of one micro-batch and their gradient
    assert planned["activations"] + planned["logits"] == compiled.analyze(64).activation_bytes * 4 * 2 + logits
    monkeypatch.setattr(trainer, "available_memory", lambda device, processes: planned["total"] - 1)
    in_process_error(capsys, ["train", arch, "--out", tmp_path / "big", "--steps", 1, *FAST], "per process")
    assert not (tmp_path / "big").exists()


def test_evaluations_follow_eval_every_whatever_log_every(arch, tmp_path):
    run = tmp_path / "run"
    assert train(arch, "--out", run, "--steps", 4, *FAST[:6], "--log-every", 3, "--eval-every", 2, "--checkpoint-every", 0) == 0
    lines = metrics(run)
    assert [m["step"] for m in lines] == [2, 3, 4]  # logged at 3, evaluated (and so logged) at 2 and at the end
    assert ["eval/loss" in m for m in lines] == [True, False, True]
