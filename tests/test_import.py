"""`nanollm import`: the .arch file of a transformers model from its config alone, equal to from_hf's IR.

The fixtures are the published config.json files of Gemma-3-1B, Gemma-3-4B (image-text; its text_config) and
OLMo-3-7B, LFM2-1.2B, Nemotron-H-8B-Base-8K, NVIDIA-Nemotron-3-Nano-30B-A3B (Mamba-2, attention and MoE blocks) and
Kimi-Linear-48B-A3B-Instruct, written from their public values (the OLMo 3 file is assembled from the 7B's documented
values, its architecture keys cross-checked against two sources; the LFM2, Nemotron-H, Nemotron 3 and Kimi-Linear files
against several public copies, Nemotron-H's total of 8,100,852,736 parameters against a published count, Nemotron 3
Nano's 31,577,937,344 against its published 31.6B).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import nanollm
from nanollm.cli import main
from nanollm.hf import arch_from_config, load_config

CONFIGS = Path(__file__).parent / "fixtures" / "hf_configs"
PUBLISHED = ["gemma-3-1b", "gemma-3-4b", "olmo-3-7b", "lfm2-1.2b", "nemotron-h-8b", "nemotron-3-nano-30b-a3b", "kimi-linear-48b-a3b"]


def imported(tmp_path: Path, name: str) -> Path:
    """`nanollm import` of a fixture into a file."""
    out = tmp_path / f"{name}.arch"
    assert main(["import", str(CONFIGS / f"{name}.config.json"), "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", PUBLISHED)
def test_imported_file_compiles_to_from_hfs_ir_with_transformers_parameter_count(name, tmp_path):
    hf = load_config(CONFIGS / f"{name}.config.json")
    compiled = nanollm.compile(imported(tmp_path, name))
    assert compiled.arch == arch_from_config(hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf.text_config if hf.model_type == "gemma3" else hf)
    assert compiled.analysis.params_total == sum(p.numel() for p in model.parameters())


def test_gemma3_1b_folds_its_pattern_into_nested_repeats(tmp_path):
    text = imported(tmp_path, "gemma-3-1b").read_text()
    layers = text[text.index("repeat"):].splitlines()
    assert layers == [
        "repeat 4 <",
        "    repeat 5 < sliding(window=512, rope=rope(theta=10000.0)) >",
        "    global",
        "> ffn=geglu",
        "repeat 2 < sliding(window=512, rope=rope(theta=10000.0)) > ffn=geglu",
    ]
    assert "residual = sandwich" in text and "norm = rmsnorm(zero_centered=true)" in text and "embed_scale = true" in text


def test_olmo3_7b_has_yarn_on_its_full_layers_only(tmp_path):
    arch = nanollm.compile(imported(tmp_path, "olmo-3-7b")).arch
    ropes = {(layer.mixer.name, layer.mixer.kwargs()["rope"].name) for layer in arch.layers}
    assert ropes == {("global", "yarn"), ("sliding", "rope")}
    assert arch.config.residual.name == "postnorm" and arch.config.qk_norm == "projection"


def test_imported_files_size_to_a_budget_and_render(tmp_path, capsys):
    path = imported(tmp_path, "gemma-3-1b")
    assert main(["compile", str(path), "--budget", "1e22", "--json"]) == 0  # one KV head is its narrowest: it grows
    solved = json.loads(capsys.readouterr().out)
    assert solved["solved"]["d_model"] > 1152 and solved["solved"]["n_kv_heads"] > 1 and abs(solved["compute_error"]) < 0.01
    assert main(["render", str(path), "-o", str(tmp_path / "gemma.svg")]) == 0
    assert 'data-residual="sandwich"' in (tmp_path / "gemma.svg").read_text()


def test_import_reads_a_model_directory(tmp_path):
    config = transformers.Olmo2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "olmo2")
    out = tmp_path / "olmo2.arch"
    assert main(["import", str(tmp_path / "olmo2"), "-o", str(out)]) == 0
    assert nanollm.compile(out).arch == arch_from_config(config)


@pytest.mark.parametrize("content, message", [
    (None, "no config.json there"),
    ("{not json", "not a readable JSON config"),
    ('{"hidden_size": 64}', "no model_type"),
    ('{"model_type": "no_such_model"}', "transformers cannot read it"),
    ('{"model_type": "llama"}', "model_type 'llama' is not supported"),
])
def test_import_problems_are_one_line_with_exit_code_2(content, message, tmp_path, capsys):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    assert main(["import", str(path)]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
