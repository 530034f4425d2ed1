"""Incremental decoding: every family from_hf imports generates transformers' greedy tokens, and each decoding step's
logits equal the full forward pass's at that position (global, sliding ring buffers, sinks, block patterns, MLA's
latent cache, DSA's selection, MoE, and every recurrent mixer: gated DeltaNet, KDA, lightning, Mamba-2, the short
convolution, Engram), prompts past every window, chunk and DSA's top-k."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_deepseek_v4 import V4
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    KimiLinearConfig,
    KimiLinearForCausalLM,
    Lfm2Config,
    Lfm2ForCausalLM,
    MiniMaxConfig,
    MiniMaxForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    OlmoHybridConfig,
    OlmoHybridForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

import nanollm
from nanollm.cli import main
from nanollm.compiled import Compiled
from nanollm.components.linear.delta_rule import DeltaRuleMixer
from nanollm.decode import Decoder, Sampling, generated
from nanollm.hf import FAMILIES as ADAPTERS
from nanollm.hf import arch_from_config
from nanollm.hf.export import export, native_config
from nanollm.train.tokenizer import load_tokenizer
from nanollm.trained import load_trained

WINDOW = 5
PROMPT = 12  # longer than every window
NEW = 40
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, eos_token_id=None, bos_token_id=None, pad_token_id=None, max_position_embeddings=128)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
LATENT = {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
          "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
          "first_k_dense_replace": 1}
YARN = {"rope_type": "yarn", "rope_theta": 1e3, "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 1.0,
        "truncate": False}
ATTENTION_FAMILIES = {
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(layer_types=MIXED, use_sliding_window=True, sliding_window=WINDOW)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                            use_sliding_window=True, sliding_window=WINDOW)),
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig, dict(layer_types=MIXED, sliding_window=WINDOW, query_pre_attn_scalar=12,
                                                              final_logit_softcapping=5.0)),
    "olmo2": (Olmo2ForCausalLM, Olmo2Config, {}),
    "olmo3": (Olmo3ForCausalLM, Olmo3Config, dict(layer_types=MIXED, sliding_window=WINDOW)),
    # MLA: a query latent, one dense layer then the MoE; queries from the input, half-split RoPE, YaRN with its logit-scale
    # correction (mscale_all_dim), two dense layers
    "deepseek_v3": (DeepseekV3ForCausalLM, DeepseekV3Config, LATENT),
    "deepseek_v3_q_direct": (DeepseekV3ForCausalLM, DeepseekV3Config, dict(LATENT, q_lora_rank=None, rope_interleave=False, first_k_dense_replace=2,
                                                                          rope_parameters=dict(YARN, mscale=0.8, mscale_all_dim=1.0))),
    "deepseek_v32": (DeepseekV32ForCausalLM, DeepseekV32Config, dict(LATENT, index_topk=7, index_n_heads=8, index_head_dim=16)),  # 7 < PROMPT
    "deepseek_v4": (DeepseekV4ForCausalLM, DeepseekV4Config, dict(V4, vocab_size=TINY["vocab_size"], max_position_embeddings=128,
                                                                  mlp_layer_types=["hash_moe", "moe", "moe"])),  # window, CSA, HCA under mHC
    "gpt_oss": (GptOssForCausalLM, GptOssConfig, {"sliding_window": WINDOW, "num_local_experts": 8, "num_experts_per_tok": 3, "swiglu_limit": 1.5,
                                                  "rope_parameters": YARN}),  # sinks, biases, sliding and full layers, YaRN past 16
}
CHUNK = 5  # every chunked form's block, so that the prompt spans several and ends inside one
LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=4)
HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
RECURRENT_FAMILIES = {  # the hybrids of recurrent mixers
    "qwen3_next": (Qwen3NextForCausalLM, Qwen3NextConfig, dict(LINEAR, layer_types=HYBRID_LAYERS, num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3_5_text": (Qwen3_5ForCausalLM, Qwen3_5TextConfig, dict(LINEAR, layer_types=HYBRID_LAYERS)),
    "olmo_hybrid": (OlmoHybridForCausalLM, OlmoHybridConfig, dict(LINEAR, layer_types=HYBRID_LAYERS)),
    "minimax": (MiniMaxForCausalLM, MiniMaxConfig, dict(layer_types=HYBRID_LAYERS, block_size=CHUNK, num_local_experts=4,
                                                        num_experts_per_tok=2, full_attn_alpha_factor=1.5, linear_attn_beta_factor=1.2)),
    "nemotron_h": (NemotronHForCausalLM, NemotronHConfig, dict(num_hidden_layers=5, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                                                               n_groups=2, chunk_size=CHUNK, use_conv_bias=True, layers_block_type=[
                                                                   "linear_attention", "mlp", "full_attention", "linear_attention", "mlp"])),
    "lfm2": (Lfm2ForCausalLM, Lfm2Config, dict(layer_types=["conv", "full_attention", "conv", "conv"], block_multiple_of=32, conv_bias=True)),
    "kimi_linear": (KimiLinearForCausalLM, KimiLinearConfig, dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, linear_attn_config={"num_heads": 4, "head_dim": 8, "short_conv_kernel_size": 4, "kda_layers": [1, 3, 4],
        "full_attn_layers": [2]})),
}
FAMILIES = {**ATTENTION_FAMILIES, **RECURRENT_FAMILIES}  # each decodes as transformers does and exports as its own transformers model


def tiny(family: str, std: float = 0.2) -> Any:
    """A tiny random transformers model of a family, eager, fp32; weights drawn N(0, std), by default wide enough that
    greedy choices are decisive (no near-ties for rounding to flip)."""
    model_class, config_class, overrides = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**{**TINY, **copy.deepcopy(overrides)}, attn_implementation="eager", experts_implementation="eager")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif param.dim() >= 2:
                param.normal_(0, std)
            elif name.endswith(("sinks", "bias")):  # GPT-OSS's sinks and biases start at zero
                param.normal_(0, 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's routing bias, zero at init, changes the choice
                buffer.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def decoder_of(hf: Any) -> Decoder:
    """nanollm's decoder of the same weights; delta-rule chunks of `CHUNK` tokens (transformers' own are fixed at 64)."""
    model = nanollm.from_hf(hf).eval()
    for module in model.modules():
        if isinstance(module, DeltaRuleMixer):
            module.chunk = CHUNK  # a chunk's size changes only the order of the sums
    return Decoder(model, arch_from_config(hf.config), context=hf.config.max_position_embeddings)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family: str) -> None:
    hf = tiny(family)
    torch.manual_seed(1)
    prompt = torch.randint(0, TINY["vocab_size"], (2, PROMPT))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    ours = generated(decoder_of(hf), prompt, NEW)
    assert torch.equal(ours, theirs[:, PROMPT:])


def assert_steps_give_the_full_forward(decoder: Decoder, sequence: torch.Tensor, second: int) -> None:
    """A prefill of PROMPT tokens, a second chunk of `second` continuing it from the states (a ring buffer or a chunk met
    mid-sequence), then tokens one by one: every step's logits equal the full forward pass's at its positions (1e-5)."""
    with torch.no_grad():
        full, _ = decoder.model(sequence)
        states = decoder.states(sequence.shape[0], sequence.shape[1])
        steps = [decoder.step(sequence[:, :PROMPT], 0, states), decoder.step(sequence[:, PROMPT:PROMPT + second], PROMPT, states)]
        steps += [decoder.step(sequence[:, t:t + 1], t, states) for t in range(PROMPT + second, sequence.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3_text", "deepseek_v32"])
def test_each_decoding_step_gives_the_full_forward_logits_at_its_position(family: str) -> None:
    hf = tiny(family, std=0.05)  # logits of order 1, where 1e-5 is a tolerance of rounding only
    decoder = decoder_of(hf)
    torch.manual_seed(2)
    assert_steps_give_the_full_forward(decoder, torch.randint(0, TINY["vocab_size"], (2, PROMPT + 16)), 7)


MLA = "qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12"
PATTERNS = {  # attention patterns no family above has, each decoded against its own full forward
    "sinks": "repeat 1 < sliding(5, sinks=true); global(sinks=true) >",
    "blocksparse": "blocksparse(4, 2, global=1); blocksparse(3, 1, global=0, stride=2)",
    "mla": f"mla(16, {MLA}); mla(16, 24, {MLA}, absorb=true, gate=head)",  # both forms decode over the latent cache
    "mla_nope": f"mla(16, 24, {MLA}, rope=nope, gate=elementwise); mla(16, {MLA}, rope=nope, absorb=true)",  # Kimi-Linear's
    "key_query_gates": f"global(gate=key); sliding(5, gate=query); mla(16, 24, {MLA}, absorb=true, gate=query); mla(16, {MLA}, gate=output)",  # G3, G4, G5
    # 4 indexer heads: exact ties (every head's ReLU 0) fall at the top-k boundary
    "dsa": f"dsa(5, kv_lora_rank=16, q_lora_rank=24, {MLA}, index_heads=4, index_head_dim=16); "
           f"dsa(3, kv_lora_rank=16, q_lora_rank=8, {MLA}, index_heads=2, index_head_dim=8, rope=rope(interleaved=false), gate=query)",
}


@pytest.mark.parametrize("layers", PATTERNS.values(), ids=list(PATTERNS))
def test_each_decoding_step_of_sinks_and_block_patterns_gives_the_full_forward_logits(layers: str) -> None:
    compiled = nanollm.compile(HYBRID.split("repeat")[0] + layers)
    torch.manual_seed(3)
    model = compiled.build().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_(0, 2)  # sinks start at 0: give each head its own
    decoder = Decoder(model, compiled.arch, context=64)
    assert_steps_give_the_full_forward(decoder, torch.randint(0, 96, (2, PROMPT + 10)), 3)


RECURRENT_PATTERNS = {  # every recurrent mixer and memory between attention layers; (settings, layers)
    "delta_rule": ("", "gdn(chunk=5, key_heads=2, value_dim=6); sliding(5); kda(chunk=4); global"),
    "state_space": ("", "mamba2(heads=4, head_dim=8, state=6, groups=2, chunk=5); lightning(chunk=5, decay=0.5); shortconv(3); global"),
    "engram_twice_mhc": ("residual = mhc(4)\n", ("global memory=engram(rows=101)\ngdn(chunk=5)\nsliding(5) memory=engram(2, 2, 97, seed=3)\n"
                                                "mamba2(heads=4, head_dim=8, state=6, groups=2, chunk=5)")),
    "hc": ("residual = hc(2)\n", "gdn(chunk=5); lightning(chunk=5); shortconv(4); global"),
}


def recurrent_decoder(settings: str, layers: str) -> Decoder:
    """The decoder of a tiny random model of HYBRID's settings with these `layers`."""
    compiled = nanollm.compile(HYBRID.split("repeat")[0] + settings + layers)
    torch.manual_seed(3)
    return Decoder(compiled.build().eval(), compiled.arch, context=64)


