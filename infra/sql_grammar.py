"""Schema-constrained decoding: a grammar that admits only queries over a database's own tables and columns.

A text-to-SQL model that misreads a question often writes a column of the wrong table (``customers.unit_price``)
or a name no table has. With ``evaluate.decoding: sql_schema`` the evaluation asks vLLM for every answer under a
grammar built from the task's database (vLLM's structured outputs, xgrammar's GBNF), and the gateway serves the
registered version under the same grammar, so the model is measured as users get it. The grammar is built per
*scope* — the tables one ``FROM`` clause reads — so a query can only name columns of the tables it reads:

    schema = read_sql_schema(Path("retail.db"))
    grammar = sql_grammar(schema)     # pass as {"structured_outputs": {"grammar": grammar}}

The language is one ``SELECT`` over one table, or two tables joined along a foreign key (``JOIN … ON a.fk =
b.key``), with ``DISTINCT``, aggregates (``COUNT``, ``SUM``, ``AVG``, ``MIN``, ``MAX``), ``WHERE`` conditions
joined by ``AND``/``OR``, ``GROUP BY`` / ``HAVING``, ``ORDER BY`` and ``LIMIT``; keywords upper case, single
spaces, no table aliases, subqueries or set operations. Tasks that need more keep ``decoding: free``.
The schema travels with a registered version as a compact JSON tag (:func:`schema_json`), from which the gateway
rebuilds the same grammar.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

MAX_SCHEMA_JSON = 5000  # an MLflow tag value's limit
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SchemaGrammarError(ValueError):
    """The schema cannot be written as a decoding grammar (a name outside plain SQL identifiers, too large)."""


@dataclass(frozen=True)
class SqlSchema:
    """Tables (with their columns, in order) and the foreign keys between them."""

    tables: tuple[tuple[str, tuple[str, ...]], ...]
    foreign_keys: tuple[tuple[str, str, str, str], ...]  # (table, column, referenced table, referenced column)

    def columns(self, table: str) -> tuple[str, ...]:
        return dict(self.tables)[table]


def sqlite_columns(database: Path) -> dict[str, tuple[str, ...]]:
    """Every table and view of a SQLite file with its columns in order, read-only."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
        return {t: tuple(row[1] for row in conn.execute(f'PRAGMA table_info("{t}")')) for t in names}
    finally:
        conn.close()


def read_sql_schema(database: Path) -> SqlSchema:
    """The tables, columns and foreign keys of a SQLite file, read-only, in a stable order."""
    columns = sqlite_columns(database)
    names = sorted(n for n in columns if not n.startswith("sqlite_"))
    tables = tuple((t, columns[t]) for t in names)
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        keys = []
        for t in names:
            for row in conn.execute(f'PRAGMA foreign_key_list("{t}")'):
                ref_table, column, ref_column = row[2], row[3], row[4]
                if ref_column is None:  # REFERENCES t without a column: its primary key
                    pk = [r[1] for r in conn.execute(f'PRAGMA table_info("{ref_table}")') if r[5]]
                    ref_column = pk[0] if len(pk) == 1 else None
                if ref_column is not None and ref_table in names:
                    keys.append((t, column, ref_table, ref_column))
    finally:
        conn.close()
    schema = SqlSchema(tables, tuple(sorted(keys)))
    _check_names(schema, str(database))
    return schema


def _check_names(schema: SqlSchema, where: str) -> None:
    for table, columns in schema.tables:
        for name in (table, *columns):
            if not IDENTIFIER.fullmatch(name):
                raise SchemaGrammarError(
                    f"{where}: {name!r} is not a plain SQL identifier; decoding: sql_schema needs tables and columns "
                    "named [A-Za-z_][A-Za-z0-9_]* (use decoding: free)"
                )


def schema_json(schema: SqlSchema) -> str:
    """The schema as the compact JSON a registered version carries (an MLflow tag, ≤ 5,000 characters)."""
    text = json.dumps(
        {"tables": {t: list(c) for t, c in schema.tables}, "foreign_keys": [list(k) for k in schema.foreign_keys]},
        separators=(",", ":"),
    )
    if len(text) > MAX_SCHEMA_JSON:
        raise SchemaGrammarError(
            f"the schema is {len(text):,} characters as JSON, more than a registry tag holds ({MAX_SCHEMA_JSON:,}); "
            "decoding: sql_schema suits task databases of a few dozen tables"
        )
    return text


