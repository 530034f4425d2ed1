"""Evaluation with EleutherAI's lm-evaluation-harness (`pip install -e '.[eval]'`): a nanollm model as an lm-eval `LM`.

`NanollmLM` scores log-likelihoods with the model's full forward pass (one sequence at a time, truncated on the
left to the model's context) and generates with its decoding form (decode.py), greedily, until a stop string.
`run_lm_eval` runs named tasks (lm-eval's own, or YAML task files in `include` directories) on a run, a
checkpoint or a transformers model directory, and writes the scores beside the model (`lm_eval.json`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .decode import Decoder
from .errors import NanollmError
from .trained import Trained, load_trained

try:
    from lm_eval.api.model import LM
except ImportError:  # the optional [eval] group is not installed: run_lm_eval says so
    LM = object


class NanollmLM(LM):
    """lm-eval's model interface over a nanollm model and its tokenizer."""

    def __init__(self, trained: Trained) -> None:
        super().__init__()
        self.trained, self.tokenizer = trained, trained.tokenizer
        self.decoder = Decoder(trained.model, trained.arch, trained.context)
        self.prefix = self.tokenizer.eos_token_id  # what an empty context conditions on: a document's start

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of `continuation` after `context`, and whether greedy decoding would produce it."""
        tokens = (context + continuation)[-(self.trained.context + 1):]
        logits, _ = self.trained.model(torch.tensor([tokens[:-1]]))
        logprobs = logits[0, -len(continuation):].log_softmax(dim=-1)
        wanted = torch.tensor(continuation)
        return float(logprobs.gather(-1, wanted[:, None]).sum()), bool((logprobs.argmax(dim=-1) == wanted).all())

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            whole, start = self.encode(context + continuation), self.encode(context)
            if not start:  # nothing to condition on: the document's start
                start, whole = [self.prefix], [self.prefix, *whole]
            results.append(self.score(whole[:len(start)], whole[len(start):]))
        return results

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for request in requests:
            windows = get_rolling_token_windows(self.encode(request.args[0]), self.prefix, self.trained.context, 1)
            results.append(sum(self.score(*make_disjoint_window(window))[0] for window in windows))
        return results

    @torch.no_grad()
    def generate_until(self, requests: list[Any]) -> list[str]:
        results = []
        for request in requests:
            context, options = request.args
            until = options.get("until") or [self.tokenizer.decode([self.prefix])]
            until = [until] if isinstance(until, str) else until
            prompt = torch.tensor([(self.encode(context) or [self.prefix])[-self.trained.context:]])
            tokens: list[int] = []
            text = ""
            for token in self.decoder.generate(prompt, int(options.get("max_gen_toks", 256)), eos=self.tokenizer.eos_token_id):
                if int(token[0]) == self.tokenizer.eos_token_id:
                    break
                tokens.append(int(token[0]))
                text = self.tokenizer.decode(tokens)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results


def run_lm_eval(path: str | Path, tasks: list[str], include: list[str] | None = None, limit: int | None = None) -> tuple[dict[str, Any], Path]:
    """lm-eval's results of tasks on a model, written to `lm_eval.json` in its run (or model) directory; (results, that file)."""
    try:
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise NanollmError("lm-eval is not installed: pip install -e '.[eval]'") from None
    trained = load_trained(path)
    # Indexing lm-eval's own thousands of task files takes most of a minute: only when the given ones lack a task.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(not manager.match_tasks([name]) for name in tasks):
        manager = TaskManager(include_path=include)
    unknown = [name for name in tasks if not manager.match_tasks([name])]
    if unknown:
        raise NanollmError(f"lm-eval knows no task {', '.join(unknown)} (give task files with --include DIR)")
    output = evaluator.simple_evaluate(model=NanollmLM(trained), tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0,
                                       log_samples=False)
    results = {"model": str(trained.checkpoint or path), "tasks": tasks, "limit": limit, "results": output["results"],
               "versions": output.get("versions", {}), "n-samples": output.get("n-samples", {})}
    file = (trained.run_dir or Path(path)) / "lm_eval.json"
    file.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return results, file
