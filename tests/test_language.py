"""The .arch language: defaults, repeats, attributes, definitions, bases, formatting and errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from nanollm.components import complete
from nanollm.errors import ArchError
from nanollm.ir import Call, Layer, ModelConfig
from nanollm.resolve import load, read, resolve
from nanollm.syntax import format_file, parse

ARCHS = sorted((Path(__file__).parent.parent / "archs").rglob("*.arch"))  # with the ablation families in folders
BASELINE = ModelConfig()


def call(kind: str, name: str, **args) -> Call:
    """A call as resolution gives it: the given arguments, the baseline's defaults for the rest."""
    return complete(Call(name, tuple(args.items())), kind, BASELINE)


SWIGLU = call("ffn", "swiglu")
GLOBAL = call("mixer", "global")


def sliding(window: int) -> Call:
    return call("mixer", "sliding", window=window)


def moe(**given) -> Call:
    return call("ffn", "moe", **given)


def layer(mixer: Call, ffn: Call) -> Layer:
    """A pre-norm layer of a mixer and an FFN."""
    return Layer((("mixer", mixer), ("ffn", ffn)), BASELINE.residual)


def test_empty_file_is_the_qwen3_baseline():
    arch = load("")
    assert arch.config == ModelConfig()
    assert arch.config.vocab_size == 151936 and arch.config.d_model == 1024 and arch.config.n_layers == 28
    assert arch.layers == (layer(GLOBAL, SWIGLU),) * 28


def test_the_one_line_example():
    arch = load("repeat 4 < sliding(4096); sliding; global > ffn=moe(top2)")
    assert [layer.mixer for layer in arch.layers] == [sliding(4096), sliding(4096), GLOBAL] * 4
    assert all(layer.ffn == moe(top=2) for layer in arch.layers)
    assert arch.config.n_layers == 12


def test_nested_repeats_and_attribute_scoping():
    arch = load(
        """
        repeat 2 <
            global ffn=swiglu(d_ff=512)
            repeat 2 < sliding(64) > ffn=moe(top=1, experts=4)
            sliding(32)
        > ffn=moe(experts=16)
        """
    )
    expected = [
        layer(GLOBAL, call("ffn", "swiglu", d_ff=512)),
        layer(sliding(64), moe(top=1, experts=4)),
        layer(sliding(64), moe(top=1, experts=4)),
        layer(sliding(32), moe(experts=16)),
    ] * 2
    assert list(arch.layers) == expected


def test_bare_sliding_takes_the_nearest_preceding_window_or_the_default():
    arch = load("sliding; sliding(512); global; sliding; sliding(8); sliding")
    assert [layer.mixer for layer in arch.layers] == [sliding(4096), sliding(512), GLOBAL, sliding(512), sliding(8), sliding(8)]


def test_let_definitions_for_mixers_and_ffns():
    arch = load("let local = sliding(1024)\nlet experts = moe(top=2, experts=4)\nrepeat 2 < local; local; global > ffn=experts")
    assert [layer.mixer for layer in arch.layers] == [sliding(1024), sliding(1024), GLOBAL] * 2
    assert all(layer.ffn == moe(experts=4) for layer in arch.layers)


def test_settings_values_and_suffixes():
    arch = load("seq_len = 32k\nrope_theta = 10000\nnorm_eps = 1e-5\nqk_norm = false\ntie_embeddings = false\nvocab_size = 50_304")
    config = arch.config
    assert config.seq_len == 32768 and config.rope_theta == 10000.0 and isinstance(config.rope_theta, float)
    assert config.norm_eps == 1e-5 and config.qk_norm == "none" and config.tie_embeddings is False
    assert config.vocab_size == 50304


def test_comments_separators_and_whitespace():
    text = "# a model\n\n  d_model = 512   # width\n;; n_heads = 8\n\nrepeat 2 <   # group\n  global\n\n  sliding(4)  ;\n>\n# end"
    arch = load(text)
    assert arch.config.d_model == 512 and arch.config.n_heads == 8
    mixers = [complete(Call("global"), "mixer", arch.config), complete(Call("sliding", (("window", 4),)), "mixer", arch.config)]
    assert [layer.mixer for layer in arch.layers] == mixers * 2


def test_layer_count_rule():
    assert load("n_layers = 3").layers == (layer(GLOBAL, SWIGLU),) * 3
    assert len(load("n_layers = 4\nrepeat 2 < global; sliding(8) >").layers) == 4
    with pytest.raises(ArchError, match="n_layers = 6 but the layer list has 4 layers") as error:
        load("n_layers = 6\nrepeat 2 < global; sliding(8) >")
    assert error.value.pos.line == 1


def test_overrides_replace_settings():
    arch = load("d_model = 512\nglobal", d_model=256, n_heads=8)
    assert arch.config.d_model == 256 and arch.config.n_heads == 8
    with pytest.raises(ArchError, match="unknown setting 'd_modle' in overrides"):
        load("global", d_modle=3)
    with pytest.raises(ArchError, match="n_layers = 5 but the layer list has 1 layers"):
        load("global", n_layers=5)


