"""`nanollm tokenize` and `--data DIR`: a corpus tokenised once gives the rows and the evaluation set of on-the-fly
tokenisation, in any process's share, across epochs and resumes, for local datasets and the embedded corpus."""
from __future__ import annotations

import json

import pytest
import torch

import nanollm.train.data as data_module
from nanollm.cli import main
from nanollm.errors import DataError
from nanollm.train.data import TrainingRows, heldout_rows, open_source
from nanollm.train.tokens import TokenFolder, TokenRows, tokenize_corpus
from test_data import CharTokenizer
from test_train import FAST, metrics, train


class SizedCharTokenizer(CharTokenizer):
    def __len__(self) -> int:
        return 0x110000 + 1


def corpus(tmp_path, count: int = 60):
    path = tmp_path / "corpus.jsonl"
    lines = [{"text": f"document {i}: " + "abcdefghij"[: i % 10 + 1] * (i % 7 + 1)} for i in range(count)]
    lines[7] = lines[3] = {"text": "a held-out twin?"}  # a repeated document
    lines[11] = {"text": ""}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("embedded", [False, True], ids=["jsonl", "embedded-corpus-reshuffled-each-epoch"])
def test_tokenised_rows_are_the_rows_tokenised_on_the_fly(tmp_path, monkeypatch, embedded):
    """Over several epochs, through the shuffle buffer, in whole batches and in each process's share of them, and
    resumed from a JSON position; the evaluation set too."""
    if embedded:  # the standard library's first files stand in for all of it
        files = data_module.stdlib_files()[:30]
        monkeypatch.setattr(data_module, "stdlib_files", lambda: files)
    data = None if embedded else corpus(tmp_path)
    tokenizer, seq_len, share = SizedCharTokenizer(), 31, 0.2
    manifest = tokenize_corpus(data, tmp_path / "tokens", tokenizer, "chars", eval_share=share, shard_tokens=500)
    assert len(manifest["shards"]["train"]) > 1 and manifest["documents"]["heldout"] > 0
    folder = TokenFolder(str(tmp_path / "tokens"), tokenizer, "chars", share)

    def on_the_fly() -> TrainingRows:
        return TrainingRows(open_source(data, None, "train", "text", seed=5), tokenizer, seq_len, share, shuffle_buffer=4, seed=5)

    def tokenised() -> TokenRows:
        return TokenRows(folder, seq_len, shuffle_buffer=4, seed=5)

    count = (manifest["tokens"]["train"] // seq_len) * 3 // 8  # three epochs in eight batches
    reference = on_the_fly()
    batches = [reference.next_rows(count) for _ in range(8)]
    shares = [tokenised() for _ in range(3)]
    for batch in batches[:3]:  # three processes each read their third of each batch, and only it
        parts = [share.next_rows(count, keep=slice(k * count // 3, (k + 1) * count // 3)) for k, share in enumerate(shares)]
        assert torch.equal(torch.cat(parts), batch)
    rows = tokenised()
    assert torch.equal(rows.next_rows(count), batches[0])
    state = json.loads(json.dumps(rows.state_dict()))
    resumed = tokenised()
    resumed.load_state_dict(state)
    for batch in batches[1:]:
        assert torch.equal(resumed.next_rows(count), batch)
    assert resumed.documents.source.epoch >= 2
    on_the_fly_set = heldout_rows(open_source(data, None, "train", "text", seed=None), tokenizer, seq_len, share, 200, 50)
    assert torch.equal(folder.heldout_rows(seq_len, 200, 50), on_the_fly_set)


def test_a_tokenised_corpus_is_checked_against_the_run(tmp_path):
    tokenizer = SizedCharTokenizer()
    tokenize_corpus(corpus(tmp_path), tmp_path / "tokens", tokenizer, "chars", eval_share=0.2)
    with pytest.raises(DataError, match="train with --tokenizer chars"):
        TokenFolder(str(tmp_path / "tokens"), tokenizer, None, 0.2)
    with pytest.raises(DataError, match="train with --eval-share 0.2"):
        TokenFolder(str(tmp_path / "tokens"), tokenizer, "chars", 0.02)
    with pytest.raises(DataError, match="already exists"):
        tokenize_corpus(corpus(tmp_path), tmp_path / "tokens", tokenizer, "chars")


def test_training_from_a_tokenised_folder_is_training_on_the_fly(tmp_path):
    """`nanollm tokenize` then `nanollm train --data DIR`: the same losses and held-out set as from the corpus itself."""
    from test_train import MICRO

    arch = tmp_path / "micro.arch"
    arch.write_text(MICRO)
    source = corpus(tmp_path, count=400)
    assert main(["tokenize", source, "-o", str(tmp_path / "tokens"), "--eval-share", "0.1"]) == 0
    manifest = json.loads((tmp_path / "tokens" / "tokens.json").read_text())
    assert (manifest["tokenizer"], manifest["source"]["data"], manifest["source_documents"]) == ("embedded", source, 400)
    assert manifest["documents"]["train"] + manifest["documents"]["heldout"] in (398, 399)  # less the empty one (and a held-out twin)
    common = ["--steps", 2, "--log-every", 1, *FAST, "--eval-share", 0.1, "--seq-len", 32]
    assert train(arch, "--out", tmp_path / "fly", "--data", source, *common) == 0
    assert train(arch, "--out", tmp_path / "tokenised", "--data", tmp_path / "tokens", *common) == 0
    fly, tokenised = metrics(tmp_path / "fly"), metrics(tmp_path / "tokenised")
    assert [{**line, "tokens_per_s": 0} for line in fly] == [{**line, "tokens_per_s": 0} for line in tokenised]
    fingerprints = [json.loads((tmp_path / run / "manifest.json").read_text())["data"]["held_out_fingerprint"] for run in ("fly", "tokenised")]
    assert fingerprints[0] == fingerprints[1]
