"""Masked-LM pretraining: BERT learns to restore masked tokens of English text.

The paper's third workload (arXiv 2002.11803, §4) is BERT pretraining. Model and objective
follow Devlin et al. 2019 ("BERT: Pre-training of Deep Bidirectional Transformers"): 15% of the
tokens are chosen for prediction, and of those 80% become [MASK], 10% a random token and 10%
stay as they are (`transformers.DataCollatorForLanguageModeling`). Text is cut into full-length
blocks `[CLS] ... [SEP]` as in transformers' `run_mlm.py` ("group texts"); the next-sentence
objective is left out, as RoBERTa (Liu et al. 2019) found it does not help.

Sources (`task.data.source`):
    pydoc         the English documentation bundled with CPython (`pydoc_data.topics`: 79 topics,
                  ~65k words), so the CPU default needs no download.
    load_dataset  `datasets.load_dataset(path, name, data_files=..., split=...)`: a hub corpus
                  (English Wikipedia) or local files with path "text" / "parquet" / "json" /
                  "csv" and `data_files`.
Without an eval split, `eval_fraction` of the train *documents* is held out (whole documents, so
no block straddles the two sets), chosen by `data.eval_seed`: the same for every trainer seed.

Tokenizer (`task.tokenizer`): `name` loads a pretrained one (hub name or local folder); null
trains a BERT WordPiece tokenizer on the train split and keeps it under `cache_dir/tokenizer/`,
which later builds (a resumed run, other ranks, other runs sharing the folder) load instead of
training again.

Evaluation masks are drawn once at build time from a fixed seed, so every evaluation of every
run scores the same masked positions; training masks are drawn per batch from torch's global RNG,
which the trainer seeds and checkpoints.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
)

from graft.tasks.base import DataError, Task

SOURCES = ("pydoc", "load_dataset")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
IGNORE_INDEX = -100  # label of unmasked positions (what transformers' MLM loss skips)
LOCAL_BUILDERS = ("text", "parquet", "json", "csv", "arrow")  # data_files on this machine
MAP_BATCH = 1000  # documents per `datasets.map` batch; each batch drops its ragged tail


def build(cfg: Mapping[str, Any], *, seed: int, cache_dir: Path) -> Task:
    """The masked-LM task described by the resolved `task` config.

    Call after seeding torch: only the model's initialisation draws from the global RNG. The
    held-out documents and the eval masks depend on `task.data.eval_seed`, not on `seed`, so
    every seed of a grid is scored on the same masked tokens.
    """
    del seed  # the split and eval masks are shared by all seeds; init uses the global RNG
    data = cfg["data"]
    seq_len = int(data["seq_len"])
    max_positions = cfg["model"].get(
        "max_position_embeddings", BertConfig().max_position_embeddings
    )
    if not 3 <= seq_len <= max_positions:
        raise DataError(
            f"task.data.seq_len {seq_len} must lie in [3, {max_positions}] "
            "(task.model.max_position_embeddings); fix task.data.seq_len"
        )
    column = data.get("text_column") or "text"
    train_docs, eval_docs = load_documents(data)
    tokenizer = load_tokenizer(cfg["tokenizer"], train_docs, column, Path(cache_dir))
    num_proc = data.get("num_proc")
    train_blocks = group_blocks(train_docs, tokenizer, column, seq_len, "train", num_proc)
    eval_blocks = group_blocks(eval_docs, tokenizer, column, seq_len, "eval", num_proc)
    probability = float(data.get("mlm_probability", 0.15))
    eval_set = mask_once(eval_blocks, tokenizer, probability, seed=int(data.get("eval_seed", 0)))

    model = BertForMaskedLM(
        BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg["model"])
    )
    return Task(
        name=cfg["name"],
        model=model,
        train_set=train_blocks.with_format("torch"),
        eval_set=eval_set.with_format("torch"),
        # No seed: training masks come from the global RNG, which the trainer checkpoints.
        collate=DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability),
        loss=mlm_loss,
        eval_sums=mlm_eval_sums,
        eval_collate=default_collate,  # items are masked already; stack them
    )


def mlm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean cross entropy over the batch's masked tokens."""
    return model(**batch).loss


