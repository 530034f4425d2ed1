"""The `nanollm` command line: compile, graph, fmt, and how it reports bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import nanollm
from nanollm.cli import main

ROOT = Path(__file__).parent.parent
BASELINE = str(ROOT / "archs/qwen3_0_6b.arch")
SCHEMA = {"params_total", "params_active", "params_embedding", "params_memory", "flops_per_token_fwd", "flops_per_token_train",
          "cache_bytes_per_token", "state_bytes", "seq_len", "n_layers", "layers", "activation_bytes"}
LAYER_SCHEMA = {"index", "residual", "mixer", "ffn", "params", "params_active", "flops_per_token_fwd", "cache_bytes_per_token", "state_bytes"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_json_follows_the_schema(capsys):
    code, out, _ = run(capsys, "compile", str(ROOT / "archs/hybrid_moe.arch"), "--json", "--seq-len", "1024")
    report = json.loads(out)
    assert code == 0 and set(report) == SCHEMA
    assert all(set(layer) == LAYER_SCHEMA for layer in report["layers"])
    assert report["seq_len"] == 1024 and report["n_layers"] == len(report["layers"]) == 12
    assert report["layers"][0]["mixer"].startswith("sliding(window=4096, heads=16, kv_heads=8, head_dim=128, qk_norm=head, rope=rope(")
    assert report["layers"][2]["ffn"] == (
        "moe(top=2, experts=8, d_ff=3072, shared=0, shared_gate=false, router=softmax, hash=false, norm_topk=true, scale=1.0, groups=1, top_groups=1, "
        "balance=aux, aux=0.01, bias_rate=0.001, z_loss=0.0, jitter=0.0, capacity=0.0, drop=score, router_bias=false, expert_bias=false, "
        "alpha=1.0, limit=0.0, up_offset=0.0, layout=stacked, activation=swiglu)"
    )
    api = nanollm.compile(ROOT / "archs/hybrid_moe.arch").analyze(1024)
    assert report == api.to_json()


def test_compile_table(capsys):
    code, out, _ = run(capsys, "compile", BASELINE, "--seq-len", "256")
    assert code == 0
    assert "596.05M" in out and "inference cache/token" in out and "114.69kB" in out and "prenorm, rmsnorm" in out
    assert out.count("│ global │ swiglu │") == 28


def test_graph_prints_component_calls(capsys):
    code, out, _ = run(capsys, "graph", str(ROOT / "archs/gemma_hybrid.arch"))
    assert code == 0
    assert "call_module[target=layers.23.mixer]" in out and "%lm_head" in out and "return (lm_head, aux_loss)" in out


def test_fmt_prints_and_writes_the_canonical_form(capsys, tmp_path):
    path = tmp_path / "m.arch"
    path.write_text("repeat 2<global ;sliding( 8 )>  # two pairs\nd_model=512\n")
    code, out, _ = run(capsys, "fmt", str(path))
    assert code == 0 and out == "d_model = 512\n\nrepeat 2 < global; sliding(8) >\n"
    assert run(capsys, "fmt", "--write", str(path))[0] == 0
    assert path.read_text() == out


@pytest.mark.parametrize("command", ["compile", "graph", "fmt"])
def test_bad_arch_is_reported_with_position_and_exit_code_2(capsys, tmp_path, command):
    path = tmp_path / "bad.arch"
    path.write_text("d_model = 512\nrepeat 2 < global; slidng(8) >\n")
    code, out, err = run(capsys, command, str(path))
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"{path}:2:20: unknown mixer 'slidng'",
        "  repeat 2 < global; slidng(8) >",
        "                     ^^^^^^",
        "  did you mean 'sliding'?",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", "missing.arch"], "cannot read missing.arch: No such file or directory"),
        (["compile", "."], "cannot read .: Is a directory"),
        (["compile", BASELINE, "--seq-len", "0"], "nanollm compile: error: argument --seq-len: must be at least 1, got 0"),
        (["compile", BASELINE, "--seq-len", "4k"], "nanollm compile: error: argument --seq-len: expected a whole number, got '4k'"),
        (["frobnicate"], "nanollm: error: argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_usage_and_file_errors_are_one_line(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(message)


def test_console_script_reports_without_traceback(tmp_path):
    path = tmp_path / "bad.arch"
    path.write_text("global ffn=moe(top=4, experts=2)\n")
    script = Path(sys.executable).parent / "nanollm"
    result = subprocess.run([str(script), "compile", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}:1:12: moe: top=4 is more than experts=2")
