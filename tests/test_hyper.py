"""Hyper-connections `hc(n)` and `mhc(n)`: n residual streams. Step-0 equality with the pre-norm residual, the
doubly stochastic mixing of mHC and its bounded products, the accounting (parameters, FLOPs, activations),
per-layer use, diagrams, round trips through the source and the JSON IR, and positioned errors."""
from __future__ import annotations

import pytest
import torch

import nanollm
from nanollm.analysis import analyze
from nanollm.compiler import lower, materialize
from nanollm.components.residual.hc import WidthConnection
from nanollm.components.residual.mhc import ManifoldConnection, ManifoldWrite, sinkhorn
from nanollm.errors import ArchError
from nanollm.ir import arch_from_json, arch_to_json
from nanollm.memory import training_memory
from nanollm.render import Subject, svg
from nanollm.resolve import load
from nanollm.source import arch_source

D, T = 32, 12
TINY = f"vocab_size = 128\nd_model = {D}\nn_heads = 2\nn_kv_heads = 1\nhead_dim = 16\nd_ff = 64\nseq_len = {T}\n"


def model(residual: str, layers: str = "repeat 3 < global >", extra: str = "") -> tuple:
    arch = load(TINY + extra + f"residual = {residual}\n{layers}\n")
    return arch, lower(arch)


def real(meta, seed: int = 0):
    torch.manual_seed(seed)
    return materialize(meta, "cpu", torch.float32)


@pytest.mark.parametrize("n, dynamic", [(4, True), (4, False), (3, True)])
def test_hc_at_its_published_initialisation_equals_prenorm_bitwise_in_fp32(n, dynamic):
    """Every stream holds the pre-norm residual at step 0 (reads and writes multiply by exact ones and zeros), and their
    mean, taken as the first stream plus the mean departure from it, is exactly that residual for any n, so the final
    norm sees what pre-norm's sees whatever its epsilon (a sum, n h, would meet the epsilon n^2 times smaller)."""
    _, prenorm_meta = model("prenorm", extra="norm_eps = 1e-5\n")
    _, hc_meta = model(f"hc({n}, dynamic={'true' if dynamic else 'false'})", extra="norm_eps = 1e-5\n")
    prenorm, hc = real(prenorm_meta), real(hc_meta, seed=1)
    missing = hc.load_state_dict(prenorm.state_dict(), strict=False).missing_keys
    assert missing and all(".mixer_hc." in key or ".ffn_hc." in key for key in missing)
    ids = torch.randint(0, 128, (2, T))
    assert torch.equal(hc(ids)[0], prenorm(ids)[0])
    with torch.no_grad():  # a trained connection departs from it
        hc.get_submodule("layers.1.mixer_hc").static_alpha.add_(0.1)
    assert not torch.equal(hc(ids)[0], prenorm(ids)[0])


def mixing(iterations: int, eps: float, spread: float) -> tuple[torch.Tensor, ...]:
    """pre, post and res of one mHC site whose projection has weights of this spread (0: as initialised)."""
    torch.manual_seed(0)
    connection = ManifoldConnection(4, D, sinkhorn_iterations=iterations, eps=eps, norm_eps=1e-6)
    connection.reset_parameters()
    if spread:
        with torch.no_grad():
            connection.fn.normal_(std=spread)
            connection.base.normal_(std=5 * spread)
    return connection.maps(torch.randn(3, T, 4, D) * 5)


def off_one(sums: torch.Tensor) -> float:
    return (sums.double() - 1).abs().max().item()


def test_mhc_mixing_is_doubly_stochastic_and_its_read_and_write_weights_are_bounded():
    pre, post, res = mixing(40, 0.0, spread=0.1)
    assert res.std() > 0.1 and (res > 0).all()  # far from the uniform matrix
    assert off_one(res.sum(-1)) < 1e-6 and off_one(res.sum(-2)) < 1e-6
    assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()
    _, _, res = mixing(20, 1e-6, spread=0)  # transformers' settings at initialisation: the eps padding is the only error
    assert off_one(res.sum(-1)) < 2e-6 and off_one(res.sum(-2)) < 2e-6
    _, _, res = mixing(2, 0.0, spread=0.1)  # too few iterations leave the rows unbalanced: the count matters
    assert off_one(res.sum(-1)) > 1e-3 and off_one(res.sum(-2)) < 1e-6
    assert sinkhorn(torch.rand(4, 4) + 0.1, 1, 0.0).sum(-2).allclose(torch.ones(4))  # the last step normalises columns


def test_mhc_mixing_over_60_layers_stays_bounded_where_hc_grows():
    torch.manual_seed(0)
    streams = torch.randn(1, 1, 4, D)
    mhc_product, hc_product = torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    for site in range(120):  # 60 layers, two sublayers each
        manifold = ManifoldConnection(4, D, 20, 1e-6, 1e-6)
        manifold.reset_parameters()
        hyper = WidthConnection(4, D, site, dynamic=True)
        hyper.reset_parameters()
        with torch.no_grad():  # as training moves them
            manifold.fn.normal_(std=0.5)
            hyper.static_alpha.add_(0.1 * torch.randn(4, 5))
        mhc_product = manifold.maps(streams)[2][0, 0].double().T @ mhc_product
        hc_product = hyper.coefficients(streams)[0][0, 0, :, 1:].double().T @ hc_product
    assert torch.linalg.matrix_norm(mhc_product, ord=2) <= 1 + 1e-4
    assert torch.linalg.matrix_norm(hc_product, ord=2) > 10


