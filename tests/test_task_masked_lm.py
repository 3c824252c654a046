"""The masked-LM task on real text that needs no download: CPython's bundled documentation, and
small text and parquet files written here and read through the real `datasets.load_dataset`."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from pydoc_data.topics import topics

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import BertForMaskedLM

from graft import Graft
from graft.tasks import DataError, build_task, masked_lm
from graft.tasks.masked_lm import IGNORE_INDEX, build, load_documents

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEQ_LEN = 32
TINY = {
    "name": "mlm_test",
    "kind": "masked_lm",
    "model": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    "tokenizer": {"name": None, "vocab_size": 600},
    "data": {"source": "pydoc", "eval_fraction": 0.1, "seq_len": SEQ_LEN, "mlm_probability": 0.15},
}


def config(**data) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["data"].update(data)
    return cfg


def english_lines() -> list[str]:
    """Distinct lines of CPython's documentation (varied, real English), in a fixed order."""
    lines = (line.strip() for key in sorted(topics) for line in topics[key].splitlines())
    return list(dict.fromkeys(line for line in lines if len(line.split()) >= 6))


def write_text(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def originals(item: dict) -> torch.Tensor:
    """The eval block before masking: labels hold the original ids of the masked positions."""
    return torch.where(item["labels"] != IGNORE_INDEX, item["labels"], item["input_ids"])


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset keeps what it reads in a cache: the test's folder, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.fixture(scope="module")
def pydoc_task(module_tmp):
    torch.manual_seed(0)
    return build(config(), seed=0, cache_dir=module_tmp)


@pytest.mark.slow
def test_pydoc_default_builds_full_bert_blocks(pydoc_task):
    task, tokenizer = pydoc_task, pydoc_task.collate.tokenizer
    assert isinstance(task.model, BertForMaskedLM)
    assert task.model.config.vocab_size == len(tokenizer) <= 600
    assert task.model.config.pad_token_id == tokenizer.pad_token_id
    train = torch.stack([item["input_ids"] for item in task.train_set])
    assert train.dtype == torch.int64 and train.shape == (len(task.train_set), SEQ_LEN)
    assert (train[:, 0] == tokenizer.cls_token_id).all()
    assert (train[:, -1] == tokenizer.sep_token_id).all()
    special = torch.tensor(tokenizer.all_special_ids)
    assert not torch.isin(train[:, 1:-1], special).any()  # no padding inside: blocks are full
    assert len(task.train_set) > 5 * len(task.eval_set) > 0

    batch = task.collate([task.train_set[i] for i in range(8)])
    assert batch["input_ids"].shape == batch["labels"].shape == (8, SEQ_LEN)
    loss = task.loss(task.model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)

    eval_batch = task.eval_collate([task.eval_set[i] for i in range(8)])
    assert set(eval_batch) == {"input_ids", "labels"}
    assert eval_batch["input_ids"].shape == (8, SEQ_LEN)
    with torch.no_grad():
        sums = task.eval_sums(task.model.eval(), eval_batch)
        mean = task.loss(task.model, eval_batch)
    assert set(sums) == {"loss", "accuracy", "count"}
    assert int(sums["count"]) == int((eval_batch["labels"] != IGNORE_INDEX).sum())
    assert 0 <= int(sums["accuracy"]) <= int(sums["count"])
    # the sum per masked token is the model's own mean loss
    assert float(sums["loss"]) / int(sums["count"]) == pytest.approx(float(mean), rel=1e-5)


@pytest.mark.slow
def test_eval_masks_follow_the_bert_recipe(pydoc_task):
    tokenizer = pydoc_task.collate.tokenizer
    items = list(pydoc_task.eval_set)
    labels = torch.stack([item["labels"] for item in items])
    inputs = torch.stack([item["input_ids"] for item in items])
    original = torch.stack([originals(item) for item in items])
    masked = labels != IGNORE_INDEX
    assert not masked[:, [0, -1]].any()  # [CLS] and [SEP] are never predicted
    assert masked[:, 1:-1].float().mean() == pytest.approx(0.15, abs=0.02)
    # Devlin et al. 2019: of the chosen tokens 80% become [MASK], 10% random, 10% unchanged
    assert (inputs[masked] == tokenizer.mask_token_id).float().mean() == pytest.approx(
        0.8, abs=0.04
    )
    assert (inputs[masked] == original[masked]).float().mean() == pytest.approx(0.1, abs=0.04)
    assert (inputs[~masked] == original[~masked]).all()

    blocks = datasets.Dataset.from_dict({"input_ids": original.tolist()})
    before = torch.random.get_rng_state()
    again = masked_lm.mask_once(blocks, tokenizer, 0.15, seed=0)
    assert torch.equal(before, torch.random.get_rng_state())  # drawn from a fixed seed alone
    assert list(again["labels"]) == labels.tolist()
    assert list(again["input_ids"]) == inputs.tolist()


@pytest.mark.slow
def test_eval_masks_are_fixed_and_build_draws_only_the_model_init(tmp_path):
    torch.manual_seed(0)
    first = build(config(), seed=0, cache_dir=tmp_path)
    after_build = torch.random.get_rng_state()
    torch.manual_seed(0)
    BertForMaskedLM(first.model.config)
    assert torch.equal(after_build, torch.random.get_rng_state())

    torch.manual_seed(1)  # another seed of the same grid
    second = build(config(), seed=1, cache_dir=tmp_path)
    for a, b in zip(first.eval_set, second.eval_set):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert len(first.eval_set) == len(second.eval_set)
    weights = [
        model.bert.embeddings.word_embeddings.weight for model in (first.model, second.model)
    ]
    assert not torch.equal(*weights)  # the seed still draws the initialisation


@pytest.mark.slow
def test_trained_tokenizer_is_saved_and_reused(tmp_path, monkeypatch):
    cache_dir = tmp_path / "runs" / "cache"  # does not exist yet
    first = build(config(), seed=0, cache_dir=cache_dir)
    [saved] = (cache_dir / "tokenizer").iterdir()
    assert (saved / "tokenizer.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the saved tokenizer should have been loaded")

    monkeypatch.setattr(masked_lm, "train_wordpiece", no_training)
    second = build(config(), seed=0, cache_dir=cache_dir)
    assert second.collate.tokenizer.get_vocab() == first.collate.tokenizer.get_vocab()
    # a different vocabulary size is a different tokenizer: it trains (here: refuses to)
    with pytest.raises(AssertionError, match="should have been loaded"):
        build(
            {**config(), "tokenizer": {"name": None, "vocab_size": 500}},
            seed=0,
            cache_dir=cache_dir,
        )


def test_text_files_with_an_eval_split(tmp_path):
    lines = english_lines()
    files = {
        "train": write_text(tmp_path / "train.txt", lines[:400]),
        "validation": write_text(tmp_path / "valid.txt", lines[400:500]),
    }
    cfg = config(source="load_dataset", path="text", data_files=files, eval_split="validation")
    task = build_task(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert len(task.train_set) > 50 and len(task.eval_set) > 10
    assert task.train_set[0]["input_ids"].shape == (SEQ_LEN,)
    assert task.eval_set[0]["labels"].shape == (SEQ_LEN,)


def test_parquet_holds_out_whole_documents_the_same_for_every_seed(tmp_path):
    lines = english_lines()[:300]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"title": [f"doc {i}" for i in range(300)], "body": lines}), path)
    data = config(
        source="load_dataset",
        path="parquet",
        data_files=str(path),
        text_column="body",
        eval_fraction=0.2,
    )["data"]
    train, held_out = load_documents(data)
    assert train.column_names == held_out.column_names == ["body"]
    assert len(held_out) == 60 and len(train) == 240
    train_docs, held_out_docs = list(train["body"]), list(held_out["body"])
    assert set(train_docs).isdisjoint(held_out_docs)  # split by documents
    assert sorted(train_docs + held_out_docs) == sorted(lines)
    assert list(load_documents(data)[1]["body"]) == held_out_docs  # not the trainer's seed
    assert list(load_documents({**data, "eval_seed": 1})[1]["body"]) != held_out_docs

    cfg = config(**data)
    task = build(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert len(task.train_set) > len(task.eval_set) > 0


def test_a_few_graft_steps_lower_the_loss_on_a_fixed_batch(pydoc_task):
    torch.manual_seed(0)
    model = BertForMaskedLM(pydoc_task.model.config)
    batch = pydoc_task.collate([pydoc_task.train_set[i] for i in range(16)])
    optimizer = Graft(
        model.parameters(),
        {"name": "adam", "lr": 1e-2},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    )
    losses = []
    for _ in range(10):
        loss = pydoc_task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def bad_input(cfg: dict, tmp_path: Path) -> str:
    with pytest.raises(DataError) as error:
        build(cfg, seed=0, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_source_names_the_key_and_the_choices(tmp_path):
    message = bad_input(config(source="wikipedia"), tmp_path)
    assert "'wikipedia'" in message and "pydoc, load_dataset" in message
    assert "task.data.source" in message


def test_missing_data_files_are_named(tmp_path):
    missing = str(tmp_path / "nowhere" / "train.txt")
    message = bad_input(config(source="load_dataset", path="text", data_files=[missing]), tmp_path)
    assert missing in message and "task.data.data_files" in message


def test_unknown_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"title": ["a", "b"], "body": ["some text", "more text"]}), path)
    cfg = config(source="load_dataset", path="parquet", data_files=str(path), text_column="text")
    message = bad_input(cfg, tmp_path)
    assert "'text'" in message and "title, body" in message and "task.data.text_column" in message


