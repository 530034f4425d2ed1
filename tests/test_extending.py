"""A component and a residual scheme defined here, outside nanollm/components/, need no edit anywhere else:
they register, compile, analyse, render, import into diagrams and train."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file
from torch import fx, nn

import nanollm
from nanollm.cli import main
from nanollm.compiler import Lowering, Site
from nanollm.components import BRANCH, POSITIONS, REGISTRY, TOKEN_IDS, Component, Param, Residual, register
from nanollm.ir import ModelConfig
from nanollm.optim import split_params
from nanollm.render import Subject, write

SMALL = "vocab_size = 8192\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 128\nseq_len = 64\n"


class RunningMean(Component):
    """Causal running mean of the branch plus a learned vector per token id (a bigram-free toy memory)."""

    def __init__(self, config: ModelConfig, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.table = nn.Embedding(rows, config.d_model)
        self.mix = nn.Linear(config.d_model, config.d_model, bias=False)

    def inputs(self) -> tuple:
        return (BRANCH, TOKEN_IDS, POSITIONS)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mean = x.cumsum(dim=1) / (positions + 1)[None, :, None].to(x.dtype)
        return self.mix(mean) + self.table(token_ids % self.rows)

    def cache_elements(self, seq_len: int) -> int:
        return self.mix.in_features  # the running sum, whatever the length

    def param_roles(self) -> dict[str, str]:
        return {}  # its own parameters: none (the table and the matrix are its children's)


class Gate(nn.Module):
    """A learned scalar on a sublayer's output, starting at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(()))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.alpha)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return self.alpha * out


class ReZero(Residual):
    """h + alpha f(h), alpha starting at 0 (Bachlechner et al. 2020): no norm, every layer the identity at first."""

    formula = "each sublayer adds alpha f(h) to the stream h"

    def site_modules(self, site: Site) -> dict[str, nn.Module]:
        return {"gate": Gate()}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        return stream

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        return g.add(stream, g.call(site, "gate", (out,)), site.node("residual"))

    def picture(self, slot: str) -> tuple[list[str], list[str]]:
        return [], ["× alpha"]


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    """Register both for this file's tests only (the README documents nanollm's own components)."""
    register("running_mean", "mixer", Param("rows", int, "rows of the token table", default=256, minimum=1))(RunningMean)
    register("rezero", "residual")(ReZero)
    yield
    del REGISTRY["running_mean"], REGISTRY["rezero"]


def test_a_component_from_outside_compiles_with_the_inputs_it_declares():
    compiled = nanollm.compile(SMALL + "running_mean(rows=32) ffn=none; global")
    node = next(n for n in compiled.graph.graph.nodes if n.name == "layers_0_mixer")
    assert [arg.name for arg in node.args] == ["layers_0_mixer_norm", "input_ids", "positions"]
    analysis = compiled.analyze(64)
    assert [slot for slot, _ in compiled.arch.layers[0].sublayers] == ["mixer"]
    assert analysis.layers[0].params == 32 * 64 + 64 * 64 + 64  # table, matrix, its pre-norm
    assert analysis.layers[0].flops_per_token_fwd == 2 * 64 * 64  # its one matrix product per token
    assert analysis.layers[0].cache_bytes_per_token == 2 * 64 / 64


def test_a_component_from_outside_gets_its_table_out_of_muon():
    model = nanollm.compile(SMALL + "running_mean; global").build()
    split = split_params(model)
    assert "layers.0.mixer.table.weight" in split.tables and "layers.0.mixer.mix.weight" in split.hidden_matrices


def test_a_residual_scheme_from_outside_starts_as_the_identity():
    torch.manual_seed(0)
    model = nanollm.compile(SMALL + "residual = rezero\nrepeat 2 < global >").build()
    assert sorted(name for name, _ in model.named_parameters() if name.endswith("_gate.alpha")) == [
        f"layers.{i}.{slot}_gate.alpha" for i in (0, 1) for slot in ("ffn", "mixer")
    ]
    ids = torch.randint(0, 8192, (2, 16))
    logits, _ = model(ids)
    expected = torch.nn.functional.linear(model.norm(model.embed(ids)), model.embed.weight)  # every layer adds 0
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_per_layer_residual_override_draws_and_analyses(tmp_path):
    compiled = nanollm.compile(SMALL + "global residual=rezero; running_mean")
    assert [layer.residual.name for layer in compiled.arch.layers] == ["rezero", "prenorm"]
    write(tmp_path / "model.svg", Subject("model", compiled.arch, compiled.graph, compiled.analyze(64)))
    svg = (tmp_path / "model.svg").read_text()
    assert "× alpha" in svg and "running_mean" in svg and 'data-residual="rezero"' in svg
    for suffix in (".mmd", ".dot", ".html"):
        write(tmp_path / f"model{suffix}", Subject("model", compiled.arch, compiled.graph, compiled.analyze(64)))
        assert "running_mean" in (tmp_path / f"model{suffix}").read_text()


def test_both_train_under_nanollm_train(tmp_path):
    path = tmp_path / "outside.arch"
    path.write_text(SMALL + "residual = rezero\nrepeat 2 < running_mean(rows=64); global >\n")
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--steps", "12", "--batch-size", "4", "--log-every", "1", "--lr", "1e-2",
                 "--eval-tokens", "256", "--eval-every", "0", "--checkpoint-every", "0", "--optimizer", "muon"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(math.log(8192), abs=0.3) and losses[-1] < losses[0] - 0.1
    weights = load_file(str(run / "checkpoints" / "step_00000012" / "model.safetensors"))
    assert all(weights[f"layers.{i}.{slot}_gate.alpha"] != 0 for i in range(4) for slot in ("mixer", "ffn"))  # the gates learned


def test_every_package_folder_is_listed_for_the_wheel():
    """A new component family folder is found by the import of the registry, and by pip only if listed: a missing
    entry fails here rather than in a user's wheel."""
    root = Path(__file__).parent.parent
    pyproject = (root / "pyproject.toml").read_text()
    folders = {str(p.parent.relative_to(root)).replace("/", ".") for p in (root / "nanollm").rglob("__init__.py")}
    assert all(f'"{name}"' in pyproject for name in folders), sorted(f for f in folders if f'"{f}"' not in pyproject)
