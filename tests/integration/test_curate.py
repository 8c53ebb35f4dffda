"""Curation on the real request log (its writer, a real artifact store, the SQL sandbox on the demo database):
counts and reasons, the planted near duplicate of a test question dropped, needs-labels out and labels back in,
lineage, feedback that waits for its request, and no personal data in anything curated."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from infra.artifacts import ArtifactStore, LocalBackend
from infra.prompts import alpaca_prompt
from serving.request_log import Origin, RequestLog, RequestLogConfig
from tasks.curate import CurationError, NearDuplicates, curate, question_of, read_labels, shingles


def jaccard(a: str, b: str) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


COUNT = "SELECT COUNT(*) FROM customers"
ALICE, BOB = "a1a1a1a1a1a1a1a1", "b2b2b2b2b2b2b2b2"
NEW_QUESTIONS = [
    "yo, tally the buyers out in Springfield",
    "gimme every wares title that costs over 40 bucks",
    "which outlet region has the fewest team members",
    "avg paycheck of cashiers, roughly",
    "how many transactions got cancelled back in 2023",
    "the patrons who signed up before 2020, names only",
    "top three priciest goods in the garden aisle",
    "count personnel per location please",
    "what fraction of purchases are still pending",
    "name the shop manager with the biggest salary",
    "sum of quantities sold for product number seven",
    "any buyers from Lakeside in the premium segment?",
]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache")


class Traffic:
    """Requests and feedback written through the gateway's own request log."""

    def __init__(self, store: ArtifactStore) -> None:
        self.log = RequestLog(store, RequestLogConfig(flush_interval_s=0.2))
        self.log.start()

    def ask(self, question: str, output: str = "SELECT 1", key: str = ALICE, served: str = "retail-sql-v1") -> str:
        from infra.segments import new_request_id

        rid = new_request_id()
        self.log.issued(rid, key, served)
        self.log.completed(
            request_id=rid, key_id=key, route="/generate", alias="champion", served=served, latency_s=0.2,
            prompt=alpaca_prompt(question), text=output, finish_reason="stop", usage={"completion_tokens": 3},
        )  # fmt: skip
        return rid

    def rate(self, rid: str, rating: str, correction: str | None = None, key: str = ALICE) -> None:
        origin = self.log.recent.get(rid)
        self.log.rate(rid, key, origin and Origin(key_id=origin[0], served=origin[1]), rating=rating,
                      correction=correction, comment=None)  # fmt: skip

    def flush(self) -> None:
        assert self.log.flush()


def test_curation_counts_reasons_leaks_and_lineage(demo_task: Path, demo_config, store, tmp_path: Path) -> None:
    cfg = demo_config()
    test_question = json.loads((demo_task / "test.jsonl").read_text().splitlines()[5])["instruction"]
    train_question = json.loads((demo_task / "train.jsonl").read_text().splitlines()[7])["instruction"]
    traffic = Traffic(store)
    for n, question in enumerate(NEW_QUESTIONS):  # good corrections, each a new question
        rid = traffic.ask(question)
        traffic.rate(rid, "down", f"SELECT COUNT(*) FROM customers WHERE customer_id > {n}")
    rid = traffic.ask(NEW_QUESTIONS[3].upper() + "!!")  # the same question again
    traffic.rate(rid, "down", COUNT)
    traffic.rate(traffic.ask("what's the grand total of wares"), "down", "SELECT nope FROM nowhere")
    planted = "hey, " + test_question.lower().rstrip("?") + " - thanks"  # a test question, slightly reworded
    assert 0.8 <= jaccard(planted, test_question) < 0.9
    traffic.rate(traffic.ask(planted), "down", COUNT)
    traffic.rate(traffic.ask(train_question.upper() + " ?"), "down", COUNT)
    traffic.rate(traffic.ask("which outlet sold the most"), "down")  # no correction: needs a label
    traffic.rate(traffic.ask("count the team members"), "up")
    rid = traffic.ask("list every patron in Bristol")
    traffic.rate(rid, "down", COUNT, key=BOB)  # feedback with another key than the request's
    early = f"{int(time.time() * 1000):012x}{'c' * 16}"
    traffic.rate(early, "down", COUNT)  # its request's record has not arrived
    other = traffic.ask("how many shoppers bought shoes", served="shoe-sql-v2")  # another model's answer
    traffic.rate(other, "down", COUNT)  # is that model's to curate: not counted here
    rid = traffic.ask("how many buyers, reach me at jo@example.com")
    traffic.rate(rid, "down", "SELECT COUNT(*) FROM customers WHERE full_name = 'jo@example.com'")
    traffic.flush()

    first = curate(cfg, store=store, workdir=tmp_path / "work")
    counts, reasons = first.counts, first.reasons
    assert counts["rows_in"] == 21 and counts["rows_in"] == counts["kept"] + counts["rejected"]
    assert counts["kept"] == 13 and counts["train_added"] + counts["holdout_added"] == 13
    assert 1 <= counts["holdout_added"] <= 8  # a 30 % share, by request id
    assert reasons == {
        "duplicate": 1,
        "invalid_answer": 1,
        "test_leak": 1,
        "duplicate_of_training": 1,
        "needs_label": 1,
        "thumbs_up_not_kept": 1,
        "other_key": 1,
        "awaiting_request": 1,
    }, reasons
    folder = store.get_dir(first.key)
    rejected = [json.loads(line) for line in (folder / "rejected.jsonl").read_text().splitlines()]
    leak = next(r for r in rejected if r["code"] == "test_leak")
    assert "test:" in leak["reason"]
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    source_rows = (demo_task / "train.jsonl").read_text().splitlines()
    assert len(train) == len(source_rows) + counts["train_added"]
    assert [json.loads(line) for line in source_rows] == train[: len(source_rows)]  # the previous data, unchanged
    curated_text = "".join((folder / name).read_text() for name in ("train.jsonl", "feedback_holdout.jsonl"))
    assert planted not in curated_text and "nowhere" not in curated_text
    assert "jo@example.com" not in "".join(p.read_text() for p in folder.iterdir())  # scrubbed in the log
    assert "<EMAIL>" in curated_text
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["previous"]["source"] == cfg.data.source and lineage["counts"] == counts
    assert len(lineage["source_segments"]["feedback"]) >= 1 and len(lineage["request_ids"]) == 13

    # Nothing new: the same version. People label the needs-labels export; it comes back as rows.
    second = curate(cfg, store=store, workdir=tmp_path / "work", now=time.time() + 7200)  # the wait ends
    assert second.version == 2 and second.reasons == {"no_request": 1}
    needs = (folder / "needs_labels.jsonl").read_text().splitlines()
    assert len(needs) == 1 and json.loads(needs[0])["question"] == "which outlet sold the most"
    labelled = tmp_path / "labels.jsonl"
    row = json.loads(needs[0]) | {"correction": "SELECT store_id FROM orders GROUP BY store_id LIMIT 1"}
    labelled.write_text(json.dumps(row) + "\n{broken\n")
    third = curate(cfg, store=store, workdir=tmp_path / "work", labels=labelled)
    assert third.version == 3 and third.counts["kept"] == 1 and third.reasons == {"bad_label": 1}
    assert third.previous_fingerprint == second.fingerprint
    added = third.counts["train_rows"] + third.counts["holdout_rows"]
    assert added == second.counts["train_rows"] + second.counts["holdout_rows"] + 1
    assert curate(cfg, store=store, workdir=tmp_path / "work").version == 3  # nothing new since