@pytest.mark.parametrize("split", ["train", "eval"])
def test_too_little_text_for_a_block_says_how_much(tmp_path, split):
    lines = english_lines()
    short = ["Too short."]
    files = {
        "train": write_text(tmp_path / "train.txt", short if split == "train" else lines[:200]),
        "validation": write_text(tmp_path / "valid.txt", short if split == "eval" else lines[:50]),
    }
    cfg = config(source="load_dataset", path="text", data_files=files, eval_split="validation")
    message = bad_input(cfg, tmp_path)
    found = re.search(rf"the {split} split has (\d+) tokens", message)
    assert found and 0 < int(found[1]) < SEQ_LEN - 2  # a few word pieces of "too short."
    assert f"the {SEQ_LEN - 2} one block needs" in message and "task.data.seq_len" in message


def test_unknown_split_names_the_key(tmp_path):
    files = {"train": write_text(tmp_path / "train.txt", english_lines()[:50])}
    cfg = config(source="load_dataset", path="text", data_files=files, eval_split="valid")
    message = bad_input(cfg, tmp_path)
    assert "'valid'" in message.replace('"', "'") and "task.data.eval_split" in message


def test_bad_seq_len_and_eval_fraction_name_their_keys(tmp_path):
    assert "task.data.seq_len" in bad_input(config(seq_len=65), tmp_path)
    assert "task.data.eval_fraction" in bad_input(config(eval_fraction=1.0), tmp_path)


