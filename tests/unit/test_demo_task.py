"""The demo task: every gold query runs, splits are disjoint, the paraphrase split is kept apart from training,
output is deterministic, the schema is unseen by the base."""

from __future__ import annotations

import json
import random
import re
import sqlite3
from pathlib import Path

from offline import paraphrases
from offline.demo_task import TRAIN_FORMS, TRAINING, build_demo_task
from offline.sql_corpus import SqlExample, generate_example
from offline.sql_varied import MONTHS, generate_varied_example
from tasks.sql_exec import connect_readonly, execute_sql

DEMO_TABLES = {"customers", "products", "stores", "employees", "orders", "order_items"}


def load(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sizes_and_shape(demo_task: Path) -> None:
    train, test = load(demo_task / "train.jsonl"), load(demo_task / "test.jsonl")
    paraphrase = load(demo_task / "test_paraphrase.jsonl")
    assert len(train) >= 2000 and len(test) >= 300 and len(paraphrase) >= 300
    assert all(set(row) == {"instruction", "response"} for row in train + test + paraphrase)
    db = sqlite3.connect(demo_task / "retail.db")
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == DEMO_TABLES
    total = sum(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables)
    assert total >= 3000
    db.execute("PRAGMA foreign_keys = ON")
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_every_gold_query_runs_and_returns_rows(demo_task: Path) -> None:
    conn = connect_readonly(demo_task / "retail.db")
    for row in (
        load(demo_task / "train.jsonl") + load(demo_task / "test.jsonl") + load(demo_task / "test_paraphrase.jsonl")
    ):
        result = execute_sql(conn, row["response"])
        assert result.ok, (row, result.error)
        assert result.rows, row


def test_splits_share_no_question(demo_task: Path) -> None:
    train = [r["instruction"] for r in load(demo_task / "train.jsonl")]
    test = [r["instruction"] for r in load(demo_task / "test.jsonl")]
    paraphrase = [r["instruction"] for r in load(demo_task / "test_paraphrase.jsonl")]
    assert len(set(train)) == len(train) and len(set(test)) == len(test) and len(set(paraphrase)) == len(paraphrase)
    assert not set(train) & set(test) and not set(train) & set(paraphrase) and not set(test) & set(paraphrase)
    # nor after casing and punctuation are taken away
    bare = lambda q: re.sub(r"[^a-z0-9 ]", "", q.lower()).split()  # noqa: E731
    assert not {tuple(bare(q)) for q in train} & {tuple(bare(q)) for q in test + paraphrase}


def form_pattern(form: str) -> re.Pattern[str]:
    """A sentence form as a pattern over questions: a slot matches one word, or two for the slots whose values
    can have two ("Solar Lamp", "staff members"); case and final punctuation are free."""
    one, two = r"[\w'$-]+", r"[\w'$-]+(?: [\w'-]+)?"
    pieces = re.split(r"(\{\w+\})", form.rstrip("?.!"))
    body = "".join(
        (two if p.strip("{}") in {"title", "who", "who1", "what", "what1", "shop", "shop1"} else one)
        if p.startswith("{")
        else re.escape(p)
        for p in pieces
    )
    return re.compile(rf"\b{body}\b", re.IGNORECASE)


def test_the_paraphrase_split_is_kept_apart_from_training(demo_task: Path) -> None:
    """No training sentence form appears in a paraphrase question (and no paraphrase form in a training
    question); the paraphrase split's own table words and informal markers never occur in training."""
    train = [r["instruction"] for r in load(demo_task / "train.jsonl")]
    paraphrase = [r["instruction"] for r in load(demo_task / "test_paraphrase.jsonl")]
    training_forms = [f for fs in TRAINING.forms.values() for f in fs]
    paraphrase_forms = [f for fs in paraphrases.FORMS.values() for f in fs]
    assert set(paraphrases.FORMS) == set(TRAIN_FORMS)  # the same intents
    assert not {f.lower() for f in training_forms} & {f.lower() for f in paraphrase_forms}
    for form in training_forms:
        pattern = form_pattern(form)
        hits = [q for q in paraphrase if pattern.search(q)]
        assert not hits, f"training form {form!r} appears in paraphrase questions: {hits[:3]}"
    for form in paraphrase_forms:
        pattern = form_pattern(form)
        hits = [q for q in train if pattern.fullmatch(q.rstrip("?.!"))]
        assert not hits, f"paraphrase form {form!r} words training questions: {hits[:3]}"
    held_out = [w for words in paraphrases.HELD_OUT_SYNONYMS.values() for w in words]
    singulars = {w: paraphrases.HELD_OUT_SINGULAR[w] for w in held_out}
    own_singulars = [s for s in singulars.values() if s not in {"product", "staff member"}]  # those are training's
    markers = [*held_out, *own_singulars, "please", "quick question", "thx", "thanks", "hey", "i need"]
    words_of = lambda q: " " + re.sub(r"[^a-z0-9 ]", " ", q.lower()) + " "  # noqa: E731
    for marker in markers:
        assert not [q for q in train if f" {marker} " in words_of(q)], marker
    # and the paraphrase split does use them: it is not the training split in disguise
    used = [
        m for m in held_out if any(f" {m} " in words_of(q) or f" {singulars[m]} " in words_of(q) for q in paraphrase)
    ]
    assert len(used) == len(held_out)
    informal = sum(q != q[:1].upper() + q[1:] or not q.endswith(("?", ".")) for q in paraphrase)
    assert informal / len(paraphrase) > 0.5


def test_covers_joins_aggregates_filters_ordering(demo_task: Path) -> None:
    sql = [r["response"] for r in load(demo_task / "train.jsonl")]
    for construct in (
        " JOIN ",
        "COUNT(*)",
        "SUM(",
        "AVG(",
        "MAX(",
        "MIN(",
        " WHERE ",
        " AND ",
        " GROUP BY ",
        " ORDER BY ",
        " LIMIT ",
        "DISTINCT",
        " > ",
        " < ",
    ):
        share = sum(construct in s for s in sql) / len(sql)
        assert share > 0.01, f"{construct!r} in only {share:.1%} of the train queries"


def test_deterministic(demo_task: Path, tmp_path: Path) -> None:
    build_demo_task(tmp_path)
    for name in ("train.jsonl", "test.jsonl", "test_paraphrase.jsonl", "schema.sql"):
        assert (tmp_path / name).read_bytes() == (demo_task / name).read_bytes(), name
    dump = lambda p: list(sqlite3.connect(p).iterdump())  # noqa: E731
    assert dump(tmp_path / "retail.db") == dump(demo_task / "retail.db")


def test_generic_corpus_never_uses_the_demo_tables() -> None:
    rng = random.Random(1)
    for make in (generate_example, generate_varied_example):
        for _ in range(5000):
            sql = make(rng).sql
            tables = set(re.findall(r"(?:FROM|JOIN) (\w+)", sql))
            assert not tables & DEMO_TABLES, sql


def test_the_varied_corpus_runs_on_its_schema_and_says_every_value() -> None:
    """Corpus version 3's questions: each query runs on the schema it was asked over, every value the SQL
    filters on is in the question (a month as its name), and the questions come in many more sentence types than
    the written corpus's."""
    rng = random.Random(2)
    skeletons_varied: set[str] = set()
    months = 0
    for _ in range(3000):
        ex = generate_varied_example(rng)
        db = sqlite3.connect(":memory:")
        for ddl in ex.ddl:
            db.execute(ddl)
        db.execute(ex.sql)  # raises on a column or table the schema lacks
        for literal in re.findall(r"'([^']*)'", ex.sql):
            assert literal in ex.question, (literal, ex.question)
        if month := re.search(r"_month = (\d+)", ex.sql):
            name = MONTHS[int(month.group(1)) - 1]
            assert name[:3] in ex.question, (name, ex.question)
            months += 1
        skeletons_varied.add(skeleton(ex))
    assert months > 100, months
    rng = random.Random(2)
    skeletons_written = {skeleton(generate_example(rng)) for _ in range(3000)}
    assert len(skeletons_varied) > 3 * len(skeletons_written), (len(skeletons_varied), len(skeletons_written))


def skeleton(ex: SqlExample) -> str:
    """A question with its schema words and values taken out: what is left is its sentence type."""

    def stem(word: str) -> str:
        if word.endswith("ies"):
            return word[:-3] + "y"
        if word.endswith(("ses", "xes", "ches", "shes")):
            return word[:-2]
        return word.removesuffix("s")

    names = {stem(w) for ddl in ex.ddl for ident in re.findall(r"[a-z_]+", ddl) for w in ident.split("_")}
    values = {w.lower() for literal in re.findall(r"'([^']*)'", ex.sql) for w in literal.split()}
    words = re.findall(r"[a-z0-9']+|[^a-z0-9' ]", re.sub(r"\d+\.\d+", "0", ex.question.lower()))
    out = ["_" if w.isdigit() or w in values or stem(w) in names else w for w in words]
    return re.sub(r"_( _)+", "_", " ".join(out))


def test_the_typed_corpus_keeps_every_value_and_version_1_is_unchanged() -> None:
    """Corpus version 2 types half its questions as people do; the values the SQL filters on keep their letters
    (a slipped letter never lands in one), the SQL is untouched, and version 1 (the shipped base) is not moved."""
    from offline.sql_corpus import corpus, typed_by_people

    rng = random.Random(3)
    changed = 0
    for _ in range(2000):
        ex = generate_example(rng)
        typed = typed_by_people(rng, ex.question, ex.sql)
        changed += typed != ex.question
        for literal in re.findall(r"'([^']*)'", ex.sql):
            for word in literal.split():
                assert word.lower() in typed.lower(), (literal, typed)
    assert changed > 1000
    plain, also_plain = corpus(5, "</s>"), corpus(5, "</s>", typed_share=0.0)
    assert [next(plain) for _ in range(200)] == [next(also_plain) for _ in range(200)]
    typed_docs = corpus(5, "</s>", typed_share=0.5)
    questions = [
        d.split("### Instruction:\n", 1)[1].split("\n", 1)[0]
        for d in (next(typed_docs) for _ in range(400))
        if "### Instruction:" in d
    ]
    assert sum(q == q.lower() for q in questions) > 0.1 * len(questions)  # some typed in lower case
