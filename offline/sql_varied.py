"""Corpus version 3's questions: the generic corpus's SQL shapes asked in many sentence types.

``offline/sql_corpus.py`` asks each query shape in two or three written forms. People ask the same thing as a
question, a command, a bare noun phrase or with the topic first ("Lima: how many ships?"); they shorten words
("avg", "max"), name a month instead of its number and a value in the plural ("how many pilots"), and put
the values anywhere in the sentence. A base pre-trained only on written forms reads none of that; this module
builds the question from parts (a noun phrase for the rows, a wrapper for what is asked) so that the same SQL
comes in many wordings and every value in many positions. The schemas are the generic corpus's: the demo
task's tables never appear (``tests/unit/test_demo_task.py`` checks the whole corpus).
"""

from __future__ import annotations

import random

from offline.sql_corpus import NOUNS, Column, SqlExample, Table, random_table, value, words

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
# Aggregate functions and the words people use for them, abbreviations included.
AGG_WORDS = {
    "AVG": ["average", "mean", "avg", "typical"],
    "SUM": ["total", "sum of", "combined"],
    "MAX": ["highest", "largest", "maximum", "max", "biggest", "top", "peak"],
    "MIN": ["lowest", "smallest", "minimum", "min", "least", "bottom"],
}
PLACE_POOLS = {"cities", "countries", "regions"}
KIND_POOLS = {"kinds", "levels", "colors", "genres", "statuses", "languages", "categories"}