def composed(task: str) -> dict:
    # Without return_hydra_config the hydra node (and its `cell` resolver) stays out.
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", "logger=none"])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.slow
def test_tiny_bert_config_composes_and_builds(tmp_path):
    cfg = composed("tiny_bert")
    assert cfg["schedule"]["name"] == "linear"
    assert cfg["trainer"]["max_steps"] >= cfg["trainer"]["eval_every"] > 0
    torch.manual_seed(0)
    task = build_task(cfg["task"], seed=0, cache_dir=tmp_path)
    assert task.model.config.num_hidden_layers == 2 and task.model.config.hidden_size == 128
    assert task.train_set[0]["input_ids"].shape == (cfg["task"]["data"]["seq_len"],)
    assert len(task.train_set) >= cfg["trainer"]["batch_size"]


def test_bert_base_config_holds_devlin_et_al_values():
    cfg = composed("bert_base")
    model, data = cfg["task"]["model"], cfg["task"]["data"]
    assert (model["num_hidden_layers"], model["hidden_size"], model["num_attention_heads"]) == (
        12,
        768,
        12,
    )
    assert model["intermediate_size"] == 3072 and model["max_position_embeddings"] == 512
    assert data["seq_len"] == 128 and data["mlm_probability"] == 0.15
    assert cfg["task"]["tokenizer"]["name"].endswith("bert-base-uncased")
    assert cfg["trainer"]["batch_size"] == 256 and cfg["trainer"]["max_steps"] == 1_000_000
    assert cfg["schedule"] == {"name": "linear", "warmup_steps": 10000, "final_ratio": 0.0}
    assert data["source"] == "load_dataset" and data["path"] == "wikimedia/wikipedia"


def write_paragraphs(path: Path, paragraphs: list[list[str]]) -> str:
    """A text file in BERT's corpus format: a blank line after each document."""
    path.write_text("".join("\n".join(lines) + "\n\n" for lines in paragraphs))
    return str(path)


def paragraphs(count: int, lines_each: int = 5) -> list[list[str]]:
    lines = english_lines()
    return [lines[i * lines_each : (i + 1) * lines_each] for i in range(count)]


@pytest.fixture
def no_hub(monkeypatch):
    """The hub unreachable (a closed port), offline mode off; datasets must not be asked."""
    import socket

    from graft.common import network

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    network.probe.cache_clear()

    def no_download(*args, **kwargs):
        raise AssertionError("the hub should not have been asked")

    monkeypatch.setattr(masked_lm.datasets, "load_dataset", no_download)
    monkeypatch.setattr(masked_lm.AutoTokenizer, "from_pretrained", no_download)
    yield port
    network.probe.cache_clear()


