"""Read the history of an offline W&B run from its ``.wandb`` file (LevelDB-log framing of protobuf ``Record``s).

wandb >= 0.19 writes these files from its Go core and ships no Python reader; this is enough to check what a run
logged without any network.
"""

from __future__ import annotations

import json
import struct
import time
from collections import defaultdict
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)
_BLOCK = 32768


def _payloads(data: bytes):
    offset = _FILE_HEADER.size
    ident, _magic, _version = _FILE_HEADER.unpack_from(data)
    assert ident == b":W&B", "not a .wandb file"
    pending = b""
    while offset + _RECORD_HEADER.size <= len(data):
        block_left = _BLOCK - offset % _BLOCK
        if block_left < _RECORD_HEADER.size:
            offset += block_left
            continue
        _crc, length, kind = _RECORD_HEADER.unpack_from(data, offset)
        offset += _RECORD_HEADER.size
        chunk = data[offset : offset + length]
        offset += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_records(run_dir: str | Path, timeout: float = 30.0) -> list:
    """The run's protobuf ``Record``s in writing order (history, artifacts, files, ...).

    wandb's core process may still be writing the file when ``run.finish()`` has returned; the file is read again
    until it holds the run's ``exit`` record (or ``timeout`` seconds pass)."""
    run_file = next(Path(run_dir).glob("*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for payload in _payloads(run_file.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_history(run_dir: str | Path, timeout: float = 30.0) -> dict[str, list]:
    """History key -> list of logged values (JSON-decoded), in logging order."""
    history: dict[str, list] = defaultdict(list)
    for record in read_records(run_dir, timeout):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history[key].append(json.loads(item.value_json))
    return dict(history)
