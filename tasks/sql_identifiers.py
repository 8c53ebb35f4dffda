"""Invented identifiers: tables and columns a generated query names that the database does not have.

A model that has not learnt a schema writes plausible SQL over tables that do not exist (``custommployees``)
or columns of the wrong table. Execution accuracy counts such a query as wrong, like any other miss; this
check says *why*, with a real SQL parser (sqlglot, SQLite dialect) rather than regular expressions:

    schema = read_schema(Path("retail.db"))
    invented_identifiers("SELECT name FROM clients", schema)   # ['clients', 'clients.name']

Unqualified columns must belong to one of the tables the query reads; qualified ones (``t.col``, aliases
resolved) to that table. Names the query defines itself — CTEs, subquery and column aliases — are its own.
"""

from __future__ import annotations

from pathlib import Path

import sqlglot
from sqlglot import exp

from infra.sql_grammar import sqlite_columns

Schema = dict[str, set[str]]  # table -> its columns, lower case
STATEMENTS = (exp.Query, exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop)


def read_schema(database: Path) -> Schema:
    """Tables and columns of a SQLite file, read-only."""
    return {t.lower(): {c.lower() for c in columns} for t, columns in sqlite_columns(database).items()}


def invented_identifiers(sql: str, schema: Schema) -> list[str] | None:
    """The tables (``name``) and columns (``table.column``, or ``?.column`` when unqualified) that ``sql``
    names and ``schema`` lacks, in order of appearance; ``None`` when the text is not a parseable query."""
    try:
        statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError):
        return None
    if not statements or not all(isinstance(s, STATEMENTS) for s in statements):
        return None
    invented: list[str] = []

    def add(name: str) -> None:
        if name not in invented:
            invented.append(name)

    for statement in statements:
        own_tables = {cte.alias_or_name.lower() for cte in statement.find_all(exp.CTE)}
        own_tables |= {sq.alias.lower() for sq in statement.find_all(exp.Subquery) if sq.alias}
        own_columns = {a.alias.lower() for a in statement.find_all(exp.Alias) if a.alias}
        alias_of: dict[str, str] = {}
        read: set[str] = set()
        for table in statement.find_all(exp.Table):
            name = table.name.lower()
            if not name:
                continue
            alias_of[table.alias_or_name.lower()] = name
            alias_of[name] = name
            if name in own_tables:
                continue
            read.add(name)
            if name not in schema:
                add(name)
        for column in statement.find_all(exp.Column):
            name = column.name.lower()
            if not name or name == "*" or name in own_columns:
                continue
            qualifier = column.table.lower()
            if qualifier:
                table = alias_of.get(qualifier, qualifier)
                if table in own_tables:
                    continue
                if table not in schema:
                    add(table)
                elif name not in schema[table]:
                    add(f"{table}.{name}")
            elif (
                read and not own_tables and all(t in schema for t in read) and not any(name in schema[t] for t in read)
            ):
                add(f"?.{name}")  # unqualified: none of the tables it reads has it (unknowable when it reads its own)
    return invented