def per_site(residual: str) -> tuple[float, float, float]:
    """Parameters, forward FLOPs per token and saved activation bytes more than the pre-norm model's, per site."""
    prenorm = analyze(*model("prenorm"), T)
    other = analyze(*model(residual), T)
    sites = 6
    return ((other.params_total - prenorm.params_total) / sites, (other.flops_per_token_fwd - prenorm.flops_per_token_fwd) / sites,
            (other.activation_bytes - prenorm.activation_bytes) / sites)


def test_hc_parameters_and_flops_are_the_n_by_d_mixing():
    n, d = 4, D
    params, flops, _ = per_site(f"hc({n}, dynamic=false)")
    assert params == n * (n + 1) + n
    assert flops == 2 * ((n + 1) * n * d + n * d)  # read A^T H, write B^T f: multiply-adds over n x d per token
    params, flops, _ = per_site(f"hc({n})")
    assert params == n * (n + 1) + n + d * (n + 1) + d + 2
    # plus the dynamic weights from the streams (n d (n + 2) multiply-adds) and their LayerNorm (fvcore: 4 per element)
    assert flops == 2 * ((n + 1) * n * d + n * d) + 2 * n * d * (n + 2) + 2 * 4 * n * d


def test_mhc_parameters_and_flops_follow_the_paper():
    n, d, sites = 4, D, 6
    prenorm, mhc = analyze(*model("prenorm"), T), analyze(*model(f"mhc({n})"), T)
    site_params = n * d * (n * n + 2 * n) + (n * n + 2 * n) + 3
    head_params = n * n * d + n + 1
    assert mhc.params_total - prenorm.params_total == sites * site_params + head_params
    site_macs = n * d * (n * n + 2 * n) + n * d + n * n * d + n * d  # coefficients, read, mix, write
    head_macs = n * n * d + n * d
    assert mhc.flops_per_token_fwd - prenorm.flops_per_token_fwd == 2 * (sites * site_macs + head_macs)


@pytest.mark.parametrize("residual", ["hc(4)", "mhc(4)"])
def test_training_memory_holds_n_streams(residual):
    _, _, extra_bytes = per_site(residual)
    assert extra_bytes >= (4 - 1) * T * D * 2  # each site keeps at least the n-stream state (bf16) instead of one stream
    prenorm, other = analyze(*model("prenorm"), T), analyze(*model(residual), T)
    assert training_memory(other, 128).activations - training_memory(prenorm, 128).activations >= 6 * 3 * T * D * 2


