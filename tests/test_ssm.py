"""Lightning attention, Mamba-2 and LFM2's short convolution: their chunked, recurrent and naive forms agree (values and
gradients), their decoding steps reproduce the training form, they run on meta, and the analysis counts them exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nanollm
from nanollm.cli import main
from nanollm.compiler import initialize
from nanollm.components import ssm
from nanollm.components.linear import scalar_decay
from nanollm.components.linear.lightning import LightningAttention
from nanollm.components.ssm import shortconv
from nanollm.components.ssm.mamba2 import Mamba2
from nanollm.components.ssm.shortconv import ShortConv
from nanollm.errors import ArchError
from nanollm.human import human
from nanollm.ir import ModelConfig
from nanollm.render.stack import figures
from nanollm.resolve import load

ROOT = Path(__file__).parent.parent
CONFIG = ModelConfig(vocab_size=128, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def scan_inputs(length: int, seed: int = 0, with_state: bool = True) -> tuple[torch.Tensor, ...]:
    """Random q, k (B, H, T, 6) scaled by 6^-1/2 (outputs of order one), v (B, H, T, 5), log-decays in (-1, 0] and an
    initial state, requiring gradients."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, length, 6), (2, 3, length, 6), (2, 3, length, 5)]
    q, k, v = (torch.randn(shape, generator=generator) * scale for shape, scale in zip(shapes, (6 ** -0.5, 6 ** -0.5, 1)))
    g = -torch.rand(2, 3, length, generator=generator)
    state = torch.randn(2, 3, 6, 5, generator=generator) if with_state else None
    return tuple(t.requires_grad_() if t is not None else None for t in (q, k, v, g, state))


@pytest.mark.parametrize("length, chunk", [(37, 8), (5, 8), (32, 16), (1, 4), (19, 1)])
@pytest.mark.parametrize("with_state", [False, True])
def test_scalar_decay_chunked_recurrent_and_naive_forms_agree(length: int, chunk: int, with_state: bool) -> None:
    q, k, v, g, state = scan_inputs(length, with_state=with_state)
    expected_out, expected_state = scalar_decay.naive(q, k, v, g, chunk, state)
    for form in (scalar_decay.chunked, scalar_decay.recurrent):
        out, final = form(q, k, v, g, chunk, state)
        torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(final, expected_state, atol=1e-5, rtol=0)


def test_scalar_decay_chunked_gradients_equal_the_naive_forms() -> None:
    inputs = scan_inputs(29)
    generator = torch.Generator().manual_seed(1)  # seeded: the loss weights decide how close the gradients of g come
    weights = torch.randn(2, 3, 29, 5, generator=generator), torch.randn(2, 3, 6, 5, generator=generator)
    grads = []
    for form in (scalar_decay.chunked, scalar_decay.naive):
        out, final = form(*inputs[:4], 8, inputs[4])
        grads.append(torch.autograd.grad((out * weights[0]).sum() + (final * weights[1]).sum(), inputs))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_scalar_decay_chunked_form_in_segments_equals_the_naive_form(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = scan_inputs(45)
    monkeypatch.setattr(scalar_decay, "SEGMENT_BYTES", 2 * 3 * 4 * 4 * 4 * 2)  # segments of 2 chunks of 4 for 2 x 3 heads in fp32
    assert scalar_decay.segment_length(2 * 3, 4, 4) == 8
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(2, 3, 45, 5, generator=generator), torch.randn(2, 3, 6, 5, generator=generator)
    results = []
    for form in (scalar_decay.chunked, scalar_decay.naive):
        out, final = form(*inputs[:4], 4, inputs[4])
        loss = (out * weights[0]).sum() + (final * weights[1]).sum()
        results.append((out, final, *torch.autograd.grad(loss, inputs)))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_scalar_decay_chunked_prefill_then_steps_equal_one_pass() -> None:
    q, k, v, g, state = scan_inputs(23)
    whole, _ = scalar_decay.chunked(q, k, v, g, 8, state)
    prefix, carried = scalar_decay.chunked(q[:, :, :13], k[:, :, :13], v[:, :, :13], g[:, :, :13], 8, state)
    rest, _ = scalar_decay.recurrent(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], g[:, :, 13:], 8, carried)
    torch.testing.assert_close(torch.cat([prefix, rest], dim=2), whole, atol=1e-5, rtol=0)


def built(module: torch.nn.Module) -> torch.nn.Module:
    """The module initialised as a build does, its vector parameters then perturbed so no gate or norm is trivial."""
    torch.manual_seed(0)
    initialize(module)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return module


