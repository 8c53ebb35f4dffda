"""Curation: what production taught, as training rows. Requests + feedback since the last curated version → a new
versioned dataset in the artifact store.

    ref = curate(cfg, store=store, workdir=Path(".tuneship/work"))
    ref.train     # artifact://curated/retail-sql/v0003/train.jsonl: the previous rows + the new ones
    ref.holdout   # artifact://curated/retail-sql/v0003/feedback_holdout.jsonl: a test split no training row shaped

Each feedback record on an answer of this model (any of its registered versions; feedback on other models is
theirs to curate) is joined to its request's record (the request log's segments) and becomes one of:

- a training row (question, correction) — a correction passes the task's validator first (for SQL: it runs on the
  task database in the evaluation sandbox, read-only, with a time limit); a thumbs-up answer is kept only with
  ``curate.keep_thumbs_up``;
- a *feedback holdout* row: a fixed share of the accepted corrections, chosen by request id, never trained on;
- a ``needs_labels.jsonl`` row: thumbs-down without a correction, for people to label and bring back with
  ``tuneship curate CONFIG --labels FILE``;
- a rejection with its reason: another key's feedback, an unknown request, a correction that fails, an exact or
  near duplicate of the training data or of another candidate, and — reported apart — a near duplicate of any
  **test** question (the test split, the extra test splits, earlier holdouts): none of them leaks into training.

Feedback whose request record is not written yet is carried to the next curation (``awaiting_request``), for up
to an hour. ``rows_in = kept + rejected``, as in preprocess; ``lineage.json`` names the source segments, the
request and feedback ids, and the previous dataset's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.artifacts import ARTIFACT_SCHEME, ArtifactStore, local_path
from infra.errors import UserError
from infra.segments import FEEDBACK, REQUESTS, read_segment, request_issued, segment_hours
from tasks.config import RunConfig
from tasks.preprocess import read_rows
from tasks.refs import CuratedRef

CURATED = "curated"
FILES = ("train.jsonl", "feedback_holdout.jsonl", "needs_labels.jsonl", "rejected.jsonl", "pending.jsonl")
AWAIT_REQUEST_S = 3600.0  # feedback waits this long for its request's record before it is rejected
ALPACA = re.compile(
    r"### Instruction:\n(?P<instruction>.+?)\n\n(?:### Input:\n(?P<input>.+?)\n\n)?### Response:\n?", re.DOTALL
)
_WORDS = re.compile(r"[^0-9a-z]+")


class CurationError(UserError, ValueError):
    """Curation cannot run: a labels file that is not JSONL, or a config it cannot serve."""


def normalized(text: str) -> str:
    return _WORDS.sub(" ", text.lower()).strip()


def shingles(text: str, size: int = 5) -> set[str]:
    text = normalized(text)
    return {text[i : i + size] for i in range(max(1, len(text) - size + 1))}


class NearDuplicates:
    """Questions indexed by MinHash LSH (datasketch) over character 5-grams; a hit is confirmed on exact Jaccard.

    The index looks for candidates well below ``threshold`` (LSH misses pairs just above its own threshold now and
    then); the exact check then keeps only pairs at or above it."""

    def __init__(self, threshold: float, num_perm: int = 128) -> None:
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=max(0.3, threshold - 0.25), num_perm=num_perm)
        self.shingles: dict[str, set[str]] = {}
        self.exact: dict[str, str] = {}

    def _minhash(self, grams: set[str]) -> Any:
        from datasketch import MinHash

        minhash = MinHash(num_perm=self.num_perm)
        minhash.update_batch([g.encode() for g in grams])
        return minhash

    def add(self, key: str, text: str) -> None:
        grams = shingles(text)
        self.exact.setdefault(normalized(text), key)
        if key not in self.shingles:
            self.shingles[key] = grams
            self.lsh.insert(key, self._minhash(grams))

    def find(self, text: str) -> str | None:
        """The key of an indexed question that ``text`` duplicates (exactly or nearly), or None."""
        if (exact := self.exact.get(normalized(text))) is not None:
            return exact
        grams = shingles(text)
        for key in self.lsh.query(self._minhash(grams)):
            other = self.shingles[key]
            if len(grams & other) / len(grams | other) >= self.threshold:
                return key
        return None


def question_of(prompt: Any) -> tuple[str, str | None] | None:
    """(instruction, input) from a logged prompt: the alpaca template, or a chat's last user message."""
    if isinstance(prompt, list):  # chat messages
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            return None
        content = users[-1].get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return (content.strip(), None) if isinstance(content, str) and content.strip() else None
    if isinstance(prompt, str) and (match := ALPACA.fullmatch(prompt.strip() + "\n")):
        return match.group("instruction").strip(), match.group("input")
    return None


