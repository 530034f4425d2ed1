"""Import transformers models: a config -> the nanollm IR (per family, one file each), weights -> the compiled model.

A family adapter (`Family`) reads its transformers config into an `Arch` and names where the decoder lives
in the state dict. Weight names come from the model itself: each component maps its own parameters
(`Component.hf_names`), each residual scheme its norms (`Residual.hf_names`); nothing here knows a component.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import fx

from ..compiled import Compiled
from ..compiler import Site, make_component
from ..components import complete
from ..errors import ArchError
from ..ir import Arch, Call, ModelConfig


@dataclass(frozen=True)
class Family:
    """How nanollm reads one transformers model type."""

    causal_lms: tuple[str, ...]  # the model classes from_hf takes, e.g. ("Qwen3ForCausalLM",)
    arch_from_config: Callable[[Any], Arch]
    decoder: str = "model."  # state-dict prefix of the decoder
    ignored: tuple[str, ...] = ()  # state-dict prefixes of weights that are not the language model's (a vision tower)
    # The transformers config of an Arch this family may express, or None where it plainly cannot (export); export
    # keeps it only if importing it gives back the same model (`expresses`), so the mapping needs no check of its own.
    config_from_arch: Callable[[Arch], Any] | None = None
    # (pattern, replacement) regex substitutions from the usual transformers names (embed_tokens, input_layernorm,
    # self_attn.o_proj, mlp.gate_proj, ...) to the family's own (LFM2's operator_norm, Nemotron-H's mixer, ...)
    renames: tuple[tuple[str, str], ...] = ()
    derived: tuple[str, ...] = ()  # names ending so are buffers transformers recomputes from the config (MiniMax's decay tables)

    def rename(self, name: str) -> str:
        """A transformers name in the usual spelling, in this family's spelling."""
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        return name


FAMILIES: dict[str, Family] = {}


def family(model_type: str, family: Family) -> None:
    """Register a family adapter under a transformers model_type."""
    FAMILIES[model_type] = family


def supported() -> str:
    """The model classes from_hf takes, for messages."""
    return ", ".join(name for f in FAMILIES.values() for name in f.causal_lms)


def call(name: str, kind: str, config: ModelConfig, **args: Any) -> Call:
    """A resolved call: the given arguments, defaults for the rest, checked as the language checks it."""
    try:
        return complete(Call(name, tuple(args.items())), kind, config)
    except ArchError as error:
        raise ArchError(f"the transformers config maps to a {name} call nanollm refuses: {error.message}") from None


def common_settings(hf: Any) -> dict[str, Any]:
    """The ModelConfig settings every decoder config states the same way."""
    return dict(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        norm_eps=float(next(getattr(hf, name) for name in ("rms_norm_eps", "norm_eps", "layer_norm_epsilon") if hasattr(hf, name))),
        tie_embeddings=bool(hf.tie_word_embeddings),
    )


def rope_call(parameters: dict[str, Any] | None, config: ModelConfig, partial: bool = False) -> Call:
    """The position encoding of transformers' rope_parameters (one layer type's): rope, linear rope, YaRN, or none.

    `partial`: whether the family's attention rotates only the partial_rotary_factor share of each head. Where it
    rotates whole heads (every family here), transformers' default RoPE ignores the factor, and its linear or YaRN
    tables come out narrower than the heads they rotate (an error there, refused here).
    """
    if parameters is None:
        return Call("nope")
    kind = parameters.get("rope_type", "default")
    theta = float(parameters["rope_theta"])
    fraction = float(parameters.get("partial_rotary_factor", 1.0))
    if fraction != 1.0 and not partial:
        refuse(kind != "default", f"partial_rotary_factor {fraction:g} with rope_type {kind!r}: transformers' tables would not fit "
                                  "the whole heads this family rotates")
        fraction = 1.0
    shape = {"fraction": fraction}
    if kind == "default":
        return call("rope", "position", config, theta=theta, **shape)
    if kind == "linear":
        return call("rope", "position", config, theta=theta, factor=float(parameters["factor"]), **shape)
    if kind == "yarn":
        # transformers treats a zero (falsy) beta or mscale as unset, as here
        extra = {key: float(parameters[key]) for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
                 if parameters.get(key)}
        return call("yarn", "position", config, theta=theta, factor=float(parameters["factor"]),
                    original=int(parameters["original_max_position_embeddings"]), truncate=bool(parameters.get("truncate", True)), **extra, **shape)
    raise ArchError(f"transformers rope_type {kind!r} is not supported (default, linear and yarn are)")