@pytest.mark.parametrize("settings, layers", RECURRENT_PATTERNS.values(), ids=list(RECURRENT_PATTERNS))
def test_each_decoding_step_of_recurrent_mixers_gives_the_full_forward_logits(settings: str, layers: str) -> None:
    decoder = recurrent_decoder(settings, layers)
    assert_steps_give_the_full_forward(decoder, torch.randint(0, 96, (2, PROMPT + 10)), 3)


def test_recurrent_decoding_runs_on_the_meta_device() -> None:
    every_recurrent = ("gdn(chunk=5) memory=engram(rows=101)\nkda(chunk=4)\nmamba2(heads=4, head_dim=8, state=6, groups=2, chunk=5)\n"
                       "lightning(chunk=5)\nshortconv(3)")
    compiled = nanollm.compile(HYBRID.split("repeat")[0] + every_recurrent)
    decoder = Decoder(compiled.graph, compiled.arch, context=4096)
    states = decoder.states(3, 4096)
    for length, start in ((20, 0), (1, 4000)):  # a prefill in the chunked form, then a step
        logits = decoder.step(torch.zeros(3, length, dtype=torch.long, device="meta"), start, states)
        assert logits.is_meta and logits.shape == (3, length, 96)


def test_a_recurrent_state_has_one_size_at_any_capacity_the_one_the_analysis_counts() -> None:
    decoder = recurrent_decoder(*RECURRENT_PATTERNS["engram_twice_mhc"])
    short, long = decoder.states(1, 16), decoder.states(1, 100_000)
    recurrent = {path: component for path, component in decoder.stateful.items() if component.fixed_state}
    assert len(recurrent) == 4  # the two Engrams, gdn and mamba2
    for path, component in recurrent.items():
        assert {name: t.shape for name, t in short[path].items()} == {name: t.shape for name, t in long[path].items()}
        values = sum(t.numel() for t in long[path].values() if t.is_floating_point())  # Engram's last ids are ids, not cache
        assert values == component.cache_elements(100_000)


