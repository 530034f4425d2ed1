"""from_hf reproduces transformers' Gemma 3 (text and image-text), OLMo 2 and OLMo 3 logits, one property varied per case.

Each model is tiny and random, fp32 on eager attention, with every norm weight drawn from U(0.5, 1.5): Gemma's (1 + w)
read as w (or OLMo's w as 1 + w) is then off by a whole unit. Each varied case also checks that the property changes
transformers' own logits, so a case cannot pass because the property did nothing at this size.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import nanollm
from nanollm import ArchError
from nanollm.compiled import Compiled
from nanollm.hf import arch_from_config, weight_names
from nanollm.ir import Arch, Call, Layer

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
LENGTH = 40  # tokens per test sequence: past the window and past YaRN's original context
WINDOW = 8
GEMMA_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
SLIDING_ROPE = {"rope_type": "default", "rope_theta": 1e2}


def rope_types(full: dict[str, Any], sliding: dict[str, Any] = SLIDING_ROPE) -> dict[str, Any]:
    """Config settings giving the full and the sliding layers each their RoPE."""
    return {"rope_parameters": {"full_attention": dict(full), "sliding_attention": dict(sliding)}}


ROPE_1E4 = {"rope_type": "default", "rope_theta": 1e4}
GEMMA3 = dict(TINY, layer_types=GEMMA_TYPES, sliding_window=WINDOW, query_pre_attn_scalar=16, **rope_types(ROPE_1E4, ROPE_1E4))
OLMO2 = dict(TINY, eos_token_id=None)  # OLMo's default eos id lies outside the tiny vocabulary
OLMO3 = dict(TINY, num_key_value_heads=4, sliding_window=WINDOW, max_position_embeddings=64, eos_token_id=None)  # MHA, as OLMo 3
# YaRN on a 16-token original context extended 4 times (positions 16..39 are past it); betas chosen so the ramp
# spans whole dimensions of a 16-wide head, where truncating its ends matters.
YARN = {"rope_type": "yarn", "rope_theta": 1e3, "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 2.0,
        "beta_slow": 0.25}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
IMAGE_TOKENS = dict(mm_tokens_per_image=4, image_token_index=255, boi_token_index=253, eoi_token_index=254)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode with every RMSNorm weight (layer, final and q/k norms) drawn from U(0.5, 1.5)."""
    with torch.no_grad():
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def fresh(base: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Config settings: `base` with `overrides`, copied deeply (transformers completes rope_parameters in place)."""
    return copy.deepcopy({**base, **overrides})


def tiny(model_class: type, config_class: type, base: dict[str, Any], **overrides: Any) -> Any:
    """A tiny random transformers model of `base` settings with `overrides`, eager attention, norms perturbed."""
    torch.manual_seed(0)
    return perturbed(model_class(config_class(**fresh(base, **overrides), attn_implementation="eager")))


def gemma3(**overrides: Any) -> Gemma3ForCausalLM:
    """A tiny Gemma3ForCausalLM: sliding layers (window 8) around one global, GQA, both RoPE bases 1e4, scale 1/sqrt(head_dim)."""
    return tiny(Gemma3ForCausalLM, Gemma3TextConfig, GEMMA3, **overrides)


def olmo3(**overrides: Any) -> Olmo3ForCausalLM:
    """A tiny Olmo3ForCausalLM: its default 3 sliding (window 8) : 1 full pattern, MHA."""
    return tiny(Olmo3ForCausalLM, Olmo3Config, OLMO3, **overrides)


def token_ids() -> torch.Tensor:
    """A fixed batch of 2 random sequences of LENGTH tokens."""
    return torch.randint(0, TINY["vocab_size"], (2, LENGTH), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hf_logits(model: Any) -> torch.Tensor:
    """transformers' logits on `token_ids()`."""
    return model(input_ids=token_ids()).logits


@torch.no_grad()
def assert_same_logits(hf: Any, ours: torch.nn.Module | None = None) -> torch.Tensor:
    """from_hf's model (or `ours`) gives transformers' logits within 1e-5 and its greedy next tokens; returns them."""
    expected = hf_logits(hf)
    logits, _ = (ours or nanollm.from_hf(hf))(token_ids())
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(logits[:, -1].argmax(-1), expected[:, -1].argmax(-1))
    return expected


@functools.cache
def baseline(family: str) -> torch.Tensor:
    """transformers' logits of the unvaried model of a family ("gemma3" or "olmo3"), computed once."""
    return hf_logits({"gemma3": gemma3, "olmo3": olmo3}[family]())


def assert_changes(logits: torch.Tensor, baseline: torch.Tensor) -> None:
    """The varied property moved transformers' logits well past the tolerance."""
    assert (logits - baseline).abs().max() > 1e-2


def with_weights(arch: Arch, hf: Any) -> torch.nn.Module:
    """A nanollm model of `arch` carrying the transformers model's weights (names as from_hf maps them)."""
    model = Compiled(arch).build()
    theirs = hf.state_dict()
    model.load_state_dict({ours: theirs[name] for ours, name in weight_names(model, arch).items()})
    return model


def thetas(arch: Arch) -> dict[str, float]:
    """Each mixer kind's RoPE base."""
    return {layer.mixer.name: layer.mixer.kwargs()["rope"].kwargs()["theta"] for layer in arch.layers}


# --- Gemma 3 ------------------------------------------------------------------------------------------------


def test_gemma3_base_matches_hf() -> None:
    """Sandwich norms, (1 + w) norms, GeGLU, sqrt(d) embeddings, windows shorter than the sequence."""
    hf = gemma3()
    arch = arch_from_config(hf.config)
    assert [(layer.mixer.name, layer.mixer.kwargs().get("window")) for layer in arch.layers] == [
        ("sliding", WINDOW), ("sliding", WINDOW), ("global", None), ("sliding", WINDOW)]
    assert arch.config.embed_scale and arch.config.norm.kwargs()["zero_centered"] and arch.config.tie_embeddings
    assert arch.layers[0].residual.name == "sandwich" and arch.layers[0].ffn.name == "geglu"
    assert_same_logits(hf)


GEMMA3_CASES = {
    "query_pre_attn_scalar": dict(query_pre_attn_scalar=64),
    "local_theta": rope_types(ROPE_1E4),
    # Gemma-3-4B: factor 8 on the global layers only
    "linear_scaling_on_full_layers": rope_types({"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, ROPE_1E4),
    "final_logit_softcap": dict(final_logit_softcapping=0.5),
    "untied_embeddings": dict(tie_word_embeddings=False),
    "yarn_on_full_layers": dict(max_position_embeddings=64, **rope_types(YARN)),
}


@pytest.mark.parametrize("overrides", GEMMA3_CASES.values(), ids=GEMMA3_CASES.keys())
def test_gemma3_property_matches_hf(overrides: dict[str, Any]) -> None:
    assert_changes(assert_same_logits(gemma3(**overrides)), baseline("gemma3"))


def test_gemma3_scale_and_thetas_are_read_per_layer_type() -> None:
    arch = arch_from_config(gemma3(query_pre_attn_scalar=64, **GEMMA3_CASES["linear_scaling_on_full_layers"]).config)
    assert arch.config.attn_scale == 64 ** -0.5
    assert thetas(arch) == {"sliding": 1e4, "global": 1e6}
    assert arch.config.rope.kwargs()["factor"] == 8.0


def test_gemma3_attention_softcap_is_ignored_as_transformers_ignores_it() -> None:
    """transformers' Gemma3Attention never applies attn_logit_softcapping; capped logits would differ by far more than 1e-5."""
    hf = gemma3(attn_logit_softcapping=0.5)
    assert arch_from_config(hf.config).config.attn_softcap == 0.0
    torch.testing.assert_close(assert_same_logits(hf), baseline("gemma3"), atol=0, rtol=0)


def with_call(call: Call, name: str | None = None, **args: Any) -> Call:
    """The call renamed and/or with some arguments replaced."""
    return Call(name or call.name, tuple((k, args.get(k, v)) for k, v in call.args))


def mutated(arch: Arch, config: Any = None, mixer: Any = None, ffn: Any = None) -> Arch:
    """The arch with its config, mixers or FFNs changed by the given functions (unchanged where None)."""
    config = config(arch.config) if config else arch.config
    return Arch(config, tuple(
        Layer((("mixer", mixer(layer.mixer) if mixer else layer.mixer), ("ffn", ffn(layer.ffn) if ffn else layer.ffn)), layer.residual)
        for layer in arch.layers))


MUTANTS = {  # what Gemma 3 changes from the core, each taken away again
    "w_not_1_plus_w": dict(config=lambda c: dataclasses.replace(c, norm=Call("rmsnorm"))),
    "no_embed_scale": dict(config=lambda c: dataclasses.replace(c, embed_scale=False)),
    "default_attn_scale": dict(mixer=lambda call: with_call(call, scale=0.0)),
    "swiglu_not_geglu": dict(ffn=lambda call: with_call(call, "swiglu")),
    "no_final_softcap": dict(config=lambda c: dataclasses.replace(c, logit_softcap=0.0)),
}


@pytest.mark.parametrize("mutation", MUTANTS.values(), ids=MUTANTS.keys())
def test_gemma3_comparison_tells_apart_each_gemma3_change(mutation: dict[str, Any]) -> None:
    """Gemma 3's weights in a model lacking one of its changes miss transformers' logits: the comparison can fail."""
    hf = gemma3(query_pre_attn_scalar=64, final_logit_softcapping=0.5)
    arch = arch_from_config(hf.config)
    assert_same_logits(hf, with_weights(arch, hf))  # the loading itself is from_hf's
    with pytest.raises(AssertionError):
        assert_same_logits(hf, with_weights(mutated(arch, **mutation), hf))


def image_text(text: dict[str, Any] | None = None, **overrides: Any) -> Gemma3ForConditionalGeneration:
    """A tiny Gemma3ForConditionalGeneration: GEMMA3's text model (with `text` changes) and a 1-layer SigLIP tower."""
    torch.manual_seed(0)
    config = Gemma3Config(text_config=fresh(GEMMA3, **(text or {})), vision_config=VISION, **IMAGE_TOKENS, **overrides,
                          attn_implementation="eager")
    return perturbed(Gemma3ForConditionalGeneration(config))


@pytest.mark.parametrize(
    "text, overrides",
    [({}, {}), ({"tie_word_embeddings": True}, {"tie_word_embeddings": False}),
     ({"tie_word_embeddings": False}, {"tie_word_embeddings": True})],
    ids=["tied", "outer_untied_text_tied", "outer_tied_text_untied"],
)
def test_gemma3_image_text_model_matches_hf_on_text(text: dict[str, Any], overrides: dict[str, Any]) -> None:
    """The text model of the image-text model, tied as transformers ties it (by the outer config); vision weights ignored."""
    hf = image_text(text, **overrides)
    assert any(name.startswith("model.vision_tower.") for name in hf.state_dict())
    ours = nanollm.from_hf(hf)
    assert hasattr(ours, "lm_head") != hf.config.tie_word_embeddings
    assert_same_logits(hf, ours)


def test_gemma3_image_text_model_loads_from_a_directory(tmp_path: Path) -> None:
    """Through save_pretrained and AutoModelForCausalLM, the outer config's untied head survives."""
    hf = image_text({"tie_word_embeddings": True}, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    assert_same_logits(hf, nanollm.from_hf(tmp_path))


def test_a_head_read_as_tied_but_not_the_embedding_is_refused() -> None:
    """Were a config read as tied while the model's head is its own matrix, the head is not silently dropped."""
    hf = gemma3(tie_word_embeddings=False)
    hf.config.tie_word_embeddings = True
    with pytest.raises(ArchError, match="lm_head differs"):
        nanollm.from_hf(hf)


# --- OLMo 2 and 3 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_olmo2_matches_hf(kv_heads: int) -> None:
    """Post-norm residuals and QK-norm over the whole q and k projections."""
    hf = tiny(Olmo2ForCausalLM, Olmo2Config, OLMO2, num_key_value_heads=kv_heads, rope_parameters=dict(ROPE_1E4, rope_theta=1e3))
    arch = arch_from_config(hf.config)
    assert arch.config.qk_norm == "projection" and {layer.residual.name for layer in arch.layers} == {"postnorm"}
    assert hf.model.layers[0].self_attn.q_norm.weight.shape == (64,)  # the whole projection, not a head
    assert_same_logits(hf)


def test_olmo3_base_matches_hf() -> None:
    hf = olmo3()
    arch = arch_from_config(hf.config)
    assert [(layer.mixer.name, layer.mixer.kwargs().get("window")) for layer in arch.layers] == [
        ("sliding", WINDOW), ("sliding", WINDOW), ("sliding", WINDOW), ("global", None)]
    assert arch.config.qk_norm == "projection" and {layer.residual.name for layer in arch.layers} == {"postnorm"}
    assert_same_logits(hf)


OLMO3_CASES = {
    "gqa": dict(num_key_value_heads=2),
    "theta_per_layer_type": rope_types({"rope_type": "default", "rope_theta": 1e6}),
    "rope_theta_sets_only_full_layers": dict(rope_theta=1e2),
    "yarn_given_attention_factor": rope_types(dict(YARN, attention_factor=1.5)),
    "yarn_computed_attention_factor": rope_types(YARN),
    "yarn_default_betas": rope_types({k: v for k, v in YARN.items() if not k.startswith("beta")}),
}


@pytest.mark.parametrize("overrides", OLMO3_CASES.values(), ids=OLMO3_CASES.keys())
def test_olmo3_property_matches_hf(overrides: dict[str, Any]) -> None:
    assert_changes(assert_same_logits(olmo3(**overrides)), baseline("olmo3"))


def test_olmo3_rope_is_read_per_layer_type() -> None:
    assert thetas(arch_from_config(olmo3(rope_theta=1e2).config)) == {"sliding": 5e5, "global": 1e2}
    rope = arch_from_config(olmo3(**OLMO3_CASES["yarn_given_attention_factor"]).config).config.rope.kwargs()
    assert (rope["factor"], rope["original"], rope["beta_fast"], rope["beta_slow"], rope["attention_factor"]) == (4.0, 16, 2.0, 0.25, 1.5)


def untruncated(call: Call) -> Call:
    """A mixer call whose YaRN (if any) does not round its ramp's ends."""
    rope = call.kwargs()["rope"]
    return with_call(call, rope=with_call(rope, truncate=False)) if rope.name == "yarn" else call


def test_olmo3_yarn_truncate_is_read_where_transformers_reads_it() -> None:
    """transformers' YaRN reads `truncate` from the top of rope_parameters, so a layer type's own is ignored there;
    nanollm follows, to give the same logits (honouring it would not)."""
    hf = olmo3(**rope_types(dict(YARN, truncate=False)))
    arch = arch_from_config(hf.config)
    assert arch.config.rope.kwargs()["truncate"] is True
    expected = assert_same_logits(hf)
    torch.testing.assert_close(expected, hf_logits(olmo3(**OLMO3_CASES["yarn_computed_attention_factor"])), atol=0, rtol=0)
    with pytest.raises(AssertionError):
        assert_same_logits(hf, with_weights(mutated(arch, mixer=untruncated), hf))


# --- what transformers itself ignores, and refusals -----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda rope: tiny(Qwen3ForCausalLM, Qwen3Config, TINY, rope_parameters=rope),
        lambda rope: tiny(Olmo2ForCausalLM, Olmo2Config, OLMO2, rope_parameters=rope),
        lambda rope: gemma3(**rope_types(rope, rope)),
    ],
    ids=["qwen3", "olmo2", "gemma3"],
)
def test_partial_rotary_factor_of_default_rope_is_ignored_as_transformers_ignores_it(make: Any) -> None:
    """These families rotate whole heads: transformers' default RoPE leaves partial_rotary_factor unused."""
    hf = make({"rope_type": "default", "rope_theta": 1e3, "partial_rotary_factor": 0.5})
    assert arch_from_config(hf.config).config.rope.kwargs()["fraction"] == 1.0
    assert_same_logits(hf)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Gemma3TextConfig(**fresh(GEMMA3, use_bidirectional_attention=True)), "bidirectional"),
        (lambda: Gemma3TextConfig(**fresh(GEMMA3, attention_bias=True)), "attention_bias"),
        (lambda: Gemma3TextConfig(**fresh(GEMMA3, hidden_activation="gelu")), "hidden_activation"),
        (lambda: Gemma3TextConfig(**fresh(GEMMA3, **rope_types({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))), "rope_type"),
        (lambda: Gemma3Config(text_config=fresh(GEMMA3, attention_bias=True), vision_config=VISION, **IMAGE_TOKENS), "attention_bias"),
        (lambda: Olmo2Config(**fresh(OLMO2, attention_bias=True)), "attention_bias"),
        (lambda: Olmo3Config(**fresh(OLMO3, **rope_types({"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0}))), "rope_type"),
        (lambda: Olmo3Config(**fresh(OLMO3, **rope_types(dict(YARN, partial_rotary_factor=0.5)))), "partial_rotary_factor"),
    ],
    ids=["gemma3_bidirectional", "gemma3_attention_bias", "gemma3_gelu", "gemma3_dynamic_rope", "gemma3_image_text_attention_bias",
         "olmo2_attention_bias", "olmo3_llama3_rope", "olmo3_partial_yarn"],
)
def test_unsupported_settings_are_refused_in_one_line(make: Any, message: str) -> None:
    with pytest.raises(ArchError, match=message) as error:
        arch_from_config(make())
    assert "\n" not in str(error.value)
