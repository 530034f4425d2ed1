"""What earlier versions wrote keeps working: run directories (format-1 manifests: every layer a mixer and an FFN)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from nanollm.cli import main
from nanollm.ir import arch_from_json, arch_to_json
from nanollm.resolve import load

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"  # written by nanollm before the block contract, stopped at step 4 of 6


def test_a_run_written_before_the_block_contract_resumes_bit_for_bit(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert main(["train", str(run / "micro_v1.arch"), "--resume", str(run)]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == json.loads((FIXTURE / "uninterrupted_losses.json").read_text())["losses"]  # the old code's own run


def test_a_format_1_manifest_reads_as_the_model_its_file_compiles_to():
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    assert "format" not in manifest["arch"] and set(manifest["arch"]["layers"][0]) == {"mixer", "ffn"}
    arch = arch_from_json(manifest["arch"])
    assert arch == load(FIXTURE / "micro_v1.arch")
    assert arch_from_json(arch_to_json(arch)) == arch  # and today's format round-trips


def test_a_run_written_before_the_block_contract_evaluates(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