def layer_type_rope(hf: Any, layer_type: str) -> dict[str, Any] | None:
    """One layer type's rope_parameters in a config that has them per layer type (Gemma 3, OLMo 3), as transformers
    reads them: its YaRN takes `truncate` from the top level of rope_parameters, never from the layer type's own."""
    parameters = hf.rope_parameters[layer_type]
    if parameters is None or parameters.get("rope_type") != "yarn":
        return parameters
    return {**parameters, "truncate": hf.rope_parameters.get("truncate", True)}


def rope_parameters(rope: Call) -> dict[str, Any] | None:
    """transformers' rope_parameters of a position encoding (the inverse of `rope_call`); None for nope."""
    if rope.name == "nope":
        return None
    args = rope.kwargs()
    # partial RoPE (Qwen3-Next, Qwen3.5); a family rotating whole heads imports the factor as 1 or refuses it, so never exports it
    shape = {"partial_rotary_factor": args["fraction"]} if args.get("fraction", 1.0) != 1.0 else {}
    if rope.name == "yarn":
        # a zero is unset (as `rope_call` reads it): transformers would take a written 0 as the value
        extra = {key: args[key] for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor") if args.get(key)}
        return {"rope_type": "yarn", "rope_theta": args["theta"], "factor": args["factor"], "original_max_position_embeddings": args["original"],
                "truncate": args["truncate"], **extra, **shape}
    if args["factor"] != 1.0:
        return {"rope_type": "linear", "rope_theta": args["theta"], "factor": args["factor"], **shape}
    return {"rope_type": "default", "rope_theta": args["theta"], **shape}


def attention_only(arch: Arch, ffns: tuple[str, ...]) -> bool:
    """Whether every layer is a global or sliding attention and one of these FFNs."""
    return all(layer.mixer is not None and layer.mixer.name in ("global", "sliding") and layer.ffn is not None and layer.ffn.name in ffns
               for layer in arch.layers)


def first_attention(arch: Arch) -> dict[str, Any] | None:
    """The arguments of the first global or sliding attention among the layers (None if there is none)."""
    return next((layer.mixer.kwargs() for layer in arch.layers if layer.mixer is not None and layer.mixer.name in ("global", "sliding")), None)


def common_fields(arch: Arch, d_ff: int) -> dict[str, Any]:
    """The transformers config fields every decoder states the same way (the inverse of `common_settings`), the heads
    read from the first attention layer (one there must be)."""
    config, attention = arch.config, first_attention(arch)
    return dict(vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=len(arch.layers), num_attention_heads=attention["heads"],
                num_key_value_heads=attention["kv_heads"], head_dim=attention["head_dim"], intermediate_size=d_ff, rms_norm_eps=config.norm_eps,
                tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.seq_len, attention_bias=False)


def layer_types(arch: Arch) -> tuple[list[str], int | None]:
    """Each layer's transformers layer type (full or sliding attention) and the sliding window (None if none slides)."""
    windows = [layer.mixer.kwargs().get("window") for layer in arch.layers]
    types = ["sliding_attention" if window else "full_attention" for window in windows]
    return types, next((window for window in windows if window), None)


def refuse(condition: bool, message: str) -> None:
    """ArchError(message) if the config asks for something nanollm does not reproduce."""
    if condition:
        raise ArchError(message)


def arch_from_config(hf: Any) -> Arch:
    """The nanollm IR of a supported transformers config; ArchError for what nanollm cannot express."""
    adapter = FAMILIES.get(hf.model_type)
    if adapter is None:
        raise ArchError(f"transformers model_type {hf.model_type!r} is not supported (from_hf takes {supported()})")
    return adapter.arch_from_config(hf)


def load_config(path: str | os.PathLike) -> Any:
    """The transformers config of a local model directory or config.json file (never the hub)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ArchError(f"{path}: no config.json there (give a model directory or its config.json)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ArchError(f"{file}: not a readable JSON config ({error})") from None
    if "model_type" not in data:
        raise ArchError(f"{file}: no model_type in it, so it is not a transformers config")
    if data["model_type"] == "nanollm":  # nanollm's own export (modeling_nanollm.py), no transformers family
        from .modeling_nanollm import NanollmConfig

        return NanollmConfig(**data)
    try:
        return transformers.AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as error:
        raise ArchError(f"{file}: transformers cannot read it ({str(error).splitlines()[0]})") from None


def weight_names(model: fx.GraphModule, arch: Arch, decoder: str = "model.") -> dict[str, str]:
    """nanollm parameter (and persistent buffer) name -> transformers name, asked of each component and residual site."""
    names = {"embed.weight": f"{decoder}embed_tokens.weight", "norm.weight": f"{decoder}norm.weight"}
    if not arch.config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    schemes = {call: make_component(call, arch.config) for call in {arch.config.residual, *(layer.residual for layer in arch.layers)}}
    names |= {ours: f"{decoder}{theirs}" for ours, theirs in schemes[arch.config.residual].hf_model_names().items()}
    for i, layer in enumerate(arch.layers):
        theirs = f"{decoder}layers.{i}."
        for slot, _ in layer.sublayers:
            site = Site(i, slot)
            for part, module_name in schemes[layer.residual].hf_names(slot).items():
                for name, _ in model.get_submodule(site.module(part)).named_parameters():
                    names[f"{site.module(part)}.{name}"] = f"{theirs}{module_name}.{name}"
            for ours, hf_name in model.get_submodule(site.module()).hf_names().items():
                names[f"{site.module()}.{ours}"] = theirs + hf_name
    return names


def from_hf(model: transformers.PreTrainedModel | str | os.PathLike) -> fx.GraphModule:
    """A nanollm model carrying the weights of a supported transformers causal LM (or a local directory / hub id of one)."""
    if isinstance(model, (str, os.PathLike)):
        arch_from_config(transformers.AutoConfig.from_pretrained(model))  # refuse before loading any weight
        model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    arch = arch_from_config(model.config)
    adapter = FAMILIES[model.config.model_type]
    if type(model).__name__ not in adapter.causal_lms:
        raise ArchError(f"from_hf takes a causal LM ({supported()}), not {type(model).__name__}")
    ours = Compiled(arch).build(device=model.device, dtype=model.dtype)
    names = {ours: adapter.rename(hf_name) for ours, hf_name in weight_names(ours, arch, adapter.decoder).items()}
    theirs = model.state_dict()
    unused = theirs.keys() - names.values() - ({"lm_head.weight"} if arch.config.tie_embeddings else set())
    unused = {name for name in unused if not name.startswith(adapter.ignored) and not name.endswith(adapter.derived)}
    if unused:
        raise ArchError(f"transformers weights nanollm has no place for: {', '.join(sorted(unused))}")
    head = theirs.get("lm_head.weight")
    if arch.config.tie_embeddings and head is not None and not torch.equal(head, theirs[names["embed.weight"]]):
        raise ArchError("the transformers model's lm_head differs from its token embedding, though nanollm read its config as tied")
    ours.load_state_dict({name: theirs[hf_name] for name, hf_name in names.items()}, strict=True)
    return ours


from . import (  # noqa: E402,F401  the family adapters register themselves
    deepseek, deepseek_v4, gemma3, gpt_oss, kimi_linear, lfm2, minimax, mixtral, nemotron_h, olmo, olmo_hybrid, qwen3, qwen3_5, qwen3_next,
)


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """The `moe` call of a Qwen3-MoE, Mixtral, DeepSeek-V3(.2) or GPT-OSS sparse layer (DeepSeek-V3's is proven at block level)."""
    makers = {"qwen3_moe": qwen3.moe_call, "mixtral": mixtral.moe_call, "deepseek_v3": deepseek.moe_call, "deepseek_v32": deepseek.moe_call,
              "gpt_oss": gpt_oss.moe_call}
    if hf.model_type not in makers:
        raise ArchError(f"transformers model_type {hf.model_type!r} has no MoE layer nanollm knows")
    return makers[hf.model_type](hf, config)