def plural(word: str) -> str:
    """ "status" → "statuses", "city" → "cities", "role" → "roles"."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _t(t: Table) -> str:
    return words(t.name)


def _one(t: Table) -> str:
    return words(t.singular)


def rows_np(rng: random.Random, t: Table, c: Column, v: str) -> str:
    """A noun phrase for the rows of ``t`` whose text column ``c`` is ``v``, in one of many shapes."""
    tt, cc = _t(t), words(c.name)
    options = [f"{tt} with {cc} {v}", f"{tt} whose {cc} is {v}", f"{tt} having {cc} {v}", f"{tt} where {cc} is {v}"]
    if c.pool in PLACE_POOLS:
        options += [f"{tt} in {v}", f"{tt} from {v}", f"{v} {tt}", f"{tt} based in {v}", f"{tt} located in {v}"]
    if c.pool in KIND_POOLS:
        options += [f"{v} {tt}", f"{tt} of {cc} {v}", f"{tt} that are {v}"]
    if c.pool == "roles":
        options += [f"{tt} working as {v}", f"{plural(v)} among the {tt}", f"{tt} with the {v} role"]
    if c.pool in {"names", "titles"}:
        options += [f"{tt} named {v}", f"{tt} called {v}"]
    return rng.choice(options)


COUNT_WRAPPERS = [
    "How many {np}?",
    "How many {np} are there?",
    "how many {np} do we have",
    "Number of {np}",
    "number of {np}?",
    "The number of {np}.",
    "Count of {np}",
    "Count {np}.",
    "Count all {np}",
    "Total {np}?",
    "total number of {np}",
    "{np}: how many?",
    "{np} - how many",
    "{np}, count?",
    "{np} count",
    "What's the number of {np}?",
    "Tell me the count of {np}.",
    "I want to know how many {np} there are.",
    "Give me a count of {np}",
    "Find how many {np} exist.",
    "Can you count {np}?",
    "Show the number of {np}",
    "how many {np} in total",
    "Get the count of {np}",
    "What is the total count of {np}?",
]
LIST_WRAPPERS = [
    "List the {col} of {np}.",
    "{col} of {np}",
    "Show me the {col} of {np}",
    "What are the {col} values of {np}?",
    "Give the {col} of all {np}.",
    "Get {col} for {np}",
    "{np}: their {col}?",
    "{np} - list the {col}",
    "I want the {col} of every one of the {np}.",
    "Which {col} do {np} have?",
    "Find the {col} of {np}.",
    "Return the {col} of {np}",
    "display {col} of {np}",
]
AGG_WRAPPERS = [
    "What is the {agg} {num} of {np}?",
    "{agg} {num} of {np}",
    "{agg} {num} for {np}?",
    "{np}: {agg} {num}?",
    "{np} - {agg} {num}",
    "Give me the {agg} {num} among {np}.",
    "what's the {agg} {num} across {np}",
    "Find the {agg} {num} of {np}.",
    "Tell me the {agg} {num} of {np}",
    "Compute the {agg} {num} over {np}.",
    "{agg} {num} among {np}",
    "I need to know the {agg} {num} of {np}.",
]


def _count(rng: random.Random, np: str) -> str:
    return rng.choice(COUNT_WRAPPERS).format(np=np)


def v_count(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols():
        return None
    c = rng.choice(t.text_cols())
    vq, vs = value(rng, c)
    if rng.random() < 0.2:  # the value first, the question after it
        q = rng.choice([f"{vq}: how many {_t(t)}?", f"{vq} - number of {_t(t)}", f"In {vq}, how many {_t(t)}?"])
        if c.pool not in PLACE_POOLS:
            q = rng.choice(
                [f"{words(c.name)} {vq}: how many {_t(t)}?", f"For {words(c.name)} {vq}, count the {_t(t)}."]
            )
    else:
        q = _count(rng, rows_np(rng, t, c, vq))
    return q, f"SELECT COUNT(*) FROM {t.name} WHERE {c.name} = {vs};"


def v_count_two(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    """Two filters: a text value and a number (a year, a price bound)."""
    if not t.text_cols() or not t.num_cols():
        return None
    c, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    vq, vs = value(rng, c)
    nq, ns = value(rng, n)
    if n.name.endswith("year") and rng.random() < 0.6:
        tail, op = rng.choice([f"in {nq}", f"during {nq}", f"for {nq}", f"from {nq}"]), "="
        np = rng.choice([f"{rows_np(rng, t, c, vq)} {tail}", f"{nq} {rows_np(rng, t, c, vq)}"])
    else:
        op, w = rng.choice([(">", ["above", "over", "more than"]), ("<", ["below", "under", "less than"])])
        op_word = rng.choice(w)
        np = f"{rows_np(rng, t, c, vq)} and {words(n.name)} {op_word} {nq}"
    sql = f"SELECT COUNT(*) FROM {t.name} WHERE {c.name} = {vs} AND {n.name} {op} {ns};"
    return _count(rng, np), sql


def v_month(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    """Rows of a year and a month, the month named ("June 2021", "jun of 2021"); ``t`` has both columns
    (:func:`with_month`)."""
    months = [c for c in t.columns if c.name.endswith("_month")]
    if not months:
        return None
    prefix = months[0].name.removesuffix("_month")
    year, month = rng.randint(2015, 2025), rng.randint(1, 12)
    name = MONTHS[month - 1]
    said = rng.choice([name, name, name[:3]])
    when = rng.choice([f"{said} {year}", f"{said} of {year}", f"{said}, {year}", f"{year} {said}"])
    np = rng.choice([f"{_t(t)} in {when}", f"{_t(t)} from {when}", f"{_t(t)} during {when}", f"{when} {_t(t)}"])
    q = rng.choice([_count(rng, np), f"{when}: how many {_t(t)}?", f"In {when}, how many {_t(t)} were there?"])
    return q, f"SELECT COUNT(*) FROM {t.name} WHERE {prefix}_year = {year} AND {prefix}_month = {month};"


def with_month(rng: random.Random, t: Table) -> Table:
    """``t`` with a year and a month column of one event ("start_year", "start_month")."""
    prefix = rng.choice(["event", "start", "order", "release", "signup", "birth", "visit"])
    extra = (Column(f"{prefix}_year", "int", "", 2015, 2025), Column(f"{prefix}_month", "int", "", 1, 12))
    kept = tuple(c for c in t.columns if not c.name.endswith(("_month", "_year")))
    return Table(t.name, t.singular, kept + extra)


def v_list(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if len(t.text_cols()) < 1:
        return None
    c = rng.choice(t.text_cols())
    out = rng.choice(t.columns)
    vq, vs = value(rng, c)
    q = rng.choice(LIST_WRAPPERS).format(col=words(out.name), np=rows_np(rng, t, c, vq))
    return q, f"SELECT {out.name} FROM {t.name} WHERE {c.name} = {vs};"


def v_list_num(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols() or not t.num_cols():
        return None
    out, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    nq, ns = value(rng, n)
    op, w = rng.choice(
        [(">", ["above", "over", "more than", "greater than"]), ("<", ["below", "under", "less than", "cheaper than"])]
    )
    tt, nn = _t(t), words(n.name)
    np = rng.choice(
        [
            f"{tt} with {nn} {rng.choice(w)} {nq}",
            f"{tt} whose {nn} is {rng.choice(w)} {nq}",
            f"{tt} {rng.choice(w)} {nq} {nn}",
        ]
    )
    q = rng.choice(LIST_WRAPPERS).format(col=words(out.name), np=np)
    return q, f"SELECT {out.name} FROM {t.name} WHERE {n.name} {op} {ns};"


def v_agg(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.num_cols():
        return None
    n = rng.choice(t.num_cols())
    fn = rng.choice(list(AGG_WORDS))
    agg = rng.choice(AGG_WORDS[fn])
    if t.text_cols() and rng.random() < 0.7:
        c = rng.choice(t.text_cols())
        vq, vs = value(rng, c)
        np, where = rows_np(rng, t, c, vq), f" WHERE {c.name} = {vs}"
    else:
        np, where = rng.choice([f"all {_t(t)}", _t(t), f"our {_t(t)}", f"every {_one(t)}"]), ""
    q = rng.choice(AGG_WRAPPERS).format(agg=agg, num=words(n.name), np=np)
    return q, f"SELECT {fn}({n.name}) FROM {t.name}{where};"


def v_top(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols() or not t.num_cols():
        return None
    c, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    tt, nn, cc = _t(t), words(n.name), words(c.name)
    desc = rng.random() < 0.55
    high = ["highest", "largest", "biggest", "top", "most"] if desc else ["lowest", "smallest", "least", "bottom"]
    w = rng.choice(high)
    order = "DESC" if desc else "ASC"
    if rng.random() < 0.35:  # the single best row
        q = rng.choice(
            [
                f"Which {_one(t)} has the {w} {nn}?",
                f"{_one(t)} with the {w} {nn}?",
                f"the {_one(t)} with the {w} {nn} - its {cc}",
                f"{cc} of the {_one(t)} with the {w} {nn}",
                f"What's the {cc} of the {w} {nn} {_one(t)}?",
            ]
        )
        return q, f"SELECT {c.name} FROM {t.name} ORDER BY {n.name} {order} LIMIT 1;"
    k = rng.randint(2, 10)
    edge = "top" if desc else "bottom"
    q = rng.choice(
        [
            f"{edge} {k} {tt} by {nn}",
            f"The {k} {tt} with the {w} {nn}.",
            f"Show {k} {tt} with the {w} {nn}, their {cc}",
            f"{cc} of the {k} {tt} with the {w} {nn}?",
            f"Which {k} {tt} have the {w} {nn}?",
            f"give me the {k} {w} {nn} {tt}",
            f"{tt}: the {k} with the {w} {nn}",
        ]
    )
    return q, f"SELECT {c.name} FROM {t.name} ORDER BY {n.name} {order} LIMIT {k};"


def v_group(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols():
        return None
    c = rng.choice(t.text_cols())
    tt, cc = _t(t), words(c.name)
    if t.num_cols() and rng.random() < 0.4:
        n = rng.choice(t.num_cols())
        fn = rng.choice(list(AGG_WORDS))
        agg = rng.choice(AGG_WORDS[fn])
        q = rng.choice(
            [
                f"{agg} {words(n.name)} of {tt} per {cc}",
                f"For each {cc}, the {agg} {words(n.name)} of {tt}?",
                f"{agg} {words(n.name)} by {cc} for {tt}",
                f"show {tt}' {agg} {words(n.name)} grouped by {cc}",
                f"What is the {agg} {words(n.name)} of {tt} in each {cc}?",
            ]
        )
        return q, f"SELECT {c.name}, {fn}({n.name}) FROM {t.name} GROUP BY {c.name};"
    q = rng.choice(
        [
            f"{tt} per {cc}",
            f"Number of {tt} by {cc}",
            f"How many {tt} in each {cc}?",
            f"Count {tt} grouped by {cc}.",
            f"{cc} breakdown of {tt}",
            f"For every {cc}, how many {tt}?",
            f"{tt} count by {cc}?",
            f"split the {tt} by {cc} and count them",
            f"Each {cc} with its number of {tt}",
        ]
    )
    return q, f"SELECT {c.name}, COUNT(*) FROM {t.name} GROUP BY {c.name};"


def v_distinct(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols():
        return None
    c = rng.choice(t.text_cols())
    tt, cc = _t(t), words(c.name)
    q = rng.choice(
        [
            f"What {cc} values do {tt} have?",
            f"distinct {cc} of {tt}",
            f"Which {plural(cc)} appear among {tt}?",
            f"all the different {cc} of our {tt}",
            f"{tt}: which {plural(cc)} are there?",
            f"List every {cc} found among {tt}.",
        ]
    )
    return q, f"SELECT DISTINCT {c.name} FROM {t.name};"


def _join(child: Table, parent: Table) -> str:
    return f"{child.name} JOIN {parent.name} ON {child.name}.{parent.singular}_id = {parent.name}.id"


def parent_np(rng: random.Random, parent: Table, p: Column, v: str) -> str:
    """The parent row a question is about: "the Lima station", "station Lima", "the station in Lima"."""
    one = _one(parent)
    options = [f"the {one} with {words(p.name)} {v}", f"{one} {v}"]
    if p.pool in PLACE_POOLS:
        options += [f"the {v} {one}", f"the {one} in {v}", f"our {v} {one}"]
    elif p.pool in {"names", "titles"}:
        options += [f"the {one} named {v}", f"{v}"]
    else:
        options += [f"{v} {words(parent.name)}"]
    return rng.choice(options)


def v_join_count(rng: random.Random, child: Table, parent: Table) -> tuple[str, str] | None:
    if not parent.text_cols():
        return None
    p = rng.choice(parent.text_cols())
    vq, vs = value(rng, p)
    pn, ct = parent_np(rng, parent, p, vq), words(child.name)
    where = f"{parent.name}.{p.name} = {vs}"
    if child.text_cols() and rng.random() < 0.4:  # and a filter on the child
        c = rng.choice(child.text_cols())
        cq, cs = value(rng, c)
        q = rng.choice(
            [
                _count(rng, f"{rows_np(rng, child, c, cq)} of {pn}"),
                f"{pn}: how many {rows_np(rng, child, c, cq)}?",
                f"How many {rows_np(rng, child, c, cq)} does {pn} have?",
            ]
        )
        where += f" AND {child.name}.{c.name} = {cs}"
    else:
        q = rng.choice(
            [
                _count(rng, f"{ct} of {pn}"),
                _count(rng, f"{ct} at {pn}"),
                f"How many {ct} does {pn} have?",
                f"{pn}: how many {ct}?",
                f"{pn} - number of {ct}",
                f"how many {ct} belong to {pn}",
            ]
        )
    return q, f"SELECT COUNT(*) FROM {_join(child, parent)} WHERE {where};"


def v_join_list(rng: random.Random, child: Table, parent: Table) -> tuple[str, str] | None:
    if not child.text_cols() or not parent.text_cols():
        return None
    c, p = rng.choice(child.text_cols()), rng.choice(parent.text_cols())
    vq, vs = value(rng, p)
    pn, ct, cc = parent_np(rng, parent, p, vq), words(child.name), words(c.name)
    q = rng.choice(
        [
            f"{cc} of the {ct} of {pn}",
            f"List the {cc} of {ct} at {pn}.",
            f"Who are the {ct} of {pn}? Give their {cc}.",
            f"{pn}: {ct} {plural(cc)}?",
            f"show me {pn}'s {ct}",
            f"Which {ct} belong to {pn}?",
            f"{ct} of {pn} - their {cc}",
        ]
    )
    return q, f"SELECT {child.name}.{c.name} FROM {_join(child, parent)} WHERE {parent.name}.{p.name} = {vs};"


def v_join_sum(rng: random.Random, child: Table, parent: Table) -> tuple[str, str] | None:
    if not child.num_cols() or not parent.text_cols():
        return None
    n, p = rng.choice(child.num_cols()), rng.choice(parent.text_cols())
    fn = rng.choice(["SUM", "SUM", "AVG", "MAX", "MIN"])
    agg = rng.choice(AGG_WORDS[fn])
    vq, vs = value(rng, p)
    pn, ct, nn = parent_np(rng, parent, p, vq), words(child.name), words(n.name)
    q = rng.choice(
        [
            f"{agg} {nn} of the {ct} of {pn}",
            f"What is the {agg} {nn} of {ct} for {pn}?",
            f"{pn}: {agg} {nn} of its {ct}?",
            f"{vq}: {agg} {nn}?",
            f"how much {nn} in {agg} for {pn}",
        ]
    )
    sql = f"SELECT {fn}({child.name}.{n.name}) FROM {_join(child, parent)} WHERE {parent.name}.{p.name} = {vs};"
    return q, sql


def v_join_group(rng: random.Random, child: Table, parent: Table) -> tuple[str, str] | None:
    if not parent.text_cols():
        return None
    p = rng.choice(parent.text_cols())
    ct, one, pp = words(child.name), _one(parent), words(p.name)
    q = rng.choice(
        [
            f"{ct} per {one} {pp}",
            f"number of {ct} by {one} {pp}",
            f"How many {ct} has each {one} {pp}?",
            f"every {one} {pp} with its count of {ct}",
            f"{ct} count for each {one} {pp}",
        ]
    )
    return q, (f"SELECT {parent.name}.{p.name}, COUNT(*) FROM {_join(child, parent)} GROUP BY {parent.name}.{p.name};")


VARIED_SINGLE = [v_count, v_count_two, v_month, v_list, v_list_num, v_agg, v_top, v_group, v_distinct]
VARIED_JOINED = [v_join_count, v_join_list, v_join_sum, v_join_group]


def generate_varied_example(rng: random.Random) -> SqlExample:
    """One question/SQL pair over a freshly invented schema, the question in one of many sentence types."""
    while True:
        child_noun, parent_noun = rng.sample(NOUNS, 2)
        child, parent = random_table(rng, child_noun), random_table(rng, parent_noun)
        joined = rng.random() < 0.3
        template = rng.choice(VARIED_JOINED if joined else VARIED_SINGLE)
        if template is v_month:
            child = with_month(rng, child)
        pair = template(rng, child, parent)
        if pair is not None:
            ddl = (parent.ddl(), child.ddl(parent)) if joined else (child.ddl(),)
            return SqlExample(pair[0], pair[1], ddl)