def schema_from_json(text: str) -> SqlSchema:
    """The inverse of :func:`schema_json`; a malformed tag raises :class:`SchemaGrammarError`."""
    try:
        data = json.loads(text)
        tables = tuple((str(t), tuple(str(c) for c in cols)) for t, cols in data["tables"].items())
        keys = tuple(tuple(str(x) for x in k) for k in data["foreign_keys"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SchemaGrammarError(f"not a schema tag: {exc}") from exc
    if any(len(k) != 4 for k in keys):
        raise SchemaGrammarError("not a schema tag: a foreign key is not (table, column, table, column)")
    schema = SqlSchema(tables, keys)  # type: ignore[arg-type]
    _check_names(schema, "schema tag")
    return schema


def _alternatives(options: list[str]) -> str:
    return " | ".join(options)


def _literal(text: str) -> str:
    return json.dumps(text)  # identifiers and keywords only: no character needs GBNF escaping beyond JSON's


def _scopes(schema: SqlSchema) -> list[tuple[list[str], str]]:
    """Every FROM clause the grammar admits: (tables read, the clause's text after ``FROM``)."""
    scopes = [([t], _literal(t)) for t, _ in schema.tables]
    for table, column, ref, ref_column in schema.foreign_keys:
        if table == ref:
            continue
        left, right = f"{table}.{column}", f"{ref}.{ref_column}"
        on = f'" ON " ({_literal(f"{left} = {right}")} | {_literal(f"{right} = {left}")})'
        for first, second in ((table, ref), (ref, table)):
            scopes.append(([first, second], f"{_literal(first)} join {_literal(second)} {on}"))
    return scopes


@functools.lru_cache(maxsize=64)
def sql_grammar(schema: SqlSchema) -> str:
    """The GBNF grammar (xgrammar, vLLM's ``structured_outputs.grammar``) of the queries ``schema`` admits."""
    rules = []
    scope_rules = []
    for i, (tables, clause) in enumerate(_scopes(schema)):
        columns = []
        for table in tables:
            columns += [_literal(f"{table}.{c}") for c in schema.columns(table)]
        columns += [_literal(c) for c in dict.fromkeys(c for t in tables for c in schema.columns(t))]
        s = f"s{i}"
        rules += [
            f'{s} ::= distinct? {s}-item (", " {s}-item)* " FROM " {clause} {s}-where? {s}-group? {s}-order? limit?',
            f"{s}-col ::= {_alternatives(columns)}",
            f'{s}-agg ::= "COUNT(*)" | agg "(" "DISTINCT "? {s}-col ")"',
            f'{s}-item ::= "*" | {s}-agg | {s}-col',
            f'{s}-where ::= " WHERE " {s}-cond ((" AND " | " OR ") {s}-cond)*',
            f'{s}-cond ::= {s}-col " " cmp " " value | {s}-col " IN (" value (", " value)* ")" '
            f'| {s}-col " BETWEEN " value " AND " value | {s}-col " IS " "NOT "? "NULL"',
            f'{s}-group ::= " GROUP BY " {s}-col (", " {s}-col)* (" HAVING " {s}-agg " " cmp " " value)?',
            f'{s}-order ::= " ORDER BY " {s}-key (", " {s}-key)*',
            f'{s}-key ::= ({s}-agg | {s}-col) (" ASC" | " DESC")?',
        ]
        scope_rules.append(s)
    head = [
        f'root ::= "SELECT " ({_alternatives(scope_rules)}) ";"?',
        'distinct ::= "DISTINCT "',
        'join ::= " JOIN " | " INNER JOIN " | " LEFT JOIN "',
        'agg ::= "COUNT" | "SUM" | "AVG" | "MIN" | "MAX"',
        'cmp ::= "=" | "!=" | "<>" | "<=" | ">=" | "<" | ">" | "LIKE" | "NOT LIKE"',
        "value ::= string | number",
        'string ::= "\'" ([^\'\\n] | "\'\'")* "\'"',
        'number ::= "-"? [0-9]+ ("." [0-9]+)?',
        'limit ::= " LIMIT " [0-9]+',
    ]
    return "\n".join(head + rules) + "\n"


def decoding_fields(schema: SqlSchema) -> dict[str, dict[str, str]]:
    """The request fields that make vLLM answer under ``schema``'s grammar (OpenAI completions and chat)."""
    return {"structured_outputs": {"grammar": sql_grammar(schema)}}


@functools.lru_cache(maxsize=64)
def tagged_decoding(tag: str | None) -> dict[str, dict[str, str]]:
    """The request fields for a registered version whose schema tag is ``tag`` (none: free decoding)."""
    return decoding_fields(schema_from_json(tag)) if tag else {}