def test_base_file_with_overrides(tmp_path):
    (tmp_path / "base.arch").write_text("d_model = 512\nn_heads = 8\nlet ff = swiglu\nrepeat 3 < global > ffn=ff\n")
    (tmp_path / "variant.arch").write_text('use "base.arch"\nd_model = 768\nlet ff = moe(top=1, experts=4)\n')
    (tmp_path / "relist.arch").write_text('use "base.arch"\nsliding(16); global\n')
    base, variant, relist = (load(tmp_path / f"{n}.arch") for n in ("base", "variant", "relist"))
    assert variant.config.d_model == 768 and variant.config.n_heads == 8
    assert [layer.ffn for layer in variant.layers] == [moe(top=1, experts=4)] * 3
    assert [(layer.mixer.name, layer.mixer.kwargs()["heads"]) for layer in relist.layers] == [("sliding", 8), ("global", 8)]
    assert relist.layers[0].mixer.kwargs()["window"] == 16 and relist.config.d_model == 512
    assert base.layers[0].ffn == SWIGLU


def test_base_file_cycles_and_missing_bases(tmp_path):
    (tmp_path / "a.arch").write_text('use "b.arch"\n')
    (tmp_path / "b.arch").write_text('use "a.arch"\n')
    with pytest.raises(ArchError, match="cycle"):
        load(tmp_path / "a.arch")
    (tmp_path / "c.arch").write_text('use "missing.arch"\n')
    with pytest.raises(ArchError, match="base file 'missing.arch' not found") as error:
        load(tmp_path / "c.arch")
    assert (error.value.pos.line, error.value.pos.col) == (1, 5)


SAMPLES = [
    "",
    "repeat 4 < sliding(4096); sliding; global > ffn=moe(top2)",
    "d_model=512;n_heads=8\nlet l=sliding(window=64)\nrepeat 2<repeat 3<l>;global ffn=moe(2,4)>",
    "seq_len = 8k\nglobal ffn=swiglu(d_ff=1k); sliding ffn=moe(top=1, experts=2, aux=0.0, norm_topk=false)",
]


@pytest.mark.parametrize("text", SAMPLES + [p.read_text() for p in ARCHS if "use" not in p.read_text()])
def test_fmt_round_trips_to_the_same_model(text):
    canonical = format_file(parse(text), ModelConfig.setting_names())
    assert resolve(parse(canonical)) == resolve(parse(text))
    assert format_file(parse(canonical), ModelConfig.setting_names()) == canonical


@pytest.mark.parametrize("path", ARCHS, ids=lambda p: p.name)
def test_fmt_round_trips_every_shipped_arch(path, tmp_path):
    for other in ARCHS:  # bases are looked up next to the file
        (tmp_path / other.name).write_text(other.read_text())
    copy = tmp_path / path.name
    copy.write_text(format_file(read(copy), ModelConfig.setting_names()))
    assert load(copy) == load(path)


def test_fmt_output_is_canonical():
    text = "repeat 2<global ;sliding( 8 )>ffn = moe( top2 ,experts=4)\nd_model=512\nlet x = global"
    assert format_file(parse(text), ModelConfig.setting_names()) == (
        "d_model = 512\n\nlet x = global\n\nrepeat 2 < global; sliding(8) > ffn=moe(top2, experts=4)\n"
    )


ERRORS = [
    # text, line, col, message, hint
    ("repeat 4 < global", 1, 18, "unexpected end of file", "expected"),
    ("d_model = = 3", 1, 11, "unexpected '='", "expected a name, a number"),
    ("global ffn=swiglu)", 1, 18, "unexpected ')'", None),
    ("d_model = 1024 $", 1, 16, "unexpected '$'", None),
    ("n_head = 16", 1, 1, "unknown setting 'n_head'", "did you mean 'n_heads'?"),
    ("slidng(4)", 1, 1, "unknown mixer 'slidng'", "did you mean 'sliding'?"),
    ("global ffn=swiglo", 1, 12, "unknown ffn 'swiglo'", "did you mean 'swiglu'?"),
    ("global fnn=swiglu", 1, 8, "unknown layer attribute 'fnn'", "did you mean 'ffn'?"),
    ("moe", 1, 1, "'moe' is an ffn, not a mixer", None),
    ("global ffn=sliding(8)", 1, 12, "'sliding' is a mixer, not an ffn", None),
    ("sliding(0)", 1, 9, "sliding: window must be positive, got 0", None),
    ("sliding(-4)", 1, 9, "sliding: window must be positive, got -4", None),
    ("sliding(window=2.5)", 1, 16, "whole number", None),
    ("sliding(big)", 1, 9, "sliding: window takes a number, not big", None),
    ("sliding(8, 9)", 1, 12, "sliding takes 1 positional argument(s): window", "give the others by name"),
    ("sliding(widow=8)", 1, 9, "sliding has no argument 'widow'", "did you mean 'window'?"),
    ("global ffn=moe(top=2, 4)", 1, 23, "positional argument after keyword", None),
    ("global ffn=moe(top=9)", 1, 12, "moe: top=9 is more than experts=8", None),
    ("global ffn=moe(top=3, experts=2)", 1, 12, "top=3 is more than experts=2", None),
    ("global ffn=moe(d_ff=100)", 1, 12, "moe: d_ff=100 is not a multiple of 8", None),
    ("global ffn=moe(top=2, top=1)", 1, 23, "argument 'top' given twice", None),
    ("d_model = true", 1, 11, "d_model takes a number, not true", None),
    ("qk_norm = 1", 1, 11, "qk_norm takes head, projection, none (or true, false), not 1", None),
    ("d_model = 0", 1, 11, "d_model must be positive", None),
    ("head_dim = 7", 1, 1, "head_dim = 7: 1 of head_dim 7 rotates 7 dimensions", None),
    ("n_kv_heads = 3", 1, 1, "n_kv_heads = 3 does not divide n_heads = 16", None),
    ("d_model = 512\nd_model = 256", 2, 1, "setting 'd_model' given twice (first on line 1)", None),
    ("let a = b\nlet b = a\na", 2, 9, "refers to itself", None),
    ("let local = sliding(8)\nlocal(4)", 2, 1, "'local' is a definition (let) and takes no arguments", None),
    ("repeat 0 < global >", 1, 8, "repeat count must be positive", None),
    ("__import__('os').system('true')", 1, 12, "unexpected", None),
]


