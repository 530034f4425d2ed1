"""`nanollm render`: diagrams drawn from the IR and the analysis, in every format, checked by independent parsers."""
from __future__ import annotations

import dataclasses
import math
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import mermaidx
import networkx as nx
import pydot
import pytest
import torch
from torch.fx.passes.shape_prop import ShapeProp

import nanollm
from nanollm.human import human
from nanollm.budget import solve
from nanollm.cli import main
from nanollm.ir import Group
from nanollm.render import Subject, network
from nanollm.render.graph import shape_text
from nanollm.render.stack import Repeated, stack
from nanollm.render.text import dot, mermaid

ROOT = Path(__file__).parent.parent
EXAMPLE, EXAMPLE_SVG = ROOT / "archs/hybrid_moe.arch", ROOT / "archs/hybrid_moe.svg"
SVG = "{http://www.w3.org/2000/svg}"
# 100 layers with no repeat groups: sixteen 5:1 local/global groups and four more local layers.
FLAT_100 = "d_model = 256\nn_heads = 4\nn_kv_heads = 2\n" + "\n".join("global" if i % 6 == 5 else "sliding(512)" for i in range(100))
SMALL_MOE = "d_model = 128\nn_heads = 2\nn_kv_heads = 1\nseq_len = 64\nrepeat 2 < sliding(16) ffn=moe(top=1, experts=4, d_ff=64); global >"
TINY_MOE = SMALL_MOE.replace("repeat 2", "repeat 1")  # Mermaid lays out in QuickJS: keep its graph small


def render(tmp_path: Path, source: Path | str, suffix: str, *options: str) -> tuple[int, str]:
    """Run `nanollm render` on a file (or .arch text, written to a file first); the exit code and the output text."""
    if isinstance(source, str):
        path = tmp_path / "model.arch"
        path.write_text(source)
        source = path
    out = tmp_path / f"out{suffix}"
    code = main(["render", str(source), "-o", str(out), *options])
    return code, out.read_text(encoding="utf-8") if code == 0 and suffix not in (".png", ".pdf") else ""


def items_with_multiplicity(items, outer: int = 1):
    """(block, how many layers the brackets around it make it stand for)."""
    for item in items:
        if isinstance(item, Repeated):
            yield from items_with_multiplicity(item.items, outer * item.count)
        else:
            yield item, outer


# ---- the IR outline and the folding --------------------------------------------------------------


def test_outline_records_repeat_groups_and_takes_no_part_in_equality():
    arch = nanollm.compile(ROOT / "archs/gemma_hybrid.arch").arch
    assert arch.outline == (Group(4, 0, 24, (Group(5, 0, 5, (0,)), 5)),)
    flat = dataclasses.replace(arch, outline=())
    assert flat == arch and hash(flat) == hash(arch)
    assert nanollm.compile("d_model = 512").arch.outline == (Group(28, 0, 28, (0,)),)  # no layer list: repeat n_layers
    assert nanollm.compile("global; repeat 2 < sliding(8); global > ffn=moe").arch.outline == (0, Group(2, 1, 5, (1, 2)))


@pytest.mark.parametrize("source, drawn", [
    ("archs/qwen3_0_6b.arch", [(28, "global")]),
    ("archs/gemma_hybrid.arch", [(20, "sliding"), (4, "global")]),
    ("archs/hybrid_moe.arch", [(8, "sliding"), (4, "global")]),
    ("repeat 3 < sliding; sliding(8) >", [(1, "sliding"), (5, "sliding")]),  # repetitions differ: folded instead
    (FLAT_100, [(80, "sliding"), (16, "global"), (4, "sliding")]),
], ids=["qwen3", "gemma", "hybrid_moe", "carried window", "flat 100"])
@pytest.mark.parametrize("outline", [True, False], ids=["as written", "folded"])
def test_stack_draws_each_distinct_block_once_and_covers_every_layer(source, drawn, outline):
    arch = nanollm.compile(ROOT / source if source.endswith(".arch") else source).arch
    arch = arch if outline else dataclasses.replace(arch, outline=())  # as from_hf gives it
    pairs = list(items_with_multiplicity(stack(arch)))
    assert [(len(b.indices), arch.layers[b.index].mixer.name) for b, _ in pairs] == drawn
    assert sorted(i for b, _ in pairs for i in b.indices) == list(range(len(arch.layers)))
    for block, multiplicity in pairs:
        assert len(block.indices) == multiplicity  # the brackets' counts multiply up to the layers drawn
        assert all(arch.layers[i] == arch.layers[block.index] for i in block.indices)


# ---- SVG ---------------------------------------------------------------------------------------------


def svg_texts(element: ET.Element) -> list[str]:
    """Every text line under an element (tspans joined)."""
    return ["".join(t.itertext()) for t in element.iter(f"{SVG}text")]