def test_pending_feedback_is_rejected_once_its_wait_is_over(demo_config, store, tmp_path: Path) -> None:
    traffic = Traffic(store)
    early = f"{int(time.time() * 1000):012x}{'d' * 16}"
    traffic.rate(early, "down", COUNT)
    traffic.flush()
    first = curate(demo_config(), store=store, workdir=tmp_path)
    assert first.reasons == {"awaiting_request": 1} and first.counts["pending"] == 1
    later = curate(demo_config(), store=store, workdir=tmp_path, now=time.time() + 7200)
    assert later.reasons == {"no_request": 1} and later.counts["pending"] == 0


def test_questions_from_logged_prompts_and_bad_labels(tmp_path: Path) -> None:
    assert question_of(alpaca_prompt("How many stores?")) == ("How many stores?", None)
    assert question_of(alpaca_prompt("Sum it", "table t")) == ("Sum it", "table t")
    assert question_of([{"role": "system", "content": "x"}, {"role": "user", "content": "Count orders"}]) == (
        "Count orders",
        None,
    )
    assert question_of("free text with no template") is None
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"request_id": "r", "question": "q", "correction": ""}\n[1]\n')
    rows, problems = read_labels(labels)
    assert rows == [] and [p[0] for p in problems] == [f"{labels}:1", f"{labels}:2"]
    assert "correction" in problems[0][1]
    with pytest.raises(CurationError, match="labels file"):
        read_labels(tmp_path / "missing.jsonl")


def test_near_duplicates_are_found_whenever_they_are_near(demo_task: Path) -> None:
    """LSH is probabilistic: every reworded test question at or above the threshold is still found."""
    questions = [
        json.loads(line)["instruction"] for line in (demo_task / "test_paraphrase.jsonl").read_text().splitlines()
    ]
    index = NearDuplicates(0.8)
    for number, question in enumerate(questions):
        index.add(str(number), question)
    variants = [("so, " + q.lower() + " thanks", q) for q in questions]
    near = [(v, q) for v, q in variants if jaccard(v, q) >= 0.8]
    assert len(near) >= 100
    assert all(index.find(v) is not None for v, _ in near)
    assert index.find("an unrelated question about the weather on mars") is None


def test_versions_are_the_models_own(store, tmp_path: Path) -> None:
    """A model's curated versions, not those of another model whose name starts the same way."""
    from tasks.curate import versions

    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "train.jsonl").write_text("{}\n")
    for key in ("curated/retail-sql/v0001", "curated/retail-sql-loop-1/v0001", "curated/retail-sql/trigger"):
        store.put_dir(folder, key)
    assert versions(store, "retail-sql") == ["curated/retail-sql/v0001"]
    assert versions(store, "retail-sql-loop-1") == ["curated/retail-sql-loop-1/v0001"]