def test_bert_base_without_the_hub_is_one_line_naming_the_local_options(tmp_path, no_hub):
    message = bad_input(composed("bert_base")["task"], tmp_path)
    assert message.startswith(
        "task.data.path=wikimedia/wikipedia and task.tokenizer.name=google-bert/bert-base-uncased"
        " need the Hugging Face hub, which is unreachable "
        f"(127.0.0.1:{no_hub}: connection refused)"
    )
    for hint in ("task.data.path=text", "task.data.data_files=", "task.tokenizer.name=null"):
        assert hint in message
    assert "HF_HUB_OFFLINE=1" in message


def test_local_data_and_tokenizer_folder_need_no_hub(tmp_path, no_hub, monkeypatch):
    """Only what names the hub is checked: local files and a saved tokenizer pass."""
    saved = tmp_path / "tokenizer"
    saved.mkdir()
    cfg = config(source="load_dataset", path="text", data_files=[str(tmp_path / "a.txt")])
    cfg["tokenizer"]["name"] = str(saved)
    assert masked_lm.hub_needs(cfg) == []
    masked_lm.check_hub(cfg)  # no error
    cfg["tokenizer"]["name"] = "someone/tokenizer"
    assert masked_lm.hub_needs(cfg) == ["task.tokenizer.name=someone/tokenizer"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user says: use the cache
    masked_lm.check_hub(cfg)


def test_hub_data_or_tokenizer_missing_offline_is_one_line(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and nothing cached: the libraries' errors become one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config()
    cfg["tokenizer"]["name"] = str(tmp_path / "no-such-folder")
    message = bad_input(cfg, tmp_path)
    assert message.startswith(f"task.tokenizer.name={tmp_path / 'no-such-folder'}: ")
    assert "task.tokenizer.name=null" in message

    def offline(*args, **kwargs):  # what datasets raises in offline mode without a cache
        raise ConnectionError("Couldn't reach 'wikimedia/wikipedia' on the Hub (OfflineMode)")

    monkeypatch.setattr(masked_lm.datasets, "load_dataset", offline)
    message = bad_input(config(source="load_dataset", path="wikimedia/wikipedia"), tmp_path)
    assert message.startswith("task.data.path=wikimedia/wikipedia: Couldn't reach")
    assert "task.data.path=text task.data.data_files=" in message


@pytest.mark.slow
def test_bert_base_on_local_text_with_a_tokenizer_trained_here_runs(tmp_path):
    """README: task.data.path=text task.data.data_files=[...] task.tokenizer.name=null."""
    from graft.train.loop import train

    files = [
        write_paragraphs(tmp_path / "a.txt", paragraphs(40)),
        write_paragraphs(tmp_path / "b.txt", paragraphs(80)[40:]),
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "task=bert_base",
                "logger=none",
                "task.data.path=text",
                "task.data.name=null",
                f"task.data.data_files=[{','.join(files)}]",
                "task.data.num_proc=null",
                "task.data.seq_len=32",
                "task.tokenizer.name=null",
                *(f"task.model.{key}={value}" for key, value in TINY["model"].items()),
                "trainer.batch_size=4",
                "trainer.max_steps=2",
                "trainer.eval_every=0",
                "trainer.eval_batch_size=64",
                "trainer.log_norms_every=0",
                "trainer.checkpoint_every=0",
                "trainer.bf16=false",
                "trainer.num_workers=0",
                "trainer.progress=false",
                "schedule.warmup_steps=1",
                f"cache_dir={tmp_path / 'cache'}",
            ],
        )
    cfg = OmegaConf.to_container(cfg, resolve=True)
    (tmp_path / "run").mkdir()  # Hydra's job: the run directory exists
    assert train(cfg, tmp_path / "run") == 0
    [tokenizer] = (tmp_path / "cache" / "tokenizer").iterdir()  # WordPiece trained here
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"status": "finished"' in summary and '"eval/accuracy"' in summary


def test_text_files_hold_out_whole_paragraphs_and_at_least_the_minimum(tmp_path):
    docs = paragraphs(100)
    files = [
        write_paragraphs(tmp_path / "a.txt", docs[:50]),
        write_paragraphs(tmp_path / "b.txt", docs[50:]),
    ]
    data = config(source="load_dataset", path="text", data_files=files, eval_fraction=0.001)
    train, held_out = load_documents(data["data"])
    # 0.001 of 100 documents would be one: the minimum holds out 8, each a whole paragraph.
    assert len(held_out) == masked_lm.MIN_EVAL_DOCUMENTS == 8 and len(train) == 92
    expected = {"\n".join(lines) for lines in docs}
    assert set(held_out["text"]) | set(train["text"]) == expected
    assert set(held_out["text"]).isdisjoint(train["text"])
    assert len(load_documents({**data["data"], "eval_fraction": 0.2})[1]) == 20

    task = build(data, seed=0, cache_dir=tmp_path / "cache")
    assert len(task.eval_set) >= masked_lm.MIN_EVAL_BLOCKS


def test_too_few_documents_to_hold_out_the_minimum_is_refused(tmp_path):
    files = [write_paragraphs(tmp_path / "a.txt", paragraphs(15))]
    message = bad_input(config(source="load_dataset", path="text", data_files=files), tmp_path)
    assert message.startswith("found 15 document(s); holding out 8")
    assert "a blank line ends a document" in message and "task.data.eval_split" in message
    # one long file without blank lines is one document
    one = [write_text(tmp_path / "b.txt", english_lines()[:500])]
    message = bad_input(config(source="load_dataset", path="text", data_files=one), tmp_path)
    assert message.startswith("found 1 document(s)")


def test_a_held_out_split_of_too_few_blocks_is_refused_with_a_fraction_that_works(tmp_path):
    # 1-line documents: 8 of them make fewer than 8 blocks of 32 tokens
    files = [write_paragraphs(tmp_path / "a.txt", paragraphs(400, lines_each=1))]
    cfg = config(source="load_dataset", path="text", data_files=files, eval_fraction=0.01)
    message = bad_input(cfg, tmp_path)
    found = re.search(r"the 8 held-out documents make (\d) block\(s\) of 32 tokens", message)
    assert found and int(found[1]) < masked_lm.MIN_EVAL_BLOCKS, message
    suggested = re.search(r"task.data.eval_fraction \(e.g. ([0-9.]+)\)", message)
    task = build(
        config(**{**cfg["data"], "eval_fraction": float(suggested[1])}),
        seed=0,
        cache_dir=tmp_path / "cache",
    )
    assert len(task.eval_set) >= masked_lm.MIN_EVAL_BLOCKS


def test_training_a_tokenizer_needs_a_vocabulary_size(tmp_path):
    cfg = config()
    cfg["tokenizer"]["vocab_size"] = None
    message = bad_input(cfg, tmp_path)
    assert message.startswith("task.tokenizer.vocab_size=None: with task.tokenizer.name=null")
    assert "task.tokenizer.vocab_size=30522" in message


@pytest.fixture(scope="module")
def causal_task(module_tmp):
    torch.manual_seed(0)
    cfg = {**copy.deepcopy(TINY), "kind": "causal_lm"}
    return build(cfg, seed=0, cache_dir=module_tmp)


def test_causal_lm_predicts_every_next_token_of_the_same_blocks(causal_task, pydoc_task):
    assert causal_task.model.config.is_decoder
    assert len(causal_task.train_set) == len(pydoc_task.train_set)  # the same blocks, unmasked
    items = [causal_task.train_set[i] for i in range(4)]
    batch = causal_task.collate(items)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert torch.equal(batch["input_ids"][0], items[0]["input_ids"])
    sums = causal_task.eval_sums(causal_task.model, batch)
    assert int(sums["count"]) == 4 * (SEQ_LEN - 1)
    # The training loss is the mean of the same next-token cross entropy.
    loss = causal_task.loss(causal_task.model, batch)
    assert loss.item() == pytest.approx(sums["loss"].item() / int(sums["count"]), rel=1e-5)
    assert 0 <= int(sums["accuracy"]) <= int(sums["count"])


def test_causal_lm_sees_only_the_past(causal_task):
    # Changing the last token changes no earlier prediction: the attention is causal.
    model = causal_task.model.eval()
    ids = causal_task.train_set[0]["input_ids"][None]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert torch.allclose(before[0, :-1], after[0, :-1], atol=1e-5)
    assert not torch.allclose(before[0, -1], after[0, -1])


@pytest.mark.slow
def test_pydoc_lm_config_composes_and_builds(tmp_path):
    cfg = composed("pydoc_lm")
    torch.manual_seed(0)
    task = build_task(cfg["task"], seed=0, cache_dir=tmp_path)
    assert task.model.config.is_decoder and task.model.config.hidden_size == 64
    assert task.train_set[0]["input_ids"].shape == (cfg["task"]["data"]["seq_len"],)
    # The budget is about four epochs of the train blocks.
    epochs = cfg["trainer"]["max_steps"] * cfg["trainer"]["batch_size"] / len(task.train_set)
    assert 3 < epochs < 6