def check_stack_svg(text: str, arch, analysis) -> ET.Element:
    """The SVG parses, names every kind, and every number it shows is the analysis's."""
    root = ET.fromstring(text)
    words = " ".join(svg_texts(root))
    for layer in arch.layers:
        assert layer.mixer.name in words and layer.ffn.name in words
    assert f"{human(analysis.params_total)} params" in words and f"{human(analysis.flops_per_token_fwd)} FLOPs/token" in words
    groups = root.findall(f".//{SVG}g[@class='block']")
    covered = []
    for group in groups:
        layers = [int(i) for i in group.get("data-layers").split()]
        covered += layers
        shown = svg_texts(group)
        for i in layers:
            report = analysis.layers[i]
            assert arch.layers[i].mixer.name == group.get("data-mixer") and arch.layers[i].ffn.name == group.get("data-ffn")
            assert int(group.get("data-params")) == report.params and int(group.get("data-params-active")) == report.params_active
            assert float(group.get("data-flops-per-token-fwd")) == report.flops_per_token_fwd
            assert float(group.get("data-cache-bytes-per-token")) == report.cache_bytes_per_token
            assert f"params {human(report.params)}" in shown and f"FLOPs/token {human(report.flops_per_token_fwd)}" in shown
            assert (f"active {human(report.params_active)}" in shown) == (report.params_active != report.params)
    assert sorted(covered) == list(range(len(arch.layers)))
    return root


def bracket_counts(root: ET.Element) -> list[int]:
    """The "xN" brackets drawn, outermost first (their data and their label agree)."""
    counts = []
    for group in root.iter(f"{SVG}g"):
        if group.get("class") == "repeat":
            assert svg_texts(group) == [f"×{group.get('data-count')}"]
            counts.append(int(group.get("data-count")))
    return counts[::-1]  # drawn innermost first


@pytest.mark.parametrize("name, brackets", [("qwen3_0_6b", [28]), ("gemma_hybrid", [4, 5]), ("hybrid_moe", [4, 2])])
def test_stack_svg_shows_the_analysis_and_fits_a_screen(tmp_path, name, brackets):
    code, text = render(tmp_path, ROOT / f"archs/{name}.arch", ".svg")
    compiled = nanollm.compile(ROOT / f"archs/{name}.arch")
    root = check_stack_svg(text, compiled.arch, compiled.analysis)
    assert code == 0 and bracket_counts(root) == brackets
    assert float(root.get("width")) <= 800 and float(root.get("height")) <= 1000  # read at 100%, no zooming


def test_a_flat_100_layer_model_folds_to_a_few_blocks(tmp_path):
    code, text = render(tmp_path, FLAT_100, ".svg")
    compiled = nanollm.compile(FLAT_100)
    root = check_stack_svg(text, compiled.arch, compiled.analysis)
    assert code == 0 and bracket_counts(root) == [16, 5, 4]
    assert float(root.get("height")) <= 1400


def test_many_distinct_blocks_are_drawn_one_row_each(tmp_path):
    source = "d_model = 256\nn_heads = 4\nn_kv_heads = 2\n" + "\n".join(f"sliding({64 * (i + 1)})" for i in range(12))
    code, text = render(tmp_path, source, ".svg")
    compiled = nanollm.compile(source)
    root = check_stack_svg(text, compiled.arch, compiled.analysis)
    assert code == 0 and bracket_counts(root) == [] and len(root.findall(f".//{SVG}g[@class='block']")) == 12
    assert float(root.get("height")) <= 12 * 80 + 400  # rows, not the two-sublayer blocks


def test_budget_renders_the_solved_sizes(tmp_path):
    path = ROOT / "archs/gemma_hybrid.arch"
    code, text = render(tmp_path, path, ".svg", "--budget", "1e20", "--seq-len", "1024")
    solution = solve(path, 1e20, seq_len=1024)
    root = check_stack_svg(text, solution.arch, solution.analysis)
    depth = solution.arch.outline[0].count
    assert code == 0 and depth != 4 and bracket_counts(root) == [depth, 5]
    assert f"d_model {solution.arch.config.d_model}" in " ".join(svg_texts(root)) and "sized to 1e+20 training FLOPs" in text


def test_budget_graph_view_shows_the_solved_shapes(tmp_path):
    path = ROOT / "archs/gemma_hybrid.arch"
    code, text = render(tmp_path, path, ".mmd", "--budget", "1e20", "--seq-len", "1024", "--view", "graph")
    d_model = solve(path, 1e20, seq_len=1024).arch.config.d_model
    assert code == 0 and f"1×1024×{d_model}" in text