MIXERS = {
    "lightning": lambda: LightningAttention(CONFIG, heads=4, head_dim=8, decay=0.7, chunk=8),
    "mamba2": lambda: Mamba2(CONFIG, heads=4, head_dim=6, state=5, groups=2, conv=4, chunk=8, dt_min=1e-3, conv_bias=True, bias=True),
    "mamba2_one_group": lambda: Mamba2(CONFIG, heads=2, head_dim=16, state=8, groups=1, conv=2, chunk=16, dt_min=0.05, conv_bias=False,
                                       bias=False),
}


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_forms_agree_and_decoding_steps_reproduce_training(name: str) -> None:
    mixer = built(MIXERS[name]())
    x = torch.randn(2, 21, CONFIG.d_model, generator=torch.Generator().manual_seed(2))
    chunked = mixer(x)
    for form in (scalar_decay.recurrent, scalar_decay.naive):
        torch.testing.assert_close(mixer(x, form=form), chunked, atol=1e-5, rtol=0)
    state = mixer.state(2, 10_000, "cpu", torch.float32)
    # a prefill of two chunks and a part, then one token at a time
    steps = [mixer.decode(state, 0, x[:, :11])] + [mixer.decode(state, t, x[:, t:t + 1]) for t in range(11, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), chunked, atol=1e-5, rtol=0)
    assert sum(tensor.numel() for tensor in state.values()) == 2 * mixer.cache_elements(10_000)


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_parameter_gradients_of_the_chunked_form_equal_the_naive_forms(name: str) -> None:
    mixer = built(MIXERS[name]())
    x = torch.randn(2, 19, CONFIG.d_model, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 19, CONFIG.d_model, generator=torch.Generator().manual_seed(4))
    grads = [torch.autograd.grad((mixer(x, form=form) * weights).sum(), list(mixer.parameters())) for form in
             (scalar_decay.chunked, scalar_decay.naive)]
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def assert_same_values_and_gradients(mixer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, reference: torch.Tensor) -> None:
    """`out` equals `reference` in value, and in the gradients of a random weighting of it for x and every parameter."""
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    grads = [torch.autograd.grad((y * weights).sum(), [x, *mixer.parameters()]) for y in (out, reference)]
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mamba2", "mamba2_one_group"])
def test_mamba2_training_forward_in_segments_equals_one_naive_pass(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mixer = built(MIXERS[name]())
    x = torch.randn(2, 45, CONFIG.d_model, generator=torch.Generator().manual_seed(5), requires_grad=True)
    reference = mixer.scan(x, mixer.conv1d, scalar_decay.naive, None)[0]
    monkeypatch.setattr(ssm, "LAYER_SEGMENT_BYTES", 1)  # one chunk per segment: 45 tokens in 3 to 6 segments
    assert ssm.segment_length(x, mixer.in_proj.out_features, mixer.chunk) == mixer.chunk
    assert_same_values_and_gradients(mixer, x, mixer(x), reference)


@pytest.mark.parametrize("kernel", [4, 1])
def test_short_conv_training_forward_in_segments_equals_one_naive_pass(kernel: int, monkeypatch: pytest.MonkeyPatch) -> None:
    mixer = built(ShortConv(CONFIG, kernel=kernel, bias=True))
    x = torch.randn(2, 13, CONFIG.d_model, generator=torch.Generator().manual_seed(7), requires_grad=True)
    reference = mixer.mix(x, lambda gated: shortconv.naive(gated, mixer.conv.weight, mixer.conv.bias))
    monkeypatch.setattr(ssm, "LAYER_SEGMENT_BYTES", 1)  # one token per segment, shorter than the kernel's reach
    assert_same_values_and_gradients(mixer, x, mixer(x), reference)


@pytest.mark.parametrize("kernel, bias", [(3, False), (4, True), (1, True)])
def test_short_conv_equals_its_naive_sum_and_its_decoding_form(kernel: int, bias: bool) -> None:
    mixer = built(ShortConv(CONFIG, kernel=kernel, bias=bias))
    x = torch.randn(2, 13, CONFIG.d_model, generator=torch.Generator().manual_seed(5))
    out = mixer(x)
    b, c, u = mixer.in_proj(x).chunk(3, dim=-1)
    torch.testing.assert_close(out, mixer.out_proj(c * shortconv.naive(b * u, mixer.conv.weight, mixer.conv.bias)), atol=1e-5, rtol=0)
    state = mixer.state(2, 10_000, "cpu", torch.float32)
    steps = [mixer.decode(state, 0, x[:, :5])] + [mixer.decode(state, t, x[:, t:t + 1]) for t in range(5, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [*MIXERS, "shortconv"])
def test_mixers_run_on_the_meta_device(name: str) -> None:
    with torch.device("meta"):
        mixer = MIXERS[name]() if name in MIXERS else ShortConv(CONFIG, kernel=3, bias=False)
        out = mixer(torch.empty(1, 300, CONFIG.d_model))
    assert out.shape == (1, 300, CONFIG.d_model) and out.is_meta


HYBRID = """vocab_size = 128
d_model = 32
n_heads = 4
n_kv_heads = 2
head_dim = 8
d_ff = 64
lightning(chunk=16)
mamba2(heads=4, head_dim=16, state=8, groups=2, conv=4, chunk=32) ffn=none
shortconv(kernel=3)
none ffn=relu2(d_ff=48)
global
"""


def closed_form_macs(length: int) -> dict[int, int]:
    """Forward multiply-accumulates of each layer of HYBRID over one sequence of `length` tokens."""
    d, ff = 32, 64
    swiglu = 3 * d * ff

    def chunked(chunk: int, heads: int, groups: int, dk: int, dv: int) -> int:
        """Per chunk of c tokens (length // chunk of `chunk`, then one of the remainder): Q K^T once per group of heads,
        (.)V, K^T (w V) and Q S per head; the remainder's K^T (w V) feeds only the final state, which a layer drops, so
        the traced graph has none."""
        tail = length % chunk
        full = groups * chunk * chunk * dk + heads * (chunk * chunk * dv + 2 * chunk * dk * dv)
        return length // chunk * full + (groups * tail * tail * dk + heads * (tail * tail * dv + tail * dk * dv) if tail else 0)

    lightning = length * (d * 3 * 32 + d * 32 + 32 * d + swiglu) + chunked(16, 4, 4, 8, 8)
    conv_width = 64 + 2 * 2 * 8
    mamba = length * (d * (64 + conv_width + 4) + conv_width * 4 + 64 * d) + chunked(32, 4, 2, 8, 16)
    short = length * (d * 3 * d + d * 3 + d * d + swiglu)
    relu2 = length * 2 * d * 48
    attention = length * (d * 32 + 2 * d * 16 + 32 * d + swiglu) + 4 * length * (length + 1) // 2 * 2 * 8
    return {0: lightning, 1: mamba, 2: short, 3: relu2, 4: attention}


@pytest.mark.parametrize("length", [64, 100])
def test_hybrid_flops_per_layer_equal_the_closed_form(length: int) -> None:
    analysis = nanollm.compile(HYBRID).analyze(length)
    for index, macs in closed_form_macs(length).items():
        assert analysis.layers[index].flops_per_token_fwd * length == pytest.approx(2 * macs, rel=1e-12), index


def test_recurrent_state_is_reported_per_sequence_beside_the_kv_cache_per_token() -> None:
    compiled = nanollm.compile(HYBRID)
    short, long = compiled.analyze(64), compiled.analyze(256)
    states = {0: 4 * 8 * 8, 1: 4 * 16 * 8 + (64 + 2 * 2 * 8) * 3, 2: 32 * 2, 3: 0, 4: 0}  # bf16 elements of each layer's state
    for analysis in (short, long):
        assert [layer.state_bytes for layer in analysis.layers] == [2 * elements for elements in states.values()]
        assert [layer.cache_bytes_per_token for layer in analysis.layers] == [0, 0, 0, 0, 2 * 2 * 2 * 8]  # attention's K and V
        assert analysis.state_bytes == 2 * sum(states.values())


BAD = [
    ("lightning(chunk=0)", 1, 17, "lightning: chunk must be positive, got 0"),
    ("global\nmamba2(heads=6, groups=4)", 2, 1, "mamba2: groups = 4 does not divide heads = 6"),
    ("mamba2(state=0)", 1, 14, "mamba2: state must be positive, got 0"),
    ("shortconv(kernel=0)", 1, 18, "shortconv: kernel must be positive, got 0"),
]


@pytest.mark.parametrize("text, line, col, message", BAD, ids=[b[3] for b in BAD])
def test_bad_mixer_arguments_are_positioned_errors(text: str, line: int, col: int, message: str) -> None:
    with pytest.raises(ArchError) as raised:
        load(text)
    assert message in raised.value.message
    assert (raised.value.pos.line, raised.value.pos.col) == (line, col)


def test_state_is_shown_in_the_table_and_the_diagram_beside_the_kv_cache(capsys: pytest.CaptureFixture) -> None:
    analysis = nanollm.compile(HYBRID).analyze(64)
    assert figures(analysis.layers[1])[-1] == f"state {human(analysis.layers[1].state_bytes, 'B')}/sequence"
    assert not any(text.startswith("state") for text in figures(analysis.layers[4]))
    assert main(["compile", str(ROOT / "archs/hybrid_ssm.arch"), "--seq-len", "256"]) == 0
    table = capsys.readouterr().out
    assert "state bytes" in table and "recurrent state/sequence" in table
