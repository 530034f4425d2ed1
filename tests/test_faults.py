"""Training that survives faults, on CPU: damaged checkpoints (eval and --resume fall back to the newest intact one),
preemption (SIGTERM or SIGINT finishes the step, checkpoints and exits 75; resuming gives the uninterrupted losses bit
for bit, in one process and in two), and a full disk during a save (the run directory stays usable)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_group
from safetensors import SafetensorError
from safetensors.torch import save

import nanollm.train.checkpoint as checkpoint_module
import nanollm.train.trainer as trainer
from nanollm.cli import main
from nanollm.train.checkpoint import TENSOR_FILES, damage, latest_checkpoint
from nanollm.train.log import MetricsLog
from test_train import ACCELERATE, FAST, MICRO, MICRO_MOE, ROOT, in_process_error, metrics, train

PREEMPTED = 75
# 6 steps of an MoE model with router noise (resuming needs every generator and the selection bias), an evaluation at
# step 3 and at the end, a checkpoint every 2 steps
SIGNAL_RUN = ["--steps", 6, "--log-every", 1, *FAST, "--eval-every", 3, "--checkpoint-every", 2, "--keep-checkpoints", 10]


def same_figures(reference: list[dict], lines: list[dict]) -> None:
    """Every logged figure but the speed equal to the last bit, step by step."""
    assert [m["step"] for m in lines] == [m["step"] for m in reference]
    for before, after in zip(reference, lines):
        assert before == {**after, "tokens_per_s": before["tokens_per_s"]}


def err_lines(capture) -> list[str]:
    return capture.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 and a metrics line per step; tests damage copies of it."""
    base = tmp_path_factory.mktemp("trained")
    (base / "micro.arch").write_text(MICRO_MOE)
    assert train(base / "micro.arch", "--out", base / "run", "--steps", 4, "--log-every", 1, *FAST, "--checkpoint-every", 2) == 0
    return base / "run"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, to damage."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def moe_arch(trained) -> Path:
    return trained.parent / "micro.arch"


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def truncate(path: Path) -> int:
    """Cut a file to half its size, as a full disk or an interrupted copy leaves it; returns the full size."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return len(data)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_eval_and_resume_skip_a_damaged_checkpoint_and_say_so(run, moe_arch, capsys, monkeypatch):
    full = truncate(step_dir(run, 4) / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 2
    assert err.strip().splitlines() == [f"skipped damaged checkpoint {step_dir(run, 4)} (model.safetensors is {full // 2:,} bytes "
                                        f"instead of {full:,}); using step_00000002"]

    # resumed from step 2, checkpointing at step 3 with one checkpoint kept, and killed during step 4: the damaged
    # checkpoint was set aside (never deleted), and the intact one kept in its place
    reference = metrics(run)
    real_write = MetricsLog.write

    def killed_at_step_4(log, step, values):
        if step == 4:
            raise KeyboardInterrupt("killed")
        real_write(log, step, values)

    monkeypatch.setattr(MetricsLog, "write", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(moe_arch, "--resume", run, "--checkpoint-every", 3, "--keep-checkpoints", 1)
    assert err_lines(capsys) == [f"skipped damaged checkpoint {step_dir(run, 4)} (model.safetensors is {full // 2:,} bytes "
                                 f"instead of {full:,}); using step_00000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-step_00000004", "latest", "step_00000003"]
    monkeypatch.undo()
    assert train(moe_arch, "--resume", run) == 0
    assert err_lines(capsys) == []
    same_figures(reference, metrics(run))  # from the fallback, the run goes on exactly as it first went


def test_no_intact_checkpoint_is_one_line_and_exit_code_2(run, moe_arch, capsys):
    truncate(step_dir(run, 4) / "model.safetensors")
    (step_dir(run, 2) / "state.json").write_text('{"step": 2, "tok')
    in_process_error(capsys, ["eval", run], f"no checkpoint in {run} is intact: {step_dir(run, 4)} (model.safetensors is ")
    in_process_error(capsys, ["train", moe_arch, "--resume", run, "--steps", 6], f"{step_dir(run, 2)} (state.json unreadable)")
    in_process_error(capsys, ["eval", step_dir(run, 2)], "(state.json unreadable)")  # a checkpoint named itself: no fallback


@pytest.mark.parametrize("harm, problem", [
    (lambda c: truncate(c / "optimizer.safetensors"), "optimizer.safetensors is "),
    (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors missing"),
    (lambda c: (c / "state.json").unlink(), "state.json missing"),
    (lambda c: (c / "model.safetensors").write_bytes(flip_last_byte((c / "model.safetensors").read_bytes())),
     "model.safetensors does not match its SHA-256 checksum"),
], ids=["truncated", "missing", "no-state", "flipped-bit"])
def test_every_kind_of_damage_is_named(trained, tmp_path, harm, problem):
    checkpoint = tmp_path / "step_00000004"
    shutil.copytree(step_dir(trained, 4), checkpoint)
    assert damage(checkpoint, TENSOR_FILES) is None
    harm(checkpoint)
    assert problem in damage(checkpoint, TENSOR_FILES)


def test_checkpoints_from_before_checksums_still_load(run, moe_arch, capsys):
    for step in (2, 4):  # as written before checksums: no `files` in state.json
        state = json.loads((step_dir(run, step) / "state.json").read_text())
        del state["files"]
        (step_dir(run, step) / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 4 and err == ""  # nothing to say when nothing is wrong
    truncate(step_dir(run, 4) / "model.safetensors")  # found by its structure alone
    assert main(["eval", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 2
    assert err.strip().splitlines() == [f"skipped damaged checkpoint {step_dir(run, 4)} (model.safetensors unreadable (Error while "
                                        f"deserializing header: incomplete metadata, file not fully covered)); using step_00000002 "
                                        f"(written before checksums, so not verified)"]
    assert train(moe_arch, "--resume", run, "--steps", 5) == 0
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def uninterrupted(trained) -> list[dict]:
    """The metrics of SIGNAL_RUN without a stop."""
    run = trained.parent / "uninterrupted"
    assert train(trained.parent / "micro.arch", "--out", run, *SIGNAL_RUN) == 0
    return metrics(run)


def send_at(monkeypatch, target: object, name: str, when, signals: tuple[signal.Signals, ...], seen: list) -> None:
    """Patch `target.name` to send this process `signals` at the start of the call for which `when(*args)` holds,
    noting the SIGINT handler in force after them in `seen`."""
    original = getattr(target, name)

    def sending(*args, **kwargs):
        if when(*args):
            for signum in signals:
                os.kill(os.getpid(), signum)
            seen.append(signal.getsignal(signal.SIGINT))
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, sending)


@pytest.mark.parametrize("signals, target, name, when, stopped, kept", [
    # while the metrics line of step 1 is written: the step is done, not yet checkpointed
    ((signal.SIGTERM,), MetricsLog, "write", lambda log, step, values: step == 1, 1, [1]),
    ((signal.SIGINT,), MetricsLog, "write", lambda log, step, values: step == 1, 1, [1]),  # Ctrl-C
    # while the run is set up: a checkpoint of step 0, so that --resume works
    ((signal.SIGTERM,), trainer, "held_out_set", lambda *args: True, 0, [0]),
    # during the evaluation of step 3: it finishes and is logged, then the checkpoint
    ((signal.SIGTERM,), trainer, "evaluate", lambda *args: True, 3, [2, 3]),
    # during the write of step 2's checkpoint: it finishes, and no other is written; a repeated SIGTERM changes nothing
    ((signal.SIGTERM, signal.SIGTERM), checkpoint_module, "save_tensors", lambda path, tensors: path.name == "optimizer.safetensors", 2, [2]),
], ids=["sigterm-mid-step", "sigint-mid-step", "sigterm-in-set-up", "sigterm-in-evaluation", "two-sigterms-in-a-checkpoint-write"])
def test_a_stop_signal_finishes_the_step_checkpoints_and_resumes_bit_for_bit(moe_arch, uninterrupted, tmp_path, monkeypatch, capfd,
                                                                            signals, target, name, when, stopped, kept):
    run, seen = tmp_path / "run", []
    send_at(monkeypatch, target, name, when, signals, seen)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    capfd.readouterr()
    assert train(moe_arch, "--out", run, *SIGNAL_RUN) == PREEMPTED
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    assert seen == [signal.SIG_DFL]  # after the first signal, another SIGINT ends the process at once
    assert err_lines(capfd) == [
        f"{signals[0].name}: finishing this step, then checkpointing and stopping (another SIGINT stops at once, without a checkpoint)",
        f"stopped by {signals[0].name} at step {stopped} of 6, checkpointed in {run / 'checkpoints'}; "
        f"continue with `nanollm train {moe_arch} --resume {run}`"]
    assert sorted((run / "checkpoints").iterdir()) == [run / "checkpoints" / "latest", *(step_dir(run, step) for step in kept)]
    assert latest_checkpoint(run) == step_dir(run, stopped)
    assert [m["step"] for m in metrics(run)] == list(range(1, stopped + 1))
    assert [m["step"] for m in metrics(run) if "eval/loss" in m] == ([stopped] if name == "evaluate" else [])
    monkeypatch.undo()
    assert train(moe_arch, "--resume", run) == 0
    same_figures(uninterrupted, metrics(run))


def two_processes_training(tmp_path: Path) -> list[str]:
    """The command line of `nanollm train` on the dense micro model in two gloo processes under `accelerate launch`."""
    arch = tmp_path / "micro.arch"
    arch.write_text(MICRO)
    return [str(a) for a in ACCELERATE + ["--config_file", ROOT / "runtime/accelerate/multi_gpu_ddp.yaml", "--num_processes", "2",
                                          "-m", "nanollm", "train", arch]]


def logged_steps(run: Path) -> list[str]:
    path = run / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_sigterm_stops_two_processes_at_the_same_step_and_resumes_bit_for_bit(tmp_path):
    """`accelerate launch` forwards the scheduler's SIGTERM to its two gloo processes; they agree on the step to stop
    after, write one whole checkpoint there, and the resumed run logs the uninterrupted run's figures to the last bit."""
    launcher = two_processes_training(tmp_path)
    common = [str(a) for a in ["--steps", 16, "--log-every", 1, *FAST]]
    result = run_group(launcher + ["--out", str(tmp_path / "uninterrupted"), *common])
    assert result.returncode == 0, result.stderr[-3000:]
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as err, subprocess.Popen(launcher + ["--out", str(run), *common], stdout=subprocess.DEVNULL, stderr=err,
                                                 start_new_session=True) as job:
        while len(logged_steps(run)) < 2 and job.poll() is None:  # two steps done: preempt it
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)  # the scheduler signals the launcher, which forwards it
        try:
            job.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)  # nothing of it outlives the test
    assert job.returncode != 0  # the launcher reports the signal as a failure of its own
    stopped = latest_checkpoint(run)
    assert stopped is not None and "stopped by SIGTERM at step" in log.read_text(), log.read_text()[-3000:]
    assert 2 <= json.loads((stopped / "state.json").read_text())["step"] < 16
    result = run_group(launcher + ["--resume", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    same_figures(metrics(tmp_path / "uninterrupted"), metrics(run))


def full_disk_on_call(monkeypatch, name: str, call: int) -> None:
    """From its `call`-th call on, checkpoint_module.`name` (save_file or write_json) writes half its file, then finds
    the disk full, reporting it as each does."""
    original, calls = getattr(checkpoint_module, name), []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) < call:
            return original(tensors, path)
        blob = save(tensors)
        Path(path).write_bytes(blob[:len(blob) // 2])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def write_json(path, data):
        calls.append(path)
        if len(calls) < call:
            return original(path, data)
        text = json.dumps(data)
        path.write_text(text[:len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_module, name, {"save_file": save_file, "write_json": write_json}[name])


@pytest.mark.parametrize("name, call, failed_file", [
    ("save_file", 4, "model.safetensors"),  # the second checkpoint's first file
    ("write_json", 2, "state.json"),  # its last
])
def test_a_full_disk_during_a_save_leaves_the_run_usable(moe_arch, tmp_path, monkeypatch, capsys, name, call, failed_file):
    run = tmp_path / "run"
    full_disk_on_call(monkeypatch, name, call)
    args = ["train", moe_arch, "--out", run, "--steps", 4, "--log-every", 1, *FAST, "--checkpoint-every", 2]
    in_process_error(capsys, args, f"could not write the checkpoint of step 4 (No space left on device: "
                                   f"{run / 'checkpoints' / '.step_00000004.tmp' / failed_file}); the earlier checkpoints are whole: "
                                   f"once that is fixed, continue with --resume {run}")
    monkeypatch.undo()
    assert sorted((run / "checkpoints").iterdir()) == [run / "checkpoints" / "latest", step_dir(run, 2)]  # the partial one is gone
    assert latest_checkpoint(run) == step_dir(run, 2)
    reference = metrics(run)  # steps 1-4 were logged before the save failed
    with open(run / "metrics.jsonl", "a") as log:  # and the full disk cut a metrics line short
        log.write('{"step": 5, "lo')
    assert train(moe_arch, "--resume", run) == 0
    same_figures(reference, metrics(run))


def test_a_failed_write_stops_two_processes_with_one_line_each(tmp_path):
    """A write that really fails (a 1 MiB file-size limit, inherited by the launcher's processes: EFBIG where a full
    disk gives ENOSPC) while each process writes its model shards: both processes stop with the first one's line and
    exit code 2, and no partial checkpoint is left."""
    run = tmp_path / "run"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    result = run_group(two_processes_training(tmp_path) + ["--out", str(run), "--steps", "2", *map(str, FAST)], preexec_fn=limit)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "could not write" in line]
    assert lines == [f"could not write the checkpoint of step 2 (File too large: {run / 'checkpoints' / '.step_00000002.tmp' / 'model'}); "
                     f"the earlier checkpoints are whole: once that is fixed, continue with --resume {run}"] * 2, result.stderr[-3000:]
    assert list((run / "checkpoints").iterdir()) == []