def test_readme_example_is_the_command_output(tmp_path):
    code, text = render(tmp_path, EXAMPLE, ".svg")
    assert code == 0
    assert text == EXAMPLE_SVG.read_text(encoding="utf-8"), f"regenerate it: nanollm render {EXAMPLE.relative_to(ROOT)} -o {EXAMPLE_SVG.relative_to(ROOT)}"
    assert f"]({EXAMPLE_SVG.relative_to(ROOT)})" in (ROOT / "README.md").read_text()


# ---- the graph view -----------------------------------------------------------------------------------


def test_graph_view_shows_every_fx_node_with_its_shape(tmp_path):
    code, text = render(tmp_path, SMALL_MOE, ".svg", "--view", "graph")
    compiled = nanollm.compile(SMALL_MOE)
    model = compiled.graph
    ShapeProp(model).propagate(torch.zeros(1, 64, dtype=torch.long, device="meta"))  # torch's own shape pass
    nodes = {g.get("data-name"): svg_texts(g) for g in ET.fromstring(text).iter(f"{SVG}g") if g.get("class") == "node"}
    assert code == 0 and list(nodes) == [n.name for n in model.graph.nodes]
    for node in model.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None:
            shape = tuple(meta.shape) if hasattr(meta, "shape") else tuple(tuple(m.shape) for m in meta)
            assert nodes[node.name][1].endswith(f"→ {shape_text(shape)}"), node.name


# ---- DOT and Mermaid, read back by independent parsers ---------------------------------------------------


def subject(source: Path | str) -> Subject:
    compiled = nanollm.compile(source)
    return Subject("m", compiled.arch, compiled.graph, compiled.analysis)


def dot_statements(graph: pydot.Dot):
    """Every node statement and cluster of a parsed DOT graph, clusters included: (nodes, clusters)."""
    nodes, clusters = list(graph.get_nodes()), []
    for sub in graph.get_subgraphs():
        inner_nodes, inner_clusters = dot_statements(sub)
        nodes += inner_nodes
        clusters += [sub, *inner_clusters]
    return nodes, clusters


@pytest.mark.parametrize("source, view", [(EXAMPLE, "stack"), (ROOT / "archs/gemma_hybrid.arch", "stack"), (SMALL_MOE, "graph")],
                         ids=["hybrid_moe", "gemma", "graph"])
def test_dot_parses_to_the_same_network(tmp_path, source, view):
    expected = network(subject(source), view)
    path = tmp_path / "m.dot"
    path.write_text(dot(expected), encoding="utf-8")
    parsed = nx.nx_pydot.read_dot(path)  # networkx's reader, through pydot's DOT parser
    assert set(parsed.nodes) == set(expected.graph.nodes) and set(parsed.edges()) == set(expected.graph.edges)
    nodes, _ = dot_statements(pydot.graph_from_dot_file(path)[0])
    labels = {n.get_name().strip('"'): n.get_label().strip('"').split("\\n") for n in nodes if n.get_label()}
    assert labels == dict(expected.graph.nodes(data="lines"))


def test_dot_clusters_carry_the_brackets_and_the_figures():
    compiled = nanollm.compile(EXAMPLE)
    (graph,) = pydot.graph_from_dot_data(dot(network(subject(EXAMPLE), "stack")))
    labels = [cluster.get_label().strip('"') for cluster in dot_statements(graph)[1]]
    assert labels[:2] == ["×4", "×2"]  # then the blocks, first layer first
    for label, (span, first) in zip(labels[2:], (("layers 0–1, 3–4, 6–7, 9–10", 0), ("layers 2, 5, 8, 11", 2))):
        r = compiled.analysis.layers[first]
        assert label == (f"{span}\\nparams {human(r.params)}, active {human(r.params_active)}, "
                         f"FLOPs/token {human(r.flops_per_token_fwd)}, cache {human(r.cache_bytes_per_token, 'B')}/token")


@pytest.mark.parametrize("source, view", [(EXAMPLE, "stack"), (ROOT / "archs/qwen3_0_6b.arch", "stack"), (TINY_MOE, "graph")],
                         ids=["hybrid_moe", "qwen3", "graph"])
def test_mermaid_is_read_by_mermaid_itself(source, view):
    drawing = network(subject(source), view)
    text = mermaid(drawing)
    drawn = mermaidx.render(text).svg()  # mermaid.js (its parser and renderer) run in QuickJS
    for name, lines in drawing.graph.nodes(data="lines"):
        assert lines[0].replace("<", "&lt;") in drawn, name
    broken = text.rsplit("\n  end", 1)[0] + "\n" if "\n  end" in text else text.replace("-->", "--", 1)
    with pytest.raises(RuntimeError, match="Parse error"):  # the parser does reject what is not Mermaid
        mermaidx.render(broken).svg()


# ---- HTML and the command line ------------------------------------------------------------------------


