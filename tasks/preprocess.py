"""Preprocess stage: raw rows in, a validated, tokenised, split dataset out — and every rejected row kept.

    ref = preprocess(cfg.preprocess, cfg.data, name=cfg.name, base=resolved, store=store, workdir=Path("work"))

Reads JSONL, CSV, Parquet or a saved Hugging Face dataset, from disk or from the artifact store
(``artifact://KEY/PATH``). Each row is validated; a rejected row goes to ``rejects.jsonl`` with its
``file:line`` and the reason, so ``rows_in == kept + rejected`` always. Kept rows are formatted (the seed's
``### Instruction:`` template or the tokenizer's chat template), tokenised with the prompt masked out of the
labels, split train/eval/test by a hash of their content (stable as rows are added), fingerprinted and
written to the artifact store.

JSONL is parsed line by line rather than through ``datasets.load_dataset("json")``, which stops at the
first malformed or non-UTF-8 line instead of naming and keeping it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.artifacts import ArtifactNotFoundError, ArtifactStore, local_path
from infra.errors import UserError
from infra.prompts import alpaca_prompt
from tasks.base_model import ResolvedModel
from tasks.config import DataConfig, PreprocessConfig
from tasks.refs import DatasetRef, DatasetStats

SPLITS = ("train", "eval", "test")


class PreprocessError(UserError, ValueError):
    """The data cannot make a usable dataset: the message names the file and the worst reasons."""


@dataclass(frozen=True)
class RawRow:
    where: str  # "file:line" or "file:row N"
    row: dict[str, Any] | None
    raw: str  # the original text, kept for the rejects file
    reject: tuple[str, str] | None = None  # (code, reason) when the row could not even be read


@dataclass(frozen=True)
class Example:
    where: str
    prompt: str
    response: str
    input_ids: list[int]
    labels: list[int]


# ------------------------------------------------------------------------------------------ reading


def _resolve_source(source: str, store: ArtifactStore) -> Path:
    try:
        return local_path(source, store, what="data")
    except ArtifactNotFoundError as exc:
        raise PreprocessError(str(exc)) from None


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in formats:
        raise PreprocessError(f"{path}: cannot tell the format from '{suffix}'; set data.format")
    return formats[suffix]


def _read_jsonl(path: Path, label: str) -> Iterator[RawRow]:
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            where = f"{label}:{number}"
            if not line.strip():
                continue  # blank lines are not rows
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :]  # a byte-order mark some exporters write: not part of the row
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raw = line.decode("utf-8", errors="backslashreplace").rstrip("\n")
                yield RawRow(
                    where,
                    None,
                    raw,
                    ("not_utf8", f"not valid UTF-8 (byte {line[exc.start]:#04x} at column {exc.start + 1})"),
                )
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(
                    where,
                    None,
                    text.rstrip("\n"),
                    ("malformed_json", f"malformed JSON: {exc.msg} at column {exc.colno}"),
                )
                continue
            if not isinstance(row, dict):
                yield RawRow(
                    where,
                    None,
                    text.rstrip("\n"),
                    ("not_an_object", f"expected a JSON object, got {type(row).__name__}"),
                )
                continue
            yield RawRow(where, row, text.rstrip("\n"))


def _read_with_datasets(path: Path, fmt: str, label: str) -> Iterator[RawRow]:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if fmt == "hf":
        loaded = datasets.load_from_disk(str(path))
        parts = (
            [(f"{label}[{name}]", loaded[name]) for name in loaded]
            if isinstance(loaded, datasets.DatasetDict)
            else [(label, loaded)]
        )
    else:
        try:
            parts = [(label, datasets.load_dataset(fmt, data_files=str(path), split="train"))]
        except (ValueError, OSError, DatasetGenerationError) as exc:  # pyarrow's errors are ValueErrors
            raise PreprocessError(f"{path}: cannot read as {fmt}: {exc}") from None
    first_line = 2 if fmt == "csv" else 1  # CSV: line 1 is the header
    for part_label, ds in parts:
        for index, row in enumerate(ds):
            where = f"{part_label}:{index + first_line}" if fmt == "csv" else f"{part_label}:row {index + 1}"
            yield RawRow(where, dict(row), json.dumps(row, ensure_ascii=False, default=str))


def read_rows(source: str, data: DataConfig, store: ArtifactStore) -> Iterator[RawRow]:
    path = _resolve_source(source, store)
    fmt = _format_of(path, data.format)
    if fmt == "jsonl":
        yield from _read_jsonl(path, source)
    else:
        yield from _read_with_datasets(path, fmt, source)


# --------------------------------------------------------------------------------------- validating


def _text_field(row: dict[str, Any], name: str, *, required: bool) -> tuple[str | None, tuple[str, str] | None]:
    if name not in row or row[name] is None:
        return None, (("missing_field", f"missing field '{name}'") if required else None)
    value = row[name]
    if not isinstance(value, str):
        return None, ("wrong_type", f"field '{name}' is {type(value).__name__}, expected a string")
    if required and not value.strip():
        return None, ("empty_field", f"field '{name}' is empty")
    return value, None


def _prompt_response(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> tuple[str, str] | tuple[str, str, str]:
    """(prompt, response) for a row, or ("", code, reason) when it is rejected."""
    if data.messages_field in row and data.instruction_field not in row:
        messages = row[data.messages_field]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            return "", "wrong_type", f"field '{data.messages_field}' must be a list of {{role, content}} strings"
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            return "", "bad_messages", f"field '{data.messages_field}' must end with an assistant message"
        if not messages[-1]["content"].strip():
            return "", "empty_field", "the last assistant message is empty"
        if data.template == "chat":
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            return prompt, messages[-1]["content"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) != 2 or turns[0]["role"] != "user":
            return (
                "",
                "bad_messages",
                "the alpaca template takes one user turn and one assistant turn; use template: chat",
            )
        return alpaca_prompt(turns[0]["content"]), messages[-1]["content"]
    instruction, problem = _text_field(row, data.instruction_field, required=True)
    if problem:
        return "", *problem
    response, problem = _text_field(row, data.response_field, required=True)
    if problem:
        return "", *problem
    context = None
    if data.input_field:
        context, problem = _text_field(row, data.input_field, required=False)
        if problem:
            return "", *problem
    if data.template == "chat":
        user = f"{instruction}\n\n{context}" if context else instruction
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return prompt, response  # type: ignore[return-value]
    return alpaca_prompt(instruction, context), response  # type: ignore[arg-type]


def tokenize_example(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + EOS; labels mask the prompt with -100.

    Prompt and response are tokenised separately, exactly as serving sees them: the server gets the
    prompt and generates the response after it.
    """
    # A chat template that writes the BOS token itself (Llama 3's, the offline base's) must not get a second one.
    has_bos = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_bos)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def _split_of(key: str, eval_fraction: float, test_fraction: float) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + eval_fraction:
        return "eval"
    return "train"


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[index])