@dataclass
class Candidate:
    feedback: dict[str, Any]
    question: str
    context: str | None
    response: str
    kind: str  # correction | label | thumbs_up


@dataclass
class Outcome:
    train: list[dict[str, Any]] = field(default_factory=list)
    holdout: list[dict[str, Any]] = field(default_factory=list)
    needs_labels: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, feedback: dict[str, Any], code: str, reason: str) -> None:
        self.rejected.append(
            {
                "request_id": feedback.get("request_id"),
                "feedback_id": feedback.get("feedback_id"),
                "code": code,
                "reason": reason,
            }
        )


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def versions(store: ArtifactStore, model_name: str) -> list[str]:
    """Keys of the curated versions of ``model_name``, oldest first."""
    own = re.compile(rf"{CURATED}/{re.escape(model_name)}/v\d{{4}}")  # not retail-sql-loop's when asked for retail-sql
    return [key for key in store.keys(f"{CURATED}/{model_name}") if own.fullmatch(key)]


def read_labels(path: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Labelled rows (a needs-labels export with ``correction`` filled in), and ``(where, problem)`` for bad lines."""
    rows, problems = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurationError(f"{path}: cannot read the labels file: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((where, f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(row, dict):
            problems.append((where, "expected a JSON object"))
            continue
        missing = [k for k in ("request_id", "question", "correction") if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            problems.append((where, f"missing or empty: {', '.join(missing)}"))
            continue
        rows.append({**row, "where": where})
    return rows, problems


class _Validator:
    """The task's check on a proposed answer: for sql_execution, it must run on the task database."""

    def __init__(self, cfg: RunConfig, store: ArtifactStore) -> None:
        self.sandbox = None
        self.timeout_s = cfg.evaluate.sql_timeout_s
        if cfg.evaluate.scorer == "sql_execution" and cfg.evaluate.database:
            from tasks.sql_exec import connect_readonly

            self.sandbox = connect_readonly(local_path(cfg.evaluate.database, store, what="evaluate.database"))

    def problem(self, answer: str) -> str | None:
        if self.sandbox is None:
            return None
        from tasks.sql_exec import execute_sql

        result = execute_sql(self.sandbox, answer, timeout_s=self.timeout_s)
        return None if result.ok else f"fails on the task database: {result.error}"

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()


def _rows_of(source: str, cfg: RunConfig, store: ArtifactStore) -> list[dict[str, Any]]:
    return [raw.row for raw in read_rows(source, cfg.data, store) if raw.row is not None]


def _requests(store: ArtifactStore, request_ids: Iterable[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The request records for ``request_ids``, from the segments of the hours they were issued in."""
    hours = set()
    for request_id in request_ids:
        hours.update(segment_hours(REQUESTS, request_issued(request_id)))
    records: dict[str, dict[str, Any]] = {}
    keys = sorted({key for hour in hours for key in store.keys(hour)})
    for key in keys:
        for record in read_segment(store, key):
            records[record["request_id"]] = record
    return records, keys


def _feedback(store: ArtifactStore, consumed: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    keys = [key for key in store.keys(FEEDBACK) if key not in consumed]
    return [record for key in keys for record in read_segment(store, key)], keys


def curate(
    cfg: RunConfig, *, store: ArtifactStore, workdir: Path, labels: Path | None = None, now: float | None = None
) -> CuratedRef:
    """Curate the feedback since the last curated version of ``cfg.model_name`` into a new version."""
    now = time.time() if now is None else now
    rules, data = cfg.curate, cfg.data
    existing = versions(store, cfg.model_name)
    previous = existing[-1] if existing else None
    if previous is not None:
        prev_dir = store.get_dir(previous)
        lineage = json.loads((prev_dir / "lineage.json").read_text())
        train_rows = _jsonl(prev_dir / "train.jsonl")
        holdout_rows = _jsonl(prev_dir / "feedback_holdout.jsonl")
        carried = _jsonl(prev_dir / "pending.jsonl")
        consumed = set(lineage["consumed_feedback_segments"])
        previous_fingerprint = lineage["fingerprint"]
        feedback_rows = lineage["counts"]["feedback_rows"]
    else:
        train_rows, holdout_rows, carried, consumed = _rows_of(data.source, cfg, store), [], [], set()
        feedback_rows = 0
        previous_fingerprint = hashlib.sha256(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in train_rows).encode()
        ).hexdigest()

    new_feedback, feedback_keys = _feedback(store, consumed)
    label_rows, label_problems = read_labels(labels) if labels else ([], [])
    if not new_feedback and not carried and not label_rows and not label_problems and previous is not None:
        return CuratedRef.model_validate_json((store.get_dir(previous) / "curated.json").read_text())

    requests, request_keys = _requests(store, [f["request_id"] for f in carried + new_feedback])

    def about_this_model(record: dict[str, Any]) -> bool:
        """Feedback on an answer of one of this model's versions (or not yet known to be about another)."""
        model = record.get("model") or requests.get(record["request_id"], {}).get("model")
        return model is None or model == cfg.model_name

    feedback = [f for f in carried + new_feedback if about_this_model(f)]
    out = Outcome()
    for where, problem in label_problems:
        out.rejected.append({"where": where, "code": "bad_label", "reason": problem})

    # The latest word on each request wins (a label over user feedback).
    latest: dict[str, dict[str, Any]] = {}
    for record in sorted(feedback, key=lambda f: f["issued_ms"]):
        if record["request_id"] in latest:
            out.reject(latest[record["request_id"]], "superseded", "a later feedback on the same request")
        latest[record["request_id"]] = record
    candidates: list[Candidate] = []
    for request_id, record in latest.items():
        request = requests.get(request_id)
        if request is None:
            if now - request_issued(request_id) < AWAIT_REQUEST_S:
                out.pending.append(record)
                out.reject(record, "awaiting_request", "its request's record is not in the log yet; retried next time")
            else:
                out.reject(record, "no_request", "no such request in the request log")
            continue
        if record["key_id"] != request["key_id"]:
            out.reject(record, "other_key", "the feedback came with another API key than the request")
            continue
        question = question_of(request.get("prompt"))
        if question is None:
            reason = "the log holds no prompt (TUNESHIP_REQUEST_LOG=metadata)" if "prompt" not in request else (
                "the prompt is in neither the task's template nor a chat"
            )  # fmt: skip
            out.reject(record, "no_question", reason)
            continue
        if record.get("correction"):
            candidates.append(Candidate(record, *question, record["correction"].strip(), "correction"))
        elif record["rating"] == "down":
            out.needs_labels.append(
                {"request_id": request_id, "question": question[0], "output": request.get("output"), "correction": None}
            )
            out.reject(record, "needs_label", "thumbs down without a correction: exported to needs_labels.jsonl")
        elif rules.keep_thumbs_up and isinstance(request.get("output"), str):
            candidates.append(Candidate(record, *question, request["output"].strip(), "thumbs_up"))
        else:
            out.reject(record, "thumbs_up_not_kept", "thumbs up: kept only with curate.keep_thumbs_up")
    for row in label_rows:
        label = {"request_id": row["request_id"], "feedback_id": None, "where": row["where"]}
        candidates.append(Candidate(label, row["question"], None, row["correction"].strip(), "label"))

    _select(cfg, store, candidates, train_rows, holdout_rows, out)

    version = int(previous.rsplit("/v", 1)[1]) + 1 if previous else 1
    key = f"{CURATED}/{cfg.model_name}/v{version:04d}"
    folder = workdir / f"curate-{cfg.model_name}-v{version:04d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    train_all, holdout_all = train_rows + out.train, holdout_rows + out.holdout
    for name, rows in zip(FILES, (train_all, holdout_all, out.needs_labels, out.rejected, out.pending), strict=True):
        _write_jsonl(folder / name, rows)
    fingerprint = hashlib.sha256((folder / "train.jsonl").read_bytes()).hexdigest()
    rows_in = len(feedback) + len(label_rows) + len(label_problems)
    kept = len(out.train) + len(out.holdout)
    assert rows_in == kept + len(out.rejected), (rows_in, kept, len(out.rejected))
    counts = {
        "rows_in": rows_in,
        "kept": kept,
        "train_added": len(out.train),
        "holdout_added": len(out.holdout),
        "rejected": len(out.rejected),
        "needs_labels": len(out.needs_labels),
        "pending": len(out.pending),
        "train_rows": len(train_all),
        "holdout_rows": len(holdout_all),
        "feedback_rows": feedback_rows + kept,  # every row curation ever kept, in all versions so far
    }
    lineage = {
        "version": version,
        "created_at": now,
        "model_name": cfg.model_name,
        "previous": {"key": previous, "fingerprint": previous_fingerprint, "source": None if previous else data.source},
        "fingerprint": fingerprint,
        "source_segments": {"requests": request_keys, "feedback": feedback_keys},
        "consumed_feedback_segments": sorted(consumed | set(feedback_keys)),
        "feedback_ids": sorted(f["feedback_id"] for f in feedback),
        "request_ids": sorted({row["request_id"] for row in out.train + out.holdout}),
        "labels": str(labels) if labels else None,
        "counts": counts,
        "reasons": dict(Counter(r["code"] for r in out.rejected)),
    }
    (folder / "lineage.json").write_text(json.dumps(lineage, indent=1))
    uri = f"{ARTIFACT_SCHEME}{key}"
    ref = CuratedRef(
        key=key,
        version=version,
        train=f"{uri}/train.jsonl",
        holdout=f"{uri}/feedback_holdout.jsonl",
        needs_labels=f"{uri}/needs_labels.jsonl",
        fingerprint=fingerprint,
        previous_fingerprint=previous_fingerprint,
        counts=counts,
        reasons=lineage["reasons"],
    )
    (folder / "curated.json").write_text(ref.model_dump_json(indent=1))
    store.put_dir(folder, key)
    return ref


def _test_questions(cfg: RunConfig, store: ArtifactStore, holdout_rows: list[dict[str, Any]]) -> Iterator[str]:
    field_name = cfg.data.instruction_field
    sources = ([cfg.data.test_file] if cfg.data.test_file else []) + list(cfg.data.extra_test.values())
    for source in sources:
        for row in _rows_of(source, cfg, store):
            if isinstance(row.get(field_name), str):
                yield row[field_name]
    for row in holdout_rows:
        yield row[field_name]


def _select(
    cfg: RunConfig,
    store: ArtifactStore,
    candidates: list[Candidate],
    train_rows: list[dict[str, Any]],
    holdout_rows: list[dict[str, Any]],
    out: Outcome,
) -> None:
    """Validate, drop test leaks and duplicates, and split the candidates into training and holdout rows."""
    rules, data = cfg.curate, cfg.data
    tests = NearDuplicates(rules.near_duplicate)
    for number, question in enumerate(_test_questions(cfg, store, holdout_rows)):
        tests.add(f"test:{number}", question)
    seen = NearDuplicates(rules.near_duplicate)
    for number, row in enumerate(train_rows):
        if isinstance(row.get(data.instruction_field), str):
            seen.add(f"train:{number}", row[data.instruction_field])
    validator = _Validator(cfg, store)
    try:
        for number, candidate in enumerate(candidates):
            feedback = candidate.feedback
            if len(candidate.response) > rules.max_correction_chars:
                out.reject(feedback, "too_long", f"{len(candidate.response)} characters > {rules.max_correction_chars}")
                continue
            if problem := validator.problem(candidate.response):
                out.reject(feedback, "invalid_answer", problem)
                continue
            if leak := tests.find(candidate.question):
                out.reject(feedback, "test_leak", f"a near duplicate of a test question ({leak})")
                continue
            if dup := seen.find(candidate.question):
                code = "duplicate_of_training" if dup.startswith("train:") else "duplicate"
                out.reject(feedback, code, f"an exact or near duplicate of {dup}")
                continue
            seen.add(f"candidate:{number}", candidate.question)
            row = {data.instruction_field: candidate.question, data.response_field: candidate.response}
            if candidate.context and data.input_field:
                row[data.input_field] = candidate.context
            row |= {"source": candidate.kind, "request_id": feedback["request_id"]}
            share = int(hashlib.sha256(feedback["request_id"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            (out.holdout if candidate.kind != "thumbs_up" and share < rules.holdout_share else out.train).append(row)
    finally:
        validator.close()