class Tables(HTMLParser):
    """The rows of every <table>, and whether anything is loaded from outside the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.external = False

    def handle_starttag(self, tag, attrs):
        self.external |= any(name in ("src", "href") for name, _ in attrs) or tag in ("script", "link")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])

    def handle_data(self, data):
        if self.lasttag in ("td", "th") and self.tables and self.tables[-1] and data.strip():
            self.tables[-1][-1].append(data)


def test_html_page_is_self_contained_with_the_svg_and_the_tables(tmp_path, capsys):
    code, text = render(tmp_path, EXAMPLE, ".html", "--seq-len", "2048")
    compiled = nanollm.compile(EXAMPLE)
    analysis = compiled.analyze(2048)
    page = Tables()
    page.feed(text)
    assert code == 0 and not page.external
    check_stack_svg(text[text.index("<svg"):text.index("</svg>") + 6], compiled.arch, analysis)
    layers, totals = page.tables
    assert len(layers) == 1 + len(analysis.layers) and layers[3][:2] == ["2", "global"]
    assert [row[3] for row in layers[1:]] == [human(r.params) for r in analysis.layers]
    assert ["forward FLOPs/token", human(analysis.flops_per_token_fwd)] in totals


def test_render_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    assert render(tmp_path, EXAMPLE, ".jpg")[0] == 2
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setattr("nanollm.render.shutil.which", lambda program: None)  # as on a machine without Graphviz
    assert render(tmp_path, EXAMPLE, ".png")[0] == 2
    err = capsys.readouterr().err
    assert "`dot`" in err and err.count("\n") == 1
    assert render(tmp_path, EXAMPLE, ".svg", "--tokens", "1e9")[0] == 2
    assert capsys.readouterr().err == "--tokens needs --budget\n"
    with pytest.raises(SystemExit) as exit_:
        main(["render", str(EXAMPLE), "-o", str(tmp_path / "x.svg"), "--view", "boxes"])
    assert exit_.value.code == 2


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz's dot is not installed")
@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_png_and_pdf_through_graphviz(tmp_path, suffix, magic):
    assert render(tmp_path, EXAMPLE, suffix)[0] == 0
    assert (tmp_path / f"out{suffix}").read_bytes().startswith(magic)


def test_no_nan_or_overflowing_coordinates(tmp_path):
    for view in ("stack", "graph"):
        code, text = render(tmp_path, ROOT / "archs/qwen3_0_6b.arch", ".svg", "--view", view)
        root = ET.fromstring(text)
        numbers = [float(v) for e in root.iter() for k, v in e.attrib.items() if k in ("x", "y", "width", "height", "cx", "cy")
                   and v.replace(".", "").lstrip("-").isdigit()]
        assert code == 0 and all(math.isfinite(v) and 0 <= v <= max(float(root.get("width")), float(root.get("height"))) for v in numbers)


PLACEMENTS = "vocab_size = 512\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 128\nseq_len = 64\n"


@pytest.mark.parametrize("residual, norm, label, chain", [
    ("prenorm", "rmsnorm", "RMSNorm", ["norm", "component", "add"]),
    ("postnorm", "rmsnorm", "RMSNorm", ["component", "norm", "add"]),
    ("sandwich", "rmsnorm(zero_centered=true)", "RMSNorm (1 + w)", ["norm", "component", "norm", "add"]),
])
def test_diagrams_draw_each_residual_schemes_norm_placement(tmp_path, residual, norm, label, chain):
    source = PLACEMENTS + f"residual = {residual}\nnorm = {norm}\nglobal; sliding(8) ffn=geglu"
    code, text = render(tmp_path, source, ".svg")
    assert code == 0
    root = ET.fromstring(text)
    for group in root.findall(f".//{SVG}g[@class='block']"):
        assert group.get("data-residual") == residual
        assert svg_texts(group).count(label) == 2 * chain.count("norm")  # two sublayers per block
    assert f"norm is {label}" in " ".join(svg_texts(root))
    network_ = network(subject(source), "stack")
    first = "b0_mixer"  # the first block's mixer: the path into its residual add, as drawn
    path = nx.shortest_path(network_.graph, next(n for n in network_.graph if n.startswith("b0_mixer") and "before" in n)
                            if chain[0] == "norm" else first, "b0_mixer_add")
    kinds = ["add" if n.endswith("_add") else "component" if n == first else "norm" for n in path]
    assert kinds == chain
    assert [network_.graph.nodes[n]["lines"][0] for n in path if n not in (first, "b0_mixer_add")] == [label] * chain.count("norm")
    (graph,) = pydot.graph_from_dot_data(dot(network_))  # and the text formats parse
    assert len(graph.get_edges()) == network_.graph.number_of_edges()
