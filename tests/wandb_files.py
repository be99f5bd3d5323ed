"""Reading what an offline wandb run wrote, as ``wandb sync`` reads it: the record log ``run-<id>.wandb``
(wandb 0.31 ships no Python reader for it: the log is LevelDB's format, the records wandb's protobuf).

wandb-core keeps a log's current 32 KiB block in memory and writes it when the log is closed, which happens
after ``wandb.finish()`` has returned: right after a run, its log may hold only the 7-byte file header (on a
loaded machine for seconds). ``wandb_records`` therefore waits for the run's ``exit`` record."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def read_records(path: Path) -> list:
    """Every record of one ``run-<id>.wandb`` file (a 7-byte file header, 32 KiB blocks, chunks with a 7-byte
    header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def run_files(run_dir: Path) -> list[Path]:
    """The record logs of the offline wandb runs a run folder holds (one a start of the run)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def read_closed(path: Path, wait_s: float = 120.0) -> list:
    """Every record of one ``run-<id>.wandb`` file once wandb-core has closed it (its ``exit`` record on
    disk; waits up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = read_records(path)
        if of_type(records, "exit") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert of_type(records, "exit"), (f"{path}: no exit record {wait_s:.0f} s after the run "
                                      f"({len(records)} records: {[r.WhichOneof('record_type') for r in records][:5]})")
    return records


def wandb_records(run_dir: Path, wait_s: float = 120.0) -> list:
    """Every record of the one offline wandb run under ``run_dir``, once its log is closed."""
    files = run_files(run_dir)
    assert len(files) == 1, files
    return read_closed(files[0], wait_s)


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def config_of(records) -> dict:
    """The run's config: the init record's items, then every update."""
    cfg = {}
    for c in [r.config for r in of_type(records, "run")] + of_type(records, "config"):
        cfg.update({u.key: json.loads(u.value_json) for u in c.update})
    return cfg


def summary_of(records) -> dict:
    """The run's summary as the dashboard shows it: the last summary record's items (nested keys joined by /)."""
    out = {}
    for s in of_type(records, "summary"):
        out.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in s.update})
    return out


def history_keys(records) -> set:
    return {"/".join(i.nested_key) or i.key for h in of_type(records, "history") for i in h.item}