# ------------------------------------------------------------------------------------------ the stage


def preprocess(
    cfg: PreprocessConfig, data: DataConfig, *, name: str, base: ResolvedModel, store: ArtifactStore, workdir: Path
) -> DatasetRef:
    """Validate, format, tokenise and split ``data``; store it under ``name`` with its rejects and stats."""
    import datasets
    from transformers import AutoTokenizer

    pre = cfg
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if data.template == "chat" and not tokenizer.chat_template:
        raise PreprocessError(
            f"data.template: 'chat' but the tokenizer of {base.id} has no chat template; use 'alpaca'"
        )

    out = workdir / f"preprocess-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rejects: list[dict[str, str]] = []
    splits = SPLITS + tuple(data.extra_test)
    kept: dict[str, list[Example]] = {name: [] for name in splits}
    seen: dict[str, str] = {}
    rows_in = 0

    def reject(raw: RawRow, code: str, reason: str) -> None:
        rejects.append({"where": raw.where, "code": code, "reason": reason, "raw": raw.raw})

    sources = [(data.source, None)] + ([(data.test_file, "test")] if data.test_file else [])
    sources += [(path, split) for split, path in data.extra_test.items()]
    for source, forced_split in sources:
        for raw in read_rows(source, data, store):
            rows_in += 1
            if raw.reject is not None:
                reject(raw, *raw.reject)
                continue
            result = _prompt_response(raw.row or {}, data, tokenizer)
            if len(result) == 3:
                reject(raw, result[1], result[2])
                continue
            prompt, response = result
            key = hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()
            if key in seen:
                reject(raw, "duplicate", f"exact duplicate of {seen[key]}")
                continue
            input_ids, labels = tokenize_example(tokenizer, prompt, response)
            if len(input_ids) > pre.max_seq_len:
                reject(raw, "too_long", f"{len(input_ids)} tokens > preprocess.max_seq_len={pre.max_seq_len}")
                continue
            seen[key] = raw.where
            test_fraction = 0.0 if data.test_file else pre.test_fraction
            split = forced_split or _split_of(key, pre.eval_fraction, test_fraction)
            kept[split].append(Example(raw.where, prompt, response, input_ids, labels))

    rejects_path = out / "rejects.jsonl"
    with rejects_path.open("w") as fh:
        for item in rejects:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    reasons = Counter(item["code"] for item in rejects)
    n_kept = sum(len(v) for v in kept.values())
    assert rows_in == n_kept + len(rejects)
    worst = ", ".join(
        f"{code} ×{count} (e.g. {next(r['where'] for r in rejects if r['code'] == code)})"
        for code, count in reasons.most_common(3)
    )
    if not kept["train"]:
        raise PreprocessError(
            f"{data.source}: no training rows kept out of {rows_in}"
            + (f"; rejects: {worst}" if rejects else "")
            + f"; all rejects with reasons in {rejects_path}"
        )
    if rows_in and len(rejects) / rows_in > pre.max_reject_rate:
        raise PreprocessError(
            f"{data.source}: {len(rejects)} of {rows_in} rows rejected ({len(rejects) / rows_in:.0%} > "
            f"preprocess.max_reject_rate={pre.max_reject_rate:.0%}): {worst}; all rejects in {rejects_path}"
        )

    fingerprint = hashlib.sha256()
    for split in splits:
        for ex in kept[split]:
            fingerprint.update(json.dumps([split, ex.input_ids, ex.labels]).encode())
    digest = fingerprint.hexdigest()
    lengths = sorted(len(ex.input_ids) for split in splits for ex in kept[split])
    stats = DatasetStats(
        rows_in=rows_in,
        kept=n_kept,
        rejected=len(rejects),
        reject_reasons=dict(reasons),
        splits={split: len(kept[split]) for split in splits},
        token_length={
            "p50": _percentile(lengths, 50),
            "p90": _percentile(lengths, 90),
            "p99": _percentile(lengths, 99),
            "max": float(lengths[-1]),
            "mean": sum(lengths) / len(lengths),
        },
    )

    key = f"datasets/{name}-{digest[:16]}"
    if not store.exists(key):
        dataset = datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {
                        "where": [ex.where for ex in kept[split]],
                        "prompt": [ex.prompt for ex in kept[split]],
                        "response": [ex.response for ex in kept[split]],
                        "input_ids": [ex.input_ids for ex in kept[split]],
                        "labels": [ex.labels for ex in kept[split]],
                    }
                )
                for split in splits
            }
        )
        dataset.save_to_disk(str(out / "dataset"))
        (out / "stats.json").write_text(stats.model_dump_json(indent=1))
        store.put_dir(out, key)
    return DatasetRef(
        artifact=store.ref(key),
        fingerprint=digest,
        base_model=base.id,
        template=data.template,
        max_seq_len=pre.max_seq_len,
        stats=stats,
    )


def load_splits(ref: DatasetRef, store: ArtifactStore) -> Any:
    """The ``DatasetDict`` (train/eval/test and any ``data.extra_test`` splits) behind a ref, from a verified
    local copy."""
    import datasets

    return datasets.load_from_disk(str(store.get_dir(ref.artifact) / "dataset"))
