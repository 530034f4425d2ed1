"""Start-up of the command line: analyses kept in the cache folder read back unchanged, and nothing heavy imported."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import nanollm
from nanollm import analysis

TINY = "vocab_size = 128\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 128\nseq_len = 32\nrepeat 2 < sliding(8); global ffn=moe(top=2, experts=4, d_ff=64) >\n"
ROOT = Path(__file__).resolve().parent.parent


def test_a_stored_analysis_reads_back_equal_to_a_fresh_count(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLLM_CACHE", str(tmp_path))
    compiled = nanollm.compile(TINY)
    stored = analysis.stored_analysis(compiled.arch, compiled.graph, 32)
    assert len(list((tmp_path / "analyses").glob("*.json"))) == 1

    def refuse(*args):
        raise AssertionError("counted again instead of reading the stored analysis")

    monkeypatch.setattr(analysis, "analyze", refuse)
    again = analysis.stored_analysis(compiled.arch, compiled.graph, 32)
    monkeypatch.undo()
    assert dataclasses.asdict(again) == dataclasses.asdict(stored) == dataclasses.asdict(analysis.analyze(compiled.arch, compiled.graph, 32))


def test_the_key_of_a_stored_analysis_changes_with_a_setting_an_argument_and_the_sequence_length():
    def key(text: str, seq_len: int = 32) -> str:
        compiled = nanollm.compile(text)
        return analysis.analysis_key(compiled.arch, compiled.graph, seq_len)

    base = key(TINY)
    assert base == key(TINY)
    others = {key(TINY, 33), key(TINY.replace("d_ff = 128", "d_ff = 192")), key(TINY.replace("sliding(8)", "sliding(4)")),
              key(TINY.replace("top=2", "top=1"))}
    assert base not in others and len(others) == 4


def test_analysis_cache_zero_counts_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLLM_CACHE", str(tmp_path))
    monkeypatch.setenv("NANOLLM_ANALYSIS_CACHE", "0")
    compiled = nanollm.compile(TINY)
    analysis.stored_analysis(compiled.arch, compiled.graph, 32)
    assert not (tmp_path / "analyses").exists()


def test_compile_json_counting_afresh_imports_neither_sympy_nor_dynamo_and_reading_back_imports_nothing_heavy(tmp_path):
    """The issue's command, `nanollm compile archs/qwen3_0_6b.arch --json`: its first run counts (fvcore's trace on meta
    tensors, under nanollm.shapes' rules, so no Python meta kernel of torch's runs to import sympy or torch._dynamo);
    the second reads that analysis back."""
    code = ("import sys, contextlib, io; from nanollm.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()): main(['compile', {str(ROOT / 'archs/qwen3_0_6b.arch')!r}, '--json'])\n"
            "print(json.dumps(sorted(m for m in ('torch._dynamo', 'torch.distributed.tensor', 'fvcore', 'sympy') if m in sys.modules)))")
    env = {**os.environ, "NANOLLM_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    first, second = (json.loads(subprocess.run([sys.executable, "-c", "import json\n" + code], env=env, capture_output=True, text=True,
                                               check=True).stdout) for _ in range(2))
    assert list((tmp_path / "analyses").glob("*.json"))  # the first run counted, and kept what it counted
    assert first == ["fvcore"]
    assert second == []


def test_no_shipped_architectures_first_analysis_imports_sympy_or_dynamo():
    """Every file in archs/ analysed afresh in one fresh process: every op its components run on meta has a nanollm.shapes
    rule, or a C++ meta kernel (a new op without either brings torch's Python kernels, and their imports, back)."""
    code = ("import json, sys; from pathlib import Path; import nanollm\n"
            f"for path in sorted(Path({str(ROOT / 'archs')!r}).glob('*.arch')): nanollm.compile(path).analyze(256)\n"
            "print(json.dumps(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules)))")
    env = {**os.environ, "NANOLLM_ANALYSIS_CACHE": "0", "PYTHONPATH": str(ROOT)}
    assert json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout) == []


def test_a_model_with_a_class_that_has_no_source_file_is_counted_not_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLLM_CACHE", str(tmp_path))
    compiled = nanollm.compile(TINY)
    notebook_class = type("Notebook", (torch.nn.Module,), {"__module__": "a_notebook_cell"})  # a module with no file behind it
    compiled.graph.add_module("notebook", notebook_class())
    assert analysis.analysis_key(compiled.arch, compiled.graph, 32) is None
    analysis.stored_analysis(compiled.arch, compiled.graph, 32)
    assert not (tmp_path / "analyses").exists()