def mlm_eval_sums(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sums over masked tokens: cross entropy, correct predictions, and their number ("count")."""
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    masked = labels != IGNORE_INDEX
    logits, targets = logits[masked].float(), labels[masked]  # fp32: bf16 logits lose the loss
    return {
        "loss": F.cross_entropy(logits, targets, reduction="sum"),
        "accuracy": (logits.argmax(dim=-1) == targets).sum(),
        "count": masked.sum(),
    }


def load_documents(data: Mapping[str, Any]) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) documents, each a Dataset with the one column `data.text_column`."""
    source = data.get("source")
    column = data.get("text_column") or "text"
    if source == "pydoc":
        from pydoc_data.topics import topics

        train = datasets.Dataset.from_dict({column: [topics[key] for key in sorted(topics)]})
        return hold_out(train, data)
    if source != "load_dataset":
        raise DataError(
            f"unknown task.data.source {source!r}; allowed: {', '.join(SOURCES)} "
            "(fix task.data.source)"
        )
    if data.get("path") in LOCAL_BUILDERS:
        check_data_files(data.get("data_files"))
    train = load_split(data, "train_split")
    if data.get("eval_split"):
        return train, load_split(data, "eval_split")
    return hold_out(train, data)


def load_split(data: Mapping[str, Any], key: str) -> datasets.Dataset:
    """The split named by `data[key]` of `datasets.load_dataset`, reduced to the text column."""
    column = data.get("text_column") or "text"
    split = data.get(key) or "train"
    try:
        dataset = datasets.load_dataset(
            data["path"], data.get("name"), data_files=data.get("data_files"), split=split
        )
    except ValueError as error:
        if not str(error).startswith("Unknown split"):
            raise
        raise DataError(f"task.data.{key}: {error} (fix task.data.{key})") from None
    if column not in dataset.column_names:
        raise DataError(
            f"task.data.text_column {column!r} is not a column of {data['path']!r} "
            f"split {split!r}; columns: {', '.join(dataset.column_names)} "
            "(fix task.data.text_column)"
        )
    return dataset.select_columns([column])


def check_data_files(data_files: str | list[str] | Mapping[str, Any] | None) -> None:
    """Every file or pattern in `data.data_files` matches a file here (URLs are left alone)."""
    if data_files is None:
        return
    if isinstance(data_files, Mapping):
        patterns = list(chain.from_iterable(as_list(files) for files in data_files.values()))
    else:
        patterns = as_list(data_files)
    for pattern in patterns:
        if "://" in pattern or glob.glob(os.path.expanduser(pattern)):
            continue
        raise DataError(
            f"task.data.data_files {pattern!r} matches no file; expected existing local files "
            "(fix task.data.data_files)"
        )


def as_list(files: str | list[str]) -> list[str]:
    return [files] if isinstance(files, str) else [str(file) for file in files]


def hold_out(
    documents: datasets.Dataset, data: Mapping[str, Any]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split whole documents into (train, eval) by a permutation fixed by `data.eval_seed`."""
    fraction = float(data.get("eval_fraction", 0.1))
    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"task.data.eval_fraction {fraction} must lie in (0, 1), or set task.data.eval_split"
        )
    if len(documents) < 2:
        raise DataError(
            f"found {len(documents)} document(s); holding out task.data.eval_fraction needs at "
            "least 2 (add text to task.data.data_files or set task.data.eval_split)"
        )
    split = documents.train_test_split(test_size=fraction, seed=int(data.get("eval_seed", 0)))
    return split["train"], split["test"]


def load_tokenizer(
    cfg: Mapping[str, Any], documents: datasets.Dataset, column: str, cache_dir: Path
) -> PreTrainedTokenizerBase:
    """`tokenizer.name` from the hub or a folder; else a WordPiece tokenizer trained once.

    Training is not deterministic (the `tokenizers` trainer breaks ties between equally frequent
    pairs in hash-map order), so a trained tokenizer is saved, atomically, to
    `cache_dir/tokenizer/<key>` and every build loads the saved copy: a resumed run, every rank of
    a distributed one, and every run that shares `cache_dir`. The key is the train documents'
    `datasets` fingerprint and the vocabulary size, so a changed corpus trains a new one.
    """
    if cfg.get("name"):
        return AutoTokenizer.from_pretrained(cfg["name"])
    vocab_size = int(cfg["vocab_size"])
    # `_fingerprint`: datasets' hash of the documents and how they were made (no public name)
    saved = cache_dir / "tokenizer" / f"{documents._fingerprint}-{vocab_size}"
    if not saved.exists():
        saved.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = train_wordpiece(text_batches(documents, column), vocab_size)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=saved.parent))
        try:
            tokenizer.save_pretrained(scratch)
            scratch.rename(saved)  # atomic: no build ever loads a half-written folder
        except OSError:  # another process saved its tokenizer first: use that one
            if not saved.exists():
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return AutoTokenizer.from_pretrained(saved)


def text_batches(documents: datasets.Dataset, column: str) -> Iterator[list[str]]:
    for batch in documents.iter(batch_size=MAP_BATCH):
        yield batch[column]


def train_wordpiece(batches: Iterator[list[str]], vocab_size: int) -> PreTrainedTokenizerBase:
    """A BERT-style uncased WordPiece tokenizer trained on `batches` of text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(batches, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return BertTokenizerFast(tokenizer_object=tokenizer)


def group_blocks(
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    column: str,
    seq_len: int,
    split: str,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Blocks of `seq_len` token ids, `[CLS] body [SEP]`, cut from the concatenated documents."""
    blocks = documents.map(
        tokenize_and_group,
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=documents.column_names,
        num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "column": column, "seq_len": seq_len},
        desc=f"{split} blocks of {seq_len} tokens",
    )
    if len(blocks) == 0:
        found = sum(len(ids) for ids in tokenize(list(documents[column]), tokenizer))
        raise DataError(
            f"the {split} split has {found} tokens, fewer than the {seq_len - 2} one block needs "
            "(add text to the corpus, raise task.data.eval_fraction, or lower task.data.seq_len)"
        )
    return blocks


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    # verbose=False: whole documents outrun model_max_length by design; blocks are cut later.
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return encoded["input_ids"]


def tokenize_and_group(
    batch: Mapping[str, list], tokenizer: PreTrainedTokenizerBase, column: str, seq_len: int
) -> dict[str, list[list[int]]]:
    """`datasets.map` body: one batch of documents -> its full blocks (the tail is dropped)."""
    tokens = list(chain.from_iterable(tokenize(batch[column], tokenizer)))
    body = seq_len - 2  # room for [CLS] and [SEP]
    end = len(tokens) // body * body
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return {"input_ids": [[cls, *tokens[i : i + body], sep] for i in range(0, end, body)]}


def mask_once(
    blocks: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, probability: float, *, seed: int
) -> datasets.Dataset:
    """`blocks` with masked `input_ids` and their `labels`, drawn from `seed` alone.

    Each map batch is masked from its own seed (`seed` plus the batch's first index), so the
    masks do not depend on the processing order, and torch's global RNG is left as it was.
    """
    return blocks.map(
        mask_batch,
        batched=True,
        batch_size=MAP_BATCH,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "probability": probability, "seed": seed},
        desc="eval masks",
    )


def mask_batch(
    batch: Mapping[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    probability: float,
    seed: int,
) -> dict[str, list[list[int]]]:
    # fork_rng rather than the collator's own seed= (which refuses processes not named
    # MainProcess, e.g. some launchers' workers); the global RNG is restored on exit.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + indices[0])
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
        masked = collator([torch.tensor(ids) for ids in batch["input_ids"]])
    return {"input_ids": masked["input_ids"].tolist(), "labels": masked["labels"].tolist()}
