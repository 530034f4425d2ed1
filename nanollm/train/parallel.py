"""How the model runs on the processes Accelerate launched: DDP or FSDP2, activation checkpointing, compile.

The model is the compiled fx GraphModule, whose graph calls each layer's modules (its residual sites' norms,
its sublayers' components) directly, so a layer's boundary is the set of modules under `layers.<i>`: FSDP2
shards each such set as one group (`fully_shard([...])`), and activation checkpointing wraps each sublayer's call. Under FSDP2 the
model stays on the meta device until it is sharded, and is given real weights a layer at a time, each layer
sharded as soon as it has them: no process ever holds more than one full layer besides the embedding, final
norm and head, whatever the model's size.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Iterator

import psutil
import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..compiler import layer_of, materialize_own
from ..components import Component, recomputing
from ..errors import LaunchError


def requested_processes() -> int | None:
    """The process count `accelerate launch` was asked for, read from our parent's command line (None if not launched so)."""
    try:
        argv = psutil.Process().parent().cmdline()
    except psutil.Error:
        return None
    start = None  # where the launcher's own arguments begin
    for i, word in enumerate(argv):
        name = os.path.basename(word)
        if name == "accelerate" and argv[i + 1: i + 2] == ["launch"]:
            start = i + 2
        elif name in ("accelerate-launch", "accelerate.commands.launch"):
            start = i + 1
        if start is not None:
            break
    if start is None:
        return None
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    args, _ = launch_command_parser().parse_known_args(argv[start:])
    if args.num_processes is not None:
        return args.num_processes
    try:
        return load_config_from_file(args.config_file).num_processes
    except (OSError, ValueError, TypeError):  # no default config, or one Accelerate cannot read
        return None


def check_launch(world_size: int) -> None:
    """LaunchError when the launcher was asked for several processes but started one (`accelerate launch --cpu` does)."""
    requested = requested_processes()
    if world_size == 1 and requested is not None and requested > 1:
        raise LaunchError(
            f"accelerate launch was asked for {requested} processes but started 1 (--cpu and MULTI_CPU/use_cpu configs "
            f"always start one); use `accelerate launch --multi_gpu --num_processes {requested} ...` or "
            f"runtime/accelerate/multi_gpu_ddp.yaml: nanollm runs on the CPU by itself when there is no GPU"
        )


def layer_groups(model: fx.GraphModule) -> list[list[nn.Module]]:
    """Each layer's modules as the graph calls them, in model order (e.g. [mixer_norm, mixer, ffn_norm, ffn])."""
    groups: dict[int, list[nn.Module]] = {}
    for node in model.graph.nodes:
        layer = layer_of(str(node.target)) if node.op == "call_module" else None
        if layer is not None:
            groups.setdefault(layer, []).append(model.get_submodule(node.target))
    return list(groups.values())


def shard(model: fx.GraphModule, device: torch.device, mixed_precision: bool) -> None:
    """FSDP2 over a meta-device model: materialise and shard one layer group at a time, then the root.

    Modules are materialised in `modules()` order, so the weights equal those of `Compiled.build` for the same seed.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    # FSDP2 warns that an in-place op on a view a layer returns would skip its hooks: the lowered graph only ever
    # adds layer outputs out of place, so the warning never applies here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    modules = list(model.modules())
    position = {id(module): i for i, module in enumerate(modules)}
    group_ends = {max(position[id(sub)] for module in group for sub in module.modules()): group for group in layer_groups(model)}
    for i, module in enumerate(modules):
        materialize_own(module, device, torch.float32)
        if i in group_ends:
            fully_shard(group_ends[i], mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the embedding, final norm and head


def checkpointed(forward: Any, *args: Any) -> Any:
    """Run `forward` saving only its inputs; its activations are recomputed in the backward pass."""
    if torch.compiler.is_compiling():  # compiled graphs do not replay buffer updates, and take no context_fn
        return checkpoint(forward, *args, use_reentrant=False)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recomputing()))


def checkpoint_activations(model: fx.GraphModule) -> None:
    """Activation checkpointing of every sublayer's component (its inputs are kept, its insides recomputed)."""
    for module in model.modules():
        if isinstance(module, Component):
            module.forward = functools.partial(checkpointed, module.forward)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over processes in this backward pass only if `enabled` (off for all but the last micro-batch)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield
