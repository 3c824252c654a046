"""What a W&B run directory recorded: the history rows in its transaction log (`run-ID.wandb`).

W&B writes every run, online or offline, to `wandb/<offline-run|run>-<time>-<id>/run-<id>.wandb`
(what `wandb sync` uploads). The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic
0xBEE1, version 0), then 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`
(type 1 full, 2 first, 3 middle, 4 last), a block's tail under 7 bytes zero-padded. Each record is
a `wandb_internal_pb2.Record` protobuf. wandb 0.2x+ ships no Python reader, hence this one.

A killed process leaves the file cut anywhere: reading stops at the first torn or corrupt chunk
and returns what came before it.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
IDENT, MAGIC = b":W&B", 0xBEE1
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[bytes]:
    """The serialized records of a transaction log, up to its first torn or corrupt chunk."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size or HEADER.unpack_from(data)[:2] != (IDENT, MAGIC):
        return
    position, parts = HEADER.size, []
    while True:
        if BLOCK - position % BLOCK < CHUNK.size:  # the block's zero-padded tail
            position += BLOCK - position % BLOCK
        if position + CHUNK.size > len(data):
            return
        checksum, length, kind = CHUNK.unpack_from(data, position)
        body = data[position + CHUNK.size : position + CHUNK.size + length]
        if len(body) < length or kind not in (FULL, FIRST, MIDDLE, LAST):
            return
        # The checksum covers the type byte, then the data (zlib's CRC-32, not CRC-32C).
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            return
        position += CHUNK.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            parts = [body]
        elif kind == MIDDLE and parts:
            parts.append(body)
        elif kind == LAST and parts:
            yield b"".join([*parts, body])
            parts = []
        else:  # a middle or last chunk without its first: corrupt
            return


def history_rows(path: Path) -> dict[int, dict[str, Any]]:
    """{step: {key: value}} of the history rows in a transaction log (W&B's own `_` keys left
    out). Rows of one step logged twice are merged, the later value winning."""
    from wandb.proto import wandb_internal_pb2 as pb  # W&B is slow to import and optional

    rows: dict[int, dict[str, Any]] = {}
    for serialized in read_records(path):
        record = pb.Record()
        try:
            record.ParseFromString(serialized)
        except Exception:  # a record that passed its checksum yet does not parse: stop there
            break
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                row[key] = json.loads(item.value_json) if item.value_json else item_value(item)
        rows.setdefault(record.history.step.num, {}).update(row)
    return rows


def item_value(item: Any) -> Any:
    """A history item's value when it is typed rather than JSON-encoded."""
    kind = item.WhichOneof("value")
    return None if kind in (None, "none") else getattr(item, kind)


def run_logs(wandb_dir: Path, run_id: str) -> list[Path]:
    """The transaction logs of every segment of run `run_id` under `wandb_dir`, oldest first."""
    return sorted(Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb"))
