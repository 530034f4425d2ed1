"""DeepSeek-V4: compressed attention on every layer (`compressed`: a sliding window of one K = V head with sinks, plus CSA's
indexed overlapping entries or HCA's heavy ones, as `layer_types` says), the MoE with sqrt(softplus) scores (hash-routed by
token id in the first `mlp_layer_types`), and mHC residual streams (`mhc`) with their final head."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, call, common_settings, family, refuse, rope_call, rope_parameters

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
ROUTERS = {"sqrtsoftplus": "sqrt_softplus", "sigmoid": "sigmoid", "softmax": "softmax"}  # transformers' scoring_func -> router


def position_call(hf: Any, config: ModelConfig, label: str) -> Call:
    """The position encoding of one of V4's rope types (`main` or `compress`): partial, on the last dimensions, interleaved."""
    rope = rope_call(hf.rope_parameters[label], config, partial=True)
    return call(rope.name, "position", config, **{**rope.kwargs(), "placement": "last", "interleaved": True})


def attention_call(hf: Any, config: ModelConfig, layer_type: str) -> Call:
    """The `compressed` call of one V4 layer type: the window alone, CSA (overlapping, indexed) or HCA (every ended entry)."""
    refuse(layer_type not in LAYER_TYPES, f"DeepSeek-V4 layer type {layer_type!r} is not one nanollm knows ({', '.join(LAYER_TYPES)})")
    refuse(hf.num_key_value_heads != 1, f"num_key_value_heads = {hf.num_key_value_heads}: DeepSeek-V4 attention has one K = V head")
    refuse(bool(hf.attention_bias), "the transformers config has attention_bias = true; DeepSeek-V4 attention has no biases")
    branch = {"sliding_attention": {"rate": 0},  # the window alone
              "compressed_sparse_attention": {"rate": hf.compress_rates.get(layer_type), "topk": hf.index_topk},
              "heavily_compressed_attention": {"rate": hf.compress_rates.get(layer_type), "overlap": False, "topk": 0}}[layer_type]
    return call("compressed", "mixer", config, window=hf.sliding_window, index_heads=hf.index_n_heads, index_head_dim=hf.index_head_dim,
                heads=hf.num_attention_heads, head_dim=hf.head_dim, q_lora_rank=hf.q_lora_rank, o_groups=hf.o_groups,
                o_lora_rank=hf.o_lora_rank, rope=position_call(hf, config, "main" if layer_type == "sliding_attention" else "compress"),
                **branch)  # the logit scale is 1/sqrt(head_dim), the default


def moe_call(hf: Any, config: ModelConfig, hashed: bool) -> Call:
    """A V4 MoE layer: transformers always renormalises the k weights and has one shared expert of moe_intermediate_size
    (whatever norm_topk_prob and n_shared_experts say); the clamp applies to routed and shared experts alike."""
    refuse(hf.scoring_func not in ROUTERS, f"transformers scoring_func {hf.scoring_func!r} is not supported ({', '.join(ROUTERS)})")
    routing = {"balance": "none", "hash": True} if hashed else {"balance": "bias"}  # a table chooses: nothing to balance
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.n_routed_experts, d_ff=hf.moe_intermediate_size, shared=1,
                router=ROUTERS[hf.scoring_func], norm_topk=True, scale=float(hf.routed_scaling_factor), limit=float(hf.swiglu_limit),
                **routing)


def deepseek_v4(hf: Any) -> Arch:
    """DeepseekV4ForCausalLM: each layer's attention by layer_types, its MoE by mlp_layer_types, mHC streams around both."""
    refuse(hf.hidden_act != "silu", f"transformers hidden_act {hf.hidden_act!r} is not supported here (only silu, as SwiGLU)")
    config = ModelConfig(**common_settings(hf), qk_norm="none", rope_theta=float(hf.rope_theta))
    residual = call("mhc", "residual", config, n=hf.hc_mult, sinkhorn=hf.hc_sinkhorn_iters, eps=float(hf.hc_eps))
    config = dataclasses.replace(config, residual=residual, rope=position_call(hf, config, "main"))
    layers = tuple(Layer((("mixer", attention_call(hf, config, kind)), ("ffn", moe_call(hf, config, mlp == "hash_moe"))), residual)
                   for kind, mlp in zip(hf.layer_types, hf.mlp_layer_types))
    return Arch(config, layers)


def deepseek_v4_config(arch: Arch) -> Any:
    """A DeepseekV4Config of a model of `compressed` layers with the V4 MoE under `mhc` (the inverse of `deepseek_v4`), or None."""
    from transformers import DeepseekV4Config

    config = arch.config
    if config.residual.name != "mhc" or not all(layer.mixer is not None and layer.mixer.name == "compressed" and layer.ffn is not None
                                                and layer.ffn.name == "moe" and len(layer.sublayers) == 2 for layer in arch.layers):
        return None
    mixers, ffns = [layer.mixer.kwargs() for layer in arch.layers], [layer.ffn.kwargs() for layer in arch.layers]
    kinds = ["sliding_attention" if m["rate"] == 0 else "compressed_sparse_attention" if m["topk"] else "heavily_compressed_attention"
             for m in mixers]
    first = {kind: mixer for kind, mixer in reversed(list(zip(kinds, mixers)))}  # each layer type's first
    window, moe, mhc = mixers[0], ffns[0], config.residual.kwargs()
    compressed = first.get("compressed_sparse_attention") or first.get("heavily_compressed_attention")
    scoring = {router: name for name, router in ROUTERS.items()}
    if moe["router"] not in scoring:
        return None
    main_rope, compress_rope = first.get("sliding_attention", window)["rope"], (compressed or window)["rope"]
    csa = first.get("compressed_sparse_attention", {"topk": 1})
    return DeepseekV4Config(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=len(arch.layers), num_attention_heads=window["heads"],
        num_key_value_heads=1, head_dim=window["head_dim"], intermediate_size=config.d_ff, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.seq_len, q_lora_rank=window["q_lora_rank"],
        o_groups=window["o_groups"], o_lora_rank=window["o_lora_rank"], sliding_window=window["window"], index_n_heads=window["index_heads"],
        index_head_dim=window["index_head_dim"], index_topk=csa["topk"], layer_types=kinds,
        compress_rates={kind: first[kind]["rate"] for kind in LAYER_TYPES[1:] if kind in first},
        partial_rotary_factor=main_rope.kwargs()["fraction"], rope_theta=main_rope.kwargs()["theta"],
        compress_rope_theta=compress_rope.kwargs()["theta"],
        rope_parameters={"main": rope_parameters(main_rope), "compress": rope_parameters(compress_rope)},
        mlp_layer_types=["hash_moe" if ffn["hash"] else "moe" for ffn in ffns], n_routed_experts=moe["experts"],
        num_experts_per_tok=moe["top"], moe_intermediate_size=moe["d_ff"], scoring_func=scoring[moe["router"]],
        routed_scaling_factor=moe["scale"], swiglu_limit=moe["limit"], hc_mult=mhc["n"], hc_sinkhorn_iters=mhc["sinkhorn"], hc_eps=mhc["eps"],
        pad_token_id=None, bos_token_id=None, eos_token_id=None)


family("deepseek_v4", Family(("DeepseekV4ForCausalLM",), deepseek_v4, config_from_arch=deepseek_v4_config))
