"""Export: a nanollm model -> a transformers model directory (config, safetensors, tokenizer).

Where a family `from_hf` imports expresses the architecture, the directory is that family's, loadable by
`AutoModelForCausalLM.from_pretrained` with no custom code: each family adapter maps an Arch to its config
(`Family.config_from_arch`), and a config counts only if importing it gives back the same model, so no
mapping can export something else silently. The weights are renamed by the same `weight_names` and
`Family.renames` import reads.
Otherwise the directory holds nanollm's IR in its config and `modeling_nanollm.py`, loadable with
trust_remote_code (nanollm installed), the weights under their nanollm names.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import fx

from ..errors import ArchError, NanollmError
from ..ir import Arch, arch_to_json
from . import FAMILIES, Family, arch_from_config, weight_names
from .modeling_nanollm import NanollmConfig


def model_defining(arch: Arch) -> Arch:
    """The Arch with the settings that do not change the model (training length, the defaults the layers' calls
    already spell out) set aside: two Archs build the same model exactly when these are equal."""
    config = arch.config
    kept = {name: getattr(config, name) for name in ("vocab_size", "d_model", "norm_eps", "norm", "residual", "logit_softcap", "embed_scale",
                                                         "tie_embeddings", "attn_scale")}
    return Arch(dataclasses.replace(type(config)(), **kept), arch.layers)


def native_config(arch: Arch) -> tuple[Any, Family] | None:
    """The transformers config of the first family that expresses the model exactly, and the family; None if none does."""
    wanted = model_defining(arch)
    for adapter in FAMILIES.values():
        config = adapter.config_from_arch(arch) if adapter.config_from_arch else None
        if config is None:
            continue
        try:
            if model_defining(arch_from_config(config)) == wanted:
                return config, adapter
        except ArchError:
            continue
    return None


def export(model: fx.GraphModule, arch: Arch, tokenizer: Any, target: Path) -> Any:
    """Write `model` as a transformers model directory at `target` (which must not exist); returns its config."""
    if target.exists():
        raise NanollmError(f"{target} exists: export writes a new directory")
    found = native_config(arch)
    own = model.state_dict()
    if found is None:  # nanollm's own classes, behind transformers' Auto classes
        config = NanollmConfig(arch=json.dumps(arch_to_json(arch)), architectures=["NanollmForCausalLM"], vocab_size=arch.config.vocab_size,
                               num_hidden_layers=len(arch.layers), use_cache=False,  # generate recomputes: no transformers cache
                               auto_map={"AutoConfig": "modeling_nanollm.NanollmConfig", "AutoModelForCausalLM": "modeling_nanollm.NanollmForCausalLM"})
        names = {name: f"model.{name}" for name in own}
    else:
        config, adapter = found
        config.architectures = [adapter.causal_lms[0]]
        names = {ours: adapter.rename(theirs) for ours, theirs in weight_names(model, arch, adapter.decoder).items()}  # in the family's spelling
    if tokenizer is not None:
        config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    config.dtype = "float32"
    tensors = {theirs: own[ours].detach().to("cpu", torch.float32).contiguous() for ours, theirs in names.items()}
    target.mkdir(parents=True)
    config.save_pretrained(target)
    if found is None:
        shutil.copy(Path(__file__).with_name("modeling_nanollm.py"), target)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return config
