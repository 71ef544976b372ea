"""Format: turn every kept record into LLaVA-form instruction data.

Per crawl shard, one Ray task a shard (``format.parallelism`` at once; the driver alone with
``format.parallelism: 1``, or when there is one shard or fewer than ``TASKS_FROM_RECORDS`` records to do):

    format/shards/<shard>.parquet   one row per kept record: its pre-training and instruction conversations,
                                    the generator used, and (with ``format.tokenizer``) input_ids and labels
    format/ledger/<shard>.parquet   every record given, kept or rejected (media_token_mismatch, empty_caption,
                                    too_many_tokens)
    format/done/<shard>.json        written last: the shard is complete

Media stays in the crawl shards; the release stage copies it.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import ConfigError, FormatConfig
from curation.fsutil import atomic_path, read_json
from curation.instruct import (
    DEFAULT_SYSTEM_PROMPT,
    FormatReject,
    check_conversation,
    check_record,
    instruction_conversation,
    load_tokenizer,
    pretrain_conversation,
    tokenize_conversation,
    tokenizer_fingerprint,
)
from curation.ledger import kept_row, rejected_row, write_part
from curation.stages.base import TASKS_FROM_RECORDS, Stage, ipc_bytes, log, map_shards, read_ipc, read_kept

TURNS = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
IDS = pa.list_(pa.int32())
FORMAT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("modality", pa.string()),
        ("generator", pa.string()),
        ("pretrain_conversations", TURNS),  # projector pre-training: brief instruction + caption
        ("conversations", TURNS),  # instruction tuning
        ("pretrain_input_ids", IDS),
        ("pretrain_labels", IDS),
        ("input_ids", IDS),
        ("labels", IDS),
    ]
)
# a ledger column, so the card and the dashboard can show the token-length distribution
LEDGER_EXTRA = pa.schema([("num_tokens", pa.int32())])


class InstructionFormatter:
    """Formats one record at a time.

    Args:
        cfg: the ``format`` config section.
        tokenizer: a loaded trainer tokenizer, or None to store text only.
    """

    def __init__(self, cfg: FormatConfig, tokenizer: Any = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.system_prompt = cfg.system_prompt if cfg.system_prompt is not None else DEFAULT_SYSTEM_PROMPT

    def format(self, record: dict[str, Any]) -> dict[str, Any]:
        """One row of :data:`FORMAT_SCHEMA`; raises :class:`FormatReject` for a record that cannot be a sample."""
        check_record(record)
        pretrain = pretrain_conversation(record, self.cfg.seed)
        check_conversation(record, pretrain, "pretrain")
        generator, conversations = instruction_conversation(record, self.cfg.generators, self.cfg.seed)
        check_conversation(record, conversations, generator)
        row = {
            "uid": record["uid"],
            "modality": record["modality"],
            "generator": generator,
            "pretrain_conversations": pretrain,
            "conversations": conversations,
        }
        if self.tokenizer is not None:
            row["pretrain_input_ids"], row["pretrain_labels"] = tokenize_conversation(
                self.tokenizer, pretrain, "plain", self.system_prompt
            )
            row["input_ids"], row["labels"] = tokenize_conversation(
                self.tokenizer, conversations, "vicuna_v1", self.system_prompt
            )
            n = len(row["input_ids"])
            if self.cfg.max_tokens is not None and n > self.cfg.max_tokens:
                raise FormatReject(
                    "too_many_tokens", f"{record['uid']}: {n} tokens > format.max_tokens {self.cfg.max_tokens}"
                )
        return row


@lru_cache(maxsize=2)
def _task_tokenizer(path: str) -> Any:
    """The tokenizer in a Ray worker, loaded once for all the shards that worker formats."""
    return load_tokenizer(path)


def _format_task(shard: str, uids: bytes, stage: FormatStage) -> dict[str, Any]:
    """One Ray task of :func:`map_shards`: format a crawl shard's kept records (``uids``: theirs, an Arrow IPC
    stream; the task reads the records), mark it done."""
    cfg = stage.config.format
    formatter = InstructionFormatter(cfg, _task_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None)
    records = read_kept(stage.ctx.run_dir, shard, read_ipc(uids).column("uid"))
    summary = stage.format_shard(shard, records, formatter)
    stage.mark_shard_done(shard, summary)
    return {**summary, "shard": shard}


class FormatStage(Stage):
    """Make LLaVA-form pre-training and instruction conversations from the kept records."""

    name = "format"
    order = 50
    config_sections = ("format",)
    execution_keys = ("parallelism", "num_cpus")
    help = "turn kept records into LLaVA-form instruction data (optionally pre-tokenized)"

    def run(self, input_stage: str) -> dict[str, Any]:
        import ray

        cfg = self.config.format
        tokenizer = None
        if cfg.tokenizer is not None:  # loaded here first, so a bad folder is a config error before any task
            try:
                tokenizer = load_tokenizer(cfg.tokenizer)
            except (OSError, ValueError) as e:
                raise ConfigError([f"format.tokenizer: cannot load {cfg.tokenizer}: {e}"]) from e
        records = self.kept_records(columns=["uid"])  # the rest is read a shard at a time
        pending = [s for s in records if not self.is_shard_done(s)]
        log.info("format: %d shards, %d already complete", len(records), len(records) - len(pending))
        todo = sum(records[s].num_rows for s in pending)
        if len(pending) > 1 and cfg.parallelism != 1 and todo >= TASKS_FROM_RECORDS and ray.is_initialized():
            # formatting and tokenizing are Python and a tokenizer's work: on the driver they use one core of the
            # cluster (benchmarks/format.py: 200,000 pre-tokenized records took 76.5 s there, 44.2 s as tasks on
            # 2 cores)
            items = [{"shard": s, "uids": ipc_bytes(records[s])} for s in pending]
            for n, s in enumerate(map_shards(_format_task, items, cfg.num_cpus, cfg.parallelism, stage=self), 1):
                log.info("format: shard %s (%d/%d): %d kept, %d rejected", s["shard"], n, len(pending), s["kept"],
                         s["rejected"])  # fmt: skip
        else:
            formatter = InstructionFormatter(cfg, tokenizer)
            for shard in pending:
                table = read_kept(self.ctx.run_dir, shard, records[shard].column("uid"))
                self.mark_shard_done(shard, self.format_shard(shard, table, formatter))
        totals: Counter = Counter()
        reasons: Counter = Counter()
        generators: Counter = Counter()
        for shard in records:
            s = read_json(self.done_path(shard))
            totals.update({k: s[k] for k in ("input", "kept", "rejected")})
            reasons.update(s["reasons"])
            generators.update(s["generators"])
        summary: dict[str, Any] = {
            **{k: totals[k] for k in ("input", "kept", "rejected")},
            "shards": len(records),
            "reasons": dict(sorted(reasons.items())),
            "generators": dict(sorted(generators.items())),
        }
        if cfg.tokenizer is not None:
            summary["tokenizer"] = {"path": cfg.tokenizer, "sha256": tokenizer_fingerprint(cfg.tokenizer)}
        return summary

    def format_shard(self, shard: str, table: pa.Table, formatter: InstructionFormatter) -> dict[str, Any]:
        """Format one crawl shard's kept records; writes its samples and ledger part, returns its summary."""
        rows, ledger, reasons, generators = [], [], Counter(), Counter()
        for record in table.to_pylist():
            try:
                row = formatter.format(record)
            except FormatReject as r:
                reasons[r.reason] += 1
                ledger.append(rejected_row(record["uid"], self.name, r.reason, r.detail))
                continue
            rows.append(row)
            generators[row["generator"]] += 1
            tokens = {"num_tokens": len(row["input_ids"])} if formatter.tokenizer is not None else {}
            ledger.append(kept_row(record["uid"], self.name, **tokens))
        with atomic_path(self.dir / "shards" / f"{shard}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=FORMAT_SCHEMA), tmp)
        write_part(self.ledger_path(shard), ledger, LEDGER_EXTRA if formatter.tokenizer is not None else None)
        return {
            "input": table.num_rows,
            "kept": len(rows),
            "rejected": table.num_rows - len(rows),
            "reasons": dict(sorted(reasons.items())),
            "generators": dict(sorted(generators.items())),
        }