@pytest.mark.parametrize("text, line, col, message, hint", ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_errors_point_at_the_source(text, line, col, message, hint):
    with pytest.raises(ArchError) as raised:
        load(text)
    error = raised.value
    assert message in error.message
    assert (error.pos.line, error.pos.col) == (line, col)
    report = str(error).splitlines()
    assert report[0] == f"<text>:{line}:{col}: {error.message}"
    assert report[1] == "  " + text.splitlines()[line - 1]
    assert report[2].index("^") == col + 1
    if hint:
        assert hint in error.hint and report[3] == f"  {error.hint}"


ABSURD_ERRORS = [
    # text, line, col, message: refused at the place written, before any expansion or allocation
    ("repeat 1e9 < sliding(1024) >", 1, 8, "the layer list grows to 1,000,000,000 layers here: nanollm allows at most 1,024"),
    ("repeat 3 < repeat 100000 < global > >", 1, 8, "the layer list grows to 300,000 layers here"),
    ("repeat 1000 < global >\nrepeat 1000 < global >", 2, 8, "the layer list grows to 2,000 layers here"),
    ("n_layers = 1e6", 1, 1, "n_layers = 1,000,000: nanollm allows at most 1,024 layers"),
    ("head_dim = 1e9", 1, 12, "head_dim must be at most 1,048,576, got 1e9"),
    ("d_model = 1G", 1, 11, "d_model must be at most 1,048,576, got 1G"),
    ("vocab_size = 1e12", 1, 14, "vocab_size must be at most 16,777,216"),
    ("global ffn=moe(experts=1M)", 1, 24, "moe: experts must be at most 65,536"),
    ("sliding(1e12)", 1, 9, "sliding: window must be at most 1,073,741,824"),
    ("global(heads=1e9)", 1, 14, "global: heads must be at most 1,048,576"),
    ("seq_len = 1G", 1, 11, "seq_len must be at most 16,777,216"),
]


@pytest.mark.parametrize("text, line, col, message", ABSURD_ERRORS, ids=[e[0][:30] for e in ABSURD_ERRORS])
def test_absurd_sizes_are_refused_where_written(text, line, col, message):
    with pytest.raises(ArchError) as raised:
        load(text)
    assert message in raised.value.message
    assert (raised.value.pos.line, raised.value.pos.col) == (line, col)


@pytest.mark.parametrize("text", [
    "head_dim = 1048576\nn_layers = 2",
    "d_model = 1048576\nn_heads = 1\nn_kv_heads = 1\nn_layers = 2",
    "vocab_size = 16777216\nd_ff = 1048576\nn_layers = 2",
    "seq_len = 16777216\nsliding(1073741824); global",
    "global ffn=moe(experts=65536, top=2)",
], ids=["head_dim", "d_model", "vocab and d_ff", "seq_len and window", "experts"])
def test_the_largest_sizes_allowed_analyse_on_meta_without_allocating(text):
    """At every limit the analysis stays on the meta device: no table or weight follows the sizes into memory."""
    import resource

    import nanollm

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    analysis = nanollm.compile(text).analysis
    assert analysis.params_total > 0 and analysis.flops_per_token_fwd > 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: well under any real table


def test_the_deepest_model_allowed_compiles_and_analyses():
    import nanollm

    assert len(nanollm.compile("d_model = 64\nn_heads = 2\nn_kv_heads = 1\nhead_dim = 32\nn_layers = 1024").analysis.layers) == 1024
