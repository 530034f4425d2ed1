"""A nanollm model for transformers' Auto classes: the compiled graph behind a PreTrainedModel.

`nanollm export` copies this file into a model directory whose architecture no transformers family expresses;
its config's auto_map names the classes, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
loads it (with nanollm installed) and `generate` works, recomputing the whole sequence each step.
"""
from __future__ import annotations

import json

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nanollm.compiled import Compiled
from nanollm.ir import Arch, arch_from_json


class NanollmConfig(PretrainedConfig):
    """The nanollm IR of the model, as JSON text: transformers writes configs with sorted keys, which would reorder a
    layer's sublayers in the IR's JSON object."""

    model_type = "nanollm"

    def __init__(self, arch: str | None = None, **kwargs) -> None:
        self.arch = arch
        super().__init__(**kwargs)

    def nanollm_arch(self) -> Arch:
        """The IR."""
        return arch_from_json(json.loads(self.arch))


class NanollmForCausalLM(PreTrainedModel, GenerationMixin):
    """forward(input_ids) -> logits of the nanollm graph; generate recomputes the whole sequence each step (no cache)."""

    config_class = NanollmConfig
    base_model_prefix = "model"

    def __init__(self, config: NanollmConfig) -> None:
        super().__init__(config)
        self.model = Compiled(config.nanollm_arch()).build(dtype=torch.float32)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # the build initialises; from_pretrained loads every weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        logits, _ = self.model(input_ids)
        return CausalLMOutputWithPast(logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}