def test_a_sliding_cache_holds_only_its_window() -> None:
    decoder = decoder_of(tiny("qwen3"))
    states = decoder.states(1, 100)
    sizes = {path: state["keys"].shape[2] for path, state in states.items()}
    assert sizes == {"layers.0.mixer": WINDOW, "layers.1.mixer": 100, "layers.2.mixer": WINDOW, "layers.3.mixer": WINDOW}


def test_mla_and_dsa_caches_hold_the_latent_at_deepseek_sizes_as_the_analysis_counts() -> None:
    """At DeepSeek-V3's sizes a token costs an MLA layer 512 + 64 = 576 cached elements, and a DSA layer 128 more (the
    indexer's key): what `cache_elements` reports; the decoding step runs on the meta device."""
    header = (Path(__file__).parent.parent / "archs/deepseek_v3.arch").read_text().split("repeat")[0]
    compiled = nanollm.compile(header + "mla(q_lora_rank=1536); dsa(q_lora_rank=1536)\n")
    decoder = Decoder(compiled.graph, compiled.arch, context=4096)
    states = decoder.states(1, 4096)
    held = {path: sum(tensor.numel() for tensor in state.values()) // 4096 for path, state in states.items()}
    assert held == {"layers.0.mixer": 576, "layers.1.mixer": 576 + 128}
    assert all(decoder.stateful[path].cache_elements(4096) == per_token * 4096 for path, per_token in held.items())
    logits = decoder.step(torch.zeros(1, 1, dtype=torch.long, device="meta"), 4000, states)
    assert logits.is_meta and logits.shape == (1, 1, compiled.arch.config.vocab_size)


def test_the_decoding_graph_runs_on_the_meta_device() -> None:
    compiled = Compiled(arch_from_config(tiny("qwen3_moe").config))
    decoder = Decoder(compiled.graph, compiled.arch, context=4096)
    states = decoder.states(3, 4096)
    logits = decoder.step(torch.zeros(3, 1, dtype=torch.long, device="meta"), 4000, states)
    assert logits.is_meta and logits.shape == (3, 1, TINY["vocab_size"])


def test_a_compiled_decoder_generates_the_eager_decoders_tokens() -> None:
    """`Decoder(compiled=True)` (`generate --compile`): torch.compile of the decoding step, one graph for the prefill and
    one for single tokens at symbolic positions, chooses the eager decoder's tokens, ring buffers wrapping past their window."""
    eager = decoder_of(tiny("qwen3"))
    compiled = Decoder(eager.model, eager.arch, eager.context, compiled=True)
    torch.manual_seed(3)
    prompt = torch.randint(0, TINY["vocab_size"], (2, PROMPT))
    assert torch.equal(generated(compiled, prompt, 12), generated(eager, prompt, 12))


def test_sampling_keeps_only_the_top_k_and_top_p_tokens() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(Sampling(temperature=1.0, top_k=2).choose(logits, generator).tolist()) == {0, 1}
    # softmax: 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two (0.64 < 0.8 <= 0.88)
    assert set(Sampling(temperature=1.0, top_p=0.8).choose(logits, generator).tolist()) == {0, 1}
    assert set(Sampling(temperature=0.0).choose(logits).tolist()) == {0}


RUN = Path(__file__).resolve().parent / "fixtures" / "run_before_issue_18"  # 2 steps of a tiny model, embedded tokenizer
RUN_ARCH = json.loads((RUN / "manifest.json").read_text())["arch_text"]


def test_generate_streams_a_runs_text_and_sampling_repeats_with_its_seed(capsys) -> None:
    assert main(["generate", str(RUN), "--prompt", "Once upon", "--max-new-tokens", "8"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("Once upon")
    sampled = []
    for _ in range(2):
        assert main(["generate", str(RUN), "--prompt", "Once upon", "--max-new-tokens", "8", "--temperature", "1.5", "--top-k", "50",
                     "--top-p", "0.95", "--seed", "7"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and len(sampled[0]) > len("Once upon\n")


def test_generate_takes_prompts_from_a_file(tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat\n\nA dog\n")
    assert main(["generate", str(RUN), "--prompts", str(prompts), "--max-new-tokens", "4", "--temperature", "1", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "--- prompt 1\nThe cat" in out and "--- prompt 2\nA dog" in out and "--- prompt 3" not in out


def test_generate_refuses_bad_input_in_one_line(tmp_path, capsys) -> None:
    hf = tiny("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    load_tokenizer(None).save_pretrained(tmp_path / "hf")  # 8192 tokens for a 128-token vocabulary
    cases = {
        str(tmp_path / "missing"): "no such run directory",
        str(tmp_path / "hf"): "more than the model's vocab_size of 128",
    }
    capsys.readouterr()
    for path, message in cases.items():
        assert main(["generate", path, "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["generate", str(RUN), "--prompt", "word " * 300]) == 2
    err = capsys.readouterr()
    assert "the model takes 1 to 16 (its context)" in err.err and err.out == ""


def test_the_trainer_prints_a_sample_every_sample_every_steps(tmp_path, capsys) -> None:
    arch = tmp_path / "micro.arch"
    arch.write_text(RUN_ARCH)
    assert main(["train", str(arch), "--out", str(tmp_path / "run"), "--steps", "2", "--sample-every", "1", "--batch-size", "2",
                 "--shuffle-buffer", "4", "--eval-tokens", "256", "--eval-every", "0", "--checkpoint-every", "0"]) == 0
    out = capsys.readouterr().out
    assert "sample at step 1:" in out and "sample at step 2:" in out


HYBRID = """vocab_size = 96
d_model = 32
n_heads = 4
n_kv_heads = 2
head_dim = 8
d_ff = 64
seq_len = 64
repeat 1 < sliding(6); global; sliding > ffn=moe(top=2, experts=4, d_ff=32)
"""


def test_the_inference_view_counts_what_a_real_prefill_and_decoding_step_compute() -> None:
    """FlopCounterMode counts the matmuls of a real prefill of C tokens and of the next token's step (it has no rule for
    CPU attention); the attention is added in closed form: each query scores the keys it sees, 2(d_k + d_v) FLOPs each."""
    compiled, context, window, heads, head_dim = nanollm.compile(HYBRID), 20, 6, 4, 8
    view = compiled.inference(context)
    decoder = Decoder(compiled.build().eval(), compiled.arch, context=64)
    states = decoder.states(1, 64)
    ids = torch.randint(0, 96, (1, context + 1))
    counted = []
    with torch.no_grad():
        for chunk, start in ((ids[:, :context], 0), (ids[:, context:], context)):
            with FlopCounterMode(display=False) as counter:
                decoder.step(chunk, start, states)
            counted.append(counter.get_total_flops())
    per_key = heads * 2 * 2 * head_dim

    def seen(position: int) -> list[int]:  # keys each layer's query at this position scores: sliding, global, sliding
        return [min(position + 1, window), position + 1, min(position + 1, window)]

    assert view.prefill_flops == counted[0] + per_key * sum(sum(seen(t)) for t in range(context))
    assert view.decode_flops_per_token == counted[1] + per_key * sum(seen(context))
    assert view.cache_bytes == 2 * 2 * 2 * head_dim * (window + context + window)  # bf16 keys and values of 2 KV heads


def test_compile_shows_the_inference_view_at_a_context(capsys) -> None:
    assert main(["compile", "archs/qwen3_0_6b.arch", "--context", "32k", "--json"]) == 0
    inference = json.loads(capsys.readouterr().out)["inference"]
    assert inference["context"] == 32768 and inference["cache_bytes"] == 114688 * 32768
    assert main(["compile", "archs/qwen3_0_6b.arch", "--context", "32k"]) == 0
    assert "decode FLOPs/token at context 32,768" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_an_export_is_the_native_transformers_model_with_the_same_logits_and_imports_back_bit_for_bit(family: str, tmp_path) -> None:
    hf = tiny(family, std=0.05)
    arch, ours = arch_from_config(hf.config), nanollm.from_hf(hf).eval()
    export(ours, arch, None, tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(theirs) is type(hf)
    ids = torch.randint(0, TINY["vocab_size"], (2, PROMPT + 8))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], rtol=0, atol=1e-5)
    back = nanollm.from_hf(tmp_path / "out").state_dict()
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in ours.state_dict().items())


def test_every_family_with_a_native_export_is_proven_by_the_export_test() -> None:
    exported = {model_type for model_type, adapter in ADAPTERS.items() if adapter.config_from_arch}
    assert exported == {FAMILIES[family][1].model_type for family in FAMILIES}


def test_a_recurrent_architecture_exports_natively_exactly_where_a_family_expresses_it() -> None:
    settings = HYBRID.split("repeat")[0]
    for extra, layers in RECURRENT_PATTERNS.values():  # KDA, Engram, hyper-connections, mixers no one family has together
        assert native_config(nanollm.compile(settings + extra + layers).arch) is None
    # written by hand, not imported: LFM2's short convolutions and attention, with nanollm's defaults (no conv bias, SwiGLU)
    config, adapter = native_config(nanollm.compile(settings + "shortconv(3); global; shortconv(3); shortconv(3)").arch)
    assert adapter is ADAPTERS["lfm2"] and config.layer_types == ["conv", "full_attention", "conv", "conv"] and config.conv_L_cache == 3


def test_export_writes_a_runs_model_and_tokenizer_and_refuses_an_existing_target(tmp_path, capsys) -> None:
    assert main(["export", str(RUN), "-o", str(tmp_path / "hf")]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out
    trained = load_trained(RUN)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "hf").encode("Once upon a time")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, trained.model(ids)[0], rtol=0, atol=1e-5)
    assert main(["export", str(RUN), "-o", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.strip().endswith("exists: export writes a new directory")
    # generate reads the exported directory as it reads the run
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "Once", "--max-new-tokens", "6"]) == 0
    from_export = capsys.readouterr().out
    assert main(["generate", str(RUN), "--prompt", "Once", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == from_export


def test_an_architecture_no_family_expresses_exports_as_nanollm_remote_code_that_generates(tmp_path) -> None:
    compiled = nanollm.compile(HYBRID.replace("ffn=moe(top=2, experts=4, d_ff=32)", "ffn=moe(top=2, experts=4, d_ff=32, shared=1)"))
    torch.manual_seed(0)
    ours = compiled.build().eval()
    export(ours, compiled.arch, None, tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "NanollmForCausalLM"
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], rtol=0, atol=1e-5)
        continued = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(continued[:, 10:], generated(Decoder(ours, compiled.arch, 64), ids, 8))
    back = theirs.model.state_dict()  # what transformers loaded from the export
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in ours.state_dict().items())
