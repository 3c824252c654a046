"""Masked-LM pretraining: BERT learns to restore masked tokens of English text.

The paper's third workload (arXiv 2002.11803, §4) is BERT pretraining. Model and objective
follow Devlin et al. 2019 ("BERT: Pre-training of Deep Bidirectional Transformers"): 15% of the
tokens are chosen for prediction, and of those 80% become [MASK], 10% a random token and 10%
stay as they are (`transformers.DataCollatorForLanguageModeling`). Text is cut into full-length
blocks `[CLS] ... [SEP]` as in transformers' `run_mlm.py` ("group texts"); the next-sentence
objective is left out, as RoBERTa (Liu et al. 2019) found it does not help.

`task.kind: causal_lm` trains the same BERT layers on the same blocks as a causal language
model instead (`transformers.BertLMHeadModel` with is_decoder): every next token is a target,
where masking makes 15 % of them one. The CPU text proxy (configs/task/pydoc_lm.yaml) uses it,
since at that scale the masked objective kept AdaGrad on the unigram plateau.

Sources (`task.data.source`):
    pydoc         the English documentation bundled with CPython (`pydoc_data.topics`: 79 topics,
                  ~65k words), so the CPU default needs no download.
    load_dataset  `datasets.load_dataset(path, name, data_files=..., split=...)`: a hub corpus
                  (English Wikipedia) or local files with path "text" / "parquet" / "json" /
                  "csv" and `data_files`.
    synthetic     `train_size` and `eval_size` blocks of random tokens (graft/tasks/synthetic.py):
                  BERT-shaped batches without text or hub, for throughput checks.
A document is a row of the dataset; in text files (path "text") it is a paragraph: the lines up
to a blank line, never across files (BERT's corpus format: one sentence per line, a blank line
between documents). Without an eval split, `eval_fraction` of the train documents is held out,
at least MIN_EVAL_DOCUMENTS of them (whole documents, so no block straddles the two sets),
chosen by `data.eval_seed`: the same for every trainer seed. Data too small to hold out that
many, or a held-out split of fewer than MIN_EVAL_BLOCKS blocks, is refused.

Hub data and tokenizers need the Hugging Face hub: when it does not answer within seconds (a
compute node) the build says so in one line and how to point at local files, rather than
retrying for most of a minute (HF_HUB_OFFLINE=1 skips the check and uses the local cache).

Tokenizer (`task.tokenizer`): `name` loads a pretrained one (hub name or local folder); null
trains a BERT WordPiece tokenizer on the train split and keeps it under `cache_dir/tokenizer/`,
which later builds (a resumed run, other ranks, other runs sharing the folder) load instead of
training again. With synthetic data, null makes a vocabulary of `vocab_size` placeholder tokens.

Evaluation masks are drawn once at build time from a fixed seed, so every evaluation of every
run scores the same masked positions; training masks are drawn per batch from torch's global RNG,
which the trainer seeds and checkpoints.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from functools import partial
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
    BertLMHeadModel,
    BertTokenizerFast,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
)

from graft.common.network import unreachable
from graft.tasks.base import DataError, Task
from graft.tasks.synthetic import SyntheticSet, check_size

SOURCES = ("pydoc", "load_dataset", "synthetic")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
IGNORE_INDEX = -100  # label of unmasked positions (what transformers' MLM loss skips)
LOCAL_BUILDERS = ("text", "parquet", "json", "csv", "arrow")  # data_files on this machine
MAP_BATCH = 1000  # documents per `datasets.map` batch; each batch drops its ragged tail
# A held-out split smaller than this scores a handful of masked tokens: its accuracy is noise.
MIN_EVAL_DOCUMENTS = 8  # the pydoc default holds out 8 of 79
MIN_EVAL_BLOCKS = 8  # >= ~150 masked tokens at seq_len 128
LOCAL_DATA = (
    "task.data.path=text task.data.data_files=[/data/a.txt,...] (or parquet/json/csv, "
    "or a dataset folder saved by datasets)"
)
LOCAL_TOKENIZER = (
    "task.tokenizer.name=/path/to/tokenizer (a folder saved by save_pretrained), or "
    "task.tokenizer.name=null to train WordPiece on the data"
)


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
    check_vocab_size(cfg["tokenizer"])
    check_hub(cfg)
    column = data.get("text_column") or "text"
    name = cfg["tokenizer"].get("name")
    tokenizer = load_pretrained(name) if name else None  # before the data: it may fail fast
    if data.get("source") == "synthetic":
        tokenizer = tokenizer or placeholder_tokenizer(int(cfg["tokenizer"]["vocab_size"]))
        train_blocks, eval_blocks = synthetic_blocks(data, tokenizer, seq_len)
    else:
        train_docs, eval_docs = load_documents(data)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg["tokenizer"], train_docs, column, Path(cache_dir))
        num_proc = data.get("num_proc")
        # The (small) eval split first: a refusal comes before the long train tokenization.
        eval_blocks = group_blocks(eval_docs, tokenizer, column, seq_len, "eval", num_proc)
        if not data.get("eval_split"):
            check_held_out(eval_blocks, len(eval_docs), len(eval_docs) + len(train_docs), data)
        train_blocks = group_blocks(train_docs, tokenizer, column, seq_len, "train", num_proc)
    if cfg["kind"] == "causal_lm":
        return causal_task(cfg, tokenizer, train_blocks, eval_blocks)
    probability = float(data.get("mlm_probability", 0.15))
    eval_set = mask_once(eval_blocks, tokenizer, probability, seed=int(data.get("eval_seed", 0)))

    model = BertForMaskedLM(
        BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg["model"])
    )
    return Task(
        name=cfg["name"],
        model=model,
        train_set=torch_items(train_blocks),
        eval_set=eval_set.with_format("torch"),
        # No seed: training masks come from the global RNG, which the trainer checkpoints.
        collate=DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability),
        loss=model_loss,
        eval_sums=mlm_eval_sums,
        eval_collate=default_collate,  # items are masked already; stack them
    )


def causal_task(
    cfg: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    train_blocks: datasets.Dataset,
    eval_blocks: datasets.Dataset,
) -> Task:
    """The same blocks as a causal language model: BERT's layers with a causal mask
    (`transformers.BertLMHeadModel`, is_decoder) predict every next token, so each block
    gives seq_len - 1 targets where masking gives 15 %."""
    model = BertLMHeadModel(
        BertConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            is_decoder=True,
            **cfg["model"],
        )
    )
    return Task(
        name=cfg["name"],
        model=model,
        train_set=torch_items(train_blocks),
        eval_set=eval_blocks.with_format("torch"),
        collate=next_token_batch,
        loss=model_loss,
        eval_sums=next_token_eval_sums,
    )


def torch_items(blocks: datasets.Dataset | SyntheticSet) -> Any:
    """Blocks whose items are tensors (a synthetic set's are already)."""
    return blocks if isinstance(blocks, SyntheticSet) else blocks.with_format("torch")


def next_token_batch(items: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stacked blocks, each its own labels (the model shifts them by one)."""
    input_ids = torch.stack([item["input_ids"] for item in items])
    return {"input_ids": input_ids, "labels": input_ids}


def next_token_eval_sums(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sums over every next-token prediction: cross entropy, correct ones, their number."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    return {
        "loss": F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"),
        "accuracy": (logits.argmax(dim=-1) == targets).sum(),
        "count": torch.tensor(targets.numel(), device=targets.device),
    }


def model_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The model's own loss: mean cross entropy over the batch's masked tokens, or over every
    next token for the causal model (which shifts the labels itself)."""
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


def check_vocab_size(tokenizer: Mapping[str, Any]) -> None:
    """A tokenizer trained here (name null) needs an integer vocabulary size."""
    size = tokenizer.get("vocab_size")
    if tokenizer.get("name") or (
        isinstance(size, int) and not isinstance(size, bool) and size > len(SPECIAL_TOKENS)
    ):
        return
    raise DataError(
        f"task.tokenizer.vocab_size={size!r}: with task.tokenizer.name=null a WordPiece "
        f"tokenizer is trained on the data, and its size must be an integer > "
        f"{len(SPECIAL_TOKENS)} (e.g. task.tokenizer.vocab_size=30522, BERT's)"
    )


def hub_offline() -> bool:
    """Whether the user told the Hugging Face libraries to use their local cache only."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(flag, "").upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def hub_needs(cfg: Mapping[str, Any]) -> list[str]:
    """The config values that name something on the hub rather than on this machine."""
    data, name = cfg["data"], cfg["tokenizer"].get("name")
    needs = []
    path = data.get("path")
    if data.get("source") == "load_dataset" and path and not is_local(path):
        needs.append(f"task.data.path={path}")
    if name and not is_local(name):
        needs.append(f"task.tokenizer.name={name}")
    return needs


def is_local(path: str) -> bool:
    return path in LOCAL_BUILDERS or Path(os.path.expanduser(path)).exists()


def check_hub(cfg: Mapping[str, Any]) -> None:
    """DataError within seconds when the config needs the hub and the hub does not answer."""
    needs = hub_needs(cfg)
    if not needs or hub_offline():
        return
    down = unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if down is None:
        return
    raise DataError(
        f"{' and '.join(needs)} need the Hugging Face hub, which is unreachable ({down}); "
        f"use local files: {LOCAL_DATA}, and {LOCAL_TOKENIZER} "
        "(or, if they are in the Hugging Face cache already, set HF_HUB_OFFLINE=1)"
    )


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
    # Text files: one document per paragraph (see the module docstring), not per line.
    options = {"sample_by": "paragraph"} if data["path"] == "text" else {}
    try:
        dataset = datasets.load_dataset(
            data["path"],
            data.get("name"),
            data_files=data.get("data_files"),
            split=split,
            **options,
        )
    except ValueError as error:
        if not str(error).startswith("Unknown split"):
            raise
        raise DataError(f"task.data.{key}: {error} (fix task.data.{key})") from None
    except (ConnectionError, FileNotFoundError) as error:  # not on the hub, nor in its cache
        raise DataError(
            f"task.data.path={data['path']}: {first_line(error)}; use local files: {LOCAL_DATA}"
        ) from None
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


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def hold_out(
    documents: datasets.Dataset, data: Mapping[str, Any]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split whole documents into (train, eval) by a permutation fixed by `data.eval_seed`:
    `eval_fraction` of them (rounded up), and at least MIN_EVAL_DOCUMENTS, held out."""
    fraction = float(data.get("eval_fraction", 0.1))
    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"task.data.eval_fraction {fraction} must lie in (0, 1), or set task.data.eval_split"
        )
    count = len(documents)
    held_out = max(math.ceil(fraction * count), MIN_EVAL_DOCUMENTS)
    if count - held_out < MIN_EVAL_DOCUMENTS:
        raise DataError(
            f"found {count} document(s); holding out {held_out} (task.data.eval_fraction="
            f"{fraction}, at least {MIN_EVAL_DOCUMENTS}) and training on at least "
            f"{MIN_EVAL_DOCUMENTS} needs {held_out + MIN_EVAL_DOCUMENTS}; add text (in text "
            "files a blank line ends a document), lower task.data.eval_fraction, or set "
            "task.data.eval_split"
        )
    split = documents.train_test_split(test_size=held_out, seed=int(data.get("eval_seed", 0)))
    return split["train"], split["test"]


def check_held_out(
    blocks: datasets.Dataset, documents: int, total: int, data: Mapping[str, Any]
) -> None:
    """DataError when the `documents` held out of `total` make fewer than MIN_EVAL_BLOCKS
    blocks; it suggests an eval_fraction that holds out enough (blocks grow about linearly
    with the documents, so half as many again as linearly needed)."""
    if len(blocks) >= MIN_EVAL_BLOCKS:
        return
    needed = 1.5 * MIN_EVAL_BLOCKS * documents / max(len(blocks), 1)
    suggested = min(0.5, needed / total)
    raise DataError(
        f"the {documents} held-out documents make {len(blocks)} block(s) of "
        f"{data['seq_len']} tokens, fewer than the {MIN_EVAL_BLOCKS} a meaningful evaluation "
        f"needs; raise task.data.eval_fraction (e.g. {suggested:.2g}), add text, or set "
        "task.data.eval_split"
    )


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
        return load_pretrained(cfg["name"])
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


def load_pretrained(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer `name` (a hub name or a local folder); DataError when it is neither."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:  # not a folder here, not on the hub, nor in its cache
        message = f"task.tokenizer.name={name}: {first_line(error)}; use {LOCAL_TOKENIZER}"
        raise DataError(message) from None


def text_batches(documents: datasets.Dataset, column: str) -> Iterator[list[str]]:
    for batch in documents.iter(batch_size=MAP_BATCH):
        yield batch[column]


def train_wordpiece(batches: Iterator[list[str]], vocab_size: int) -> PreTrainedTokenizerBase:
    """A BERT-style uncased WordPiece tokenizer trained on `batches` of text."""
    from tokenizers import models
    from tokenizers.trainers import WordPieceTrainer

    tokenizer = bert_pipeline(models.WordPiece(unk_token="[UNK]"))
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(batches, trainer=trainer)
    return bert_tokenizer(tokenizer)


def placeholder_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """BERT's special tokens and placeholder words `w5`, `w6`, ... up to `vocab_size` ids: a
    vocabulary for synthetic blocks, which have no text to train one on."""
    from tokenizers import models

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{index}": index for index in range(len(SPECIAL_TOKENS), vocab_size)})
    return bert_tokenizer(bert_pipeline(models.WordPiece(vocab, unk_token="[UNK]")))


def bert_pipeline(model: Any) -> Any:
    """A `tokenizers.Tokenizer` around the WordPiece `model` that splits text as BERT's uncased
    tokenizer does."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def bert_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    """The pipeline with BERT's `[CLS] A [SEP] B [SEP]` template, as a transformers tokenizer."""
    from tokenizers import processors

    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return BertTokenizerFast(tokenizer_object=tokenizer)


def synthetic_blocks(
    data: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> tuple[SyntheticSet, datasets.Dataset]:
    """`train_size` blocks drawn on demand and `eval_size` blocks held as a dataset (masked
    once, as real held-out blocks are): `[CLS] body [SEP]`, the body's tokens uniform over
    the vocabulary's non-special ones."""
    special = set(tokenizer.all_special_ids)
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    draw = partial(
        random_block,
        words=words,
        cls=tokenizer.cls_token_id,
        sep=tokenizer.sep_token_id,
        seq_len=seq_len,
    )
    train = SyntheticSet(check_size(data, "train_size"), "train", draw)
    eval_items = SyntheticSet(check_size(data, "eval_size"), "eval", draw)
    held_out = [eval_items[index]["input_ids"].tolist() for index in range(len(eval_items))]
    return train, datasets.Dataset.from_dict({"input_ids": held_out})


def random_block(
    generator: torch.Generator, *, words: Tensor, cls: int, sep: int, seq_len: int
) -> dict[str, Tensor]:
    body = words[torch.randint(len(words), (seq_len - 2,), generator=generator)]
    return {"input_ids": torch.cat([torch.tensor([cls]), body, torch.tensor([sep])])}


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