def test_layers_may_mix_schemes_of_the_same_stream_count_and_the_model_trains():
    arch, meta = model("hc(4)", "global\nglobal residual=mhc(4, sinkhorn=5)\nglobal residual=hc(4, dynamic=false)")
    assert [layer.residual.name for layer in arch.layers] == ["hc", "mhc", "hc"]
    net = real(meta)
    ids = torch.randint(0, 128, (2, T))
    logits, _ = net(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name in ("layers.0.mixer_hc.dynamic_alpha", "layers.1.ffn_hc.fn", "layers.2.ffn_hc.static_alpha"):
        assert net.get_parameter(name).grad.abs().sum() > 0, name
    with pytest.raises(ArchError, match="keeps 2 residual stream") as error:
        model("hc(4)", "global\nglobal residual=mhc(2)")
    assert (error.value.pos.line, error.value.pos.col) == (10, 17)


@pytest.mark.parametrize("text, message", [("hc(0)", "must be positive"), ("mhc(n=0)", "must be positive"),
                                           ("mhc(4, sinkhorn=0)", "must be positive")])
def test_zero_streams_or_iterations_are_positioned_errors(text, message):
    with pytest.raises(ArchError, match=message) as error:
        model(text)
    assert error.value.pos is not None and error.value.pos.line == 8


@pytest.mark.parametrize("residual", ["hc(2)", "mhc(4, sinkhorn=7)", "hc(3, dynamic=false)"])
def test_stream_schemes_round_trip_through_source_and_json(residual):
    arch, _ = model(residual, "global\nglobal residual=hc(" + residual.split("(")[1].split(",")[0].rstrip(")") + ")")
    assert load(arch_source(arch)) == arch
    assert arch_from_json(arch_to_json(arch)) == arch


def test_diagrams_draw_the_streams():
    arch, meta = model("mhc(4)")
    drawing = svg(Subject("tiny", arch, meta, analyze(arch, meta, T)), "stack")
    assert "read: mix of 4 streams" in drawing and "write: to 4 streams" in drawing
    assert drawing.count('class="stream-lane"') == 4 * 2  # the block (drawn once for its 3 repeats): each site's skip path as 4 lanes


def test_mhc_site_and_head_equal_transformers_deepseek_v4():
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4HyperConnection,
        DeepseekV4HyperHead,
    )

    from nanollm.components.residual.mhc import StreamHead

    config = DeepseekV4Config(hidden_size=D, hc_mult=4, hc_sinkhorn_iters=7, hc_eps=1e-5, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    theirs, their_head = DeepseekV4HyperConnection(config), DeepseekV4HyperHead(config)
    for module in (theirs, their_head):
        for param in module.parameters():
            torch.nn.init.normal_(param, std=0.3)
    ours = ManifoldConnection(4, D, sinkhorn_iterations=7, eps=1e-5, norm_eps=1e-6)
    ours.load_state_dict(theirs.state_dict())
    head = StreamHead(4, D, eps=1e-5, norm_eps=1e-6)
    head.load_state_dict({"fn": their_head.hc_fn, "base": their_head.hc_base, "scale": their_head.hc_scale})
    streams = torch.randn(2, T, 4, D)
    post, comb, collapsed = theirs(streams)
    ours_collapsed, ours_post, ours_res = ours(streams)
    assert torch.allclose(ours_post, post, atol=1e-6) and torch.allclose(ours_res, comb, atol=1e-6)
    assert torch.allclose(ours_collapsed, collapsed, atol=1e-5)
    assert torch.allclose(head(streams), their_head(streams), atol=1e-5)
    half = streams.bfloat16()  # bf16 streams, fp32 connections (transformers keeps them so): the sums in fp32, rounded once
    assert torch.equal(ours(half)[0], theirs(half)[2]) and torch.equal(head(half), their_head(half))
    out = torch.randn(2, T, D)  # the write, as DeepseekV4DecoderLayer adds a sublayer's output back
    written = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)
    assert torch.allclose(ManifoldWrite()(out, streams, ours_post, ours_res), written, atol=1e-5)


class Silent(torch.nn.Module):
    """An attention that adds nothing (transformers' attention output is (output, weights))."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


def test_mhc_model_with_the_v4_moe_equals_transformers_deepseek_v4_with_attention_silenced():
    """The whole DeepSeek-V4 model but its attention (another component's test): embedding copied into 4 streams, the
    mHC sites around input_layernorm / post_attention_layernorm, hash-routed then top-k MoE layers reading the input ids,
    the HyperHead and the final norm; weights loaded by from_hf's names, every transformers weight but attention's placed."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from nanollm.hf import weight_names

    config = DeepseekV4Config(hidden_size=D, num_hidden_layers=3, num_attention_heads=2, head_dim=16, q_lora_rank=8, o_groups=1,
                              o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, n_routed_experts=8, num_experts_per_tok=3,
                              moe_intermediate_size=16, vocab_size=64, sliding_window=4, mlp_layer_types=["hash_moe", "moe", "moe"],
                              swiglu_limit=0.6, hc_sinkhorn_iters=7, hc_eps=1e-5, rms_norm_eps=1e-5, attn_implementation="eager",
                              experts_implementation="eager")
    torch.manual_seed(0)
    theirs = DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.normal_(0, 0.3 if "hc" in name else 0.2)  # connections far from their initialisation
        for layer in theirs.model.layers:
            layer.self_attn = Silent()
            if layer.mlp.is_hash:
                layer.mlp.gate.tid2eid.copy_(torch.rand(64, 8).topk(3).indices)
            else:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    ffn = "moe(top=3, experts=8, d_ff=16, shared=1, router=sqrt_softplus, scale=1.5, limit=0.6"
    compiled = nanollm.compile(f"vocab_size = 64\nd_model = {D}\nn_heads = 2\nn_kv_heads = 1\nhead_dim = 16\nd_ff = 16\nnorm_eps = 1e-5\n"
                               "tie_embeddings = false\nresidual = mhc(4, sinkhorn=7, eps=1e-5)\n"
                               f"global ffn={ffn}, balance=none, hash=true)\nrepeat 2 < global ffn={ffn}, balance=bias) >\n")
    ours = compiled.build()
    names = {mine: hf_name for mine, hf_name in weight_names(ours, compiled.arch).items() if ".mixer." not in mine}
    state = theirs.state_dict()
    assert set(names.values()) == set(state)
    assert {"hc_head.fn", "layers.0.mixer_hc.fn", "layers.0.ffn.router.token_experts", "layers.1.ffn.selection_bias"} <= set(names)
    ours.load_state_dict({mine: state[hf_name] for mine, hf_name in names.items()}, strict=False)
    with torch.no_grad():
        for i in range(3):
            ours.get_submodule(f"layers.{i}.mixer.o_proj").weight.zero_()
        ids = torch.randint(0, 64, (2, 9))
        torch.testing.assert_close(ours(ids)[0], theirs(ids, use_cache=False).logits, atol=1e-5, rtol=0)
