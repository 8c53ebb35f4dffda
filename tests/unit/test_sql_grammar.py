"""The schema behind schema-constrained decoding: read from the database with its foreign keys, carried as a
registry tag and read back, and refused with the reason where a grammar cannot hold it."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from infra.sql_grammar import (
    SchemaGrammarError,
    SqlSchema,
    read_sql_schema,
    schema_from_json,
    schema_json,
    sql_grammar,
    tagged_decoding,
)
from offline.demo_task import build_database
from tasks.config import EvalConfig


@pytest.fixture(scope="module")
def retail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "retail.db"
    build_database(path)
    return path


def test_the_schema_has_every_table_column_and_foreign_key(retail: Path) -> None:
    schema = read_sql_schema(retail)
    tables = dict(schema.tables)
    assert set(tables) == {"customers", "products", "stores", "employees", "orders", "order_items"}
    assert tables["orders"] == ("order_id", "customer_id", "store_id", "order_year", "order_month", "status")
    assert ("orders", "customer_id", "customers", "customer_id") in schema.foreign_keys
    assert ("order_items", "product_id", "products", "product_id") in schema.foreign_keys
    assert len(schema.foreign_keys) == 5


def test_the_tag_round_trips_and_stays_under_the_registry_limit(retail: Path) -> None:
    schema = read_sql_schema(retail)
    tag = schema_json(schema)
    assert len(tag) < 1000 and schema_from_json(tag) == schema
    assert tagged_decoding(tag) == {"structured_outputs": {"grammar": sql_grammar(schema)}}
    assert tagged_decoding(None) == {} and tagged_decoding("") == {}


def test_the_grammar_scopes_columns_to_the_tables_a_query_reads(retail: Path) -> None:
    grammar = sql_grammar(read_sql_schema(retail))
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    scopes = {name: body for name, body in rules.items() if re.fullmatch(r"s[0-9]+", name)}
    # one scope per table and one per join direction of each foreign key
    assert len(scopes) == 6 + 2 * 5
    customers = next(n for n, body in scopes.items() if body.split('" FROM " ')[1].startswith('"customers" s'))
    columns = rules[f"{customers}-col"]
    assert '"segment"' in columns and '"customers.city"' in columns
    assert '"unit_price"' not in columns and "products" not in columns  # no other table's columns in its scope
    join = next(n for n, body in scopes.items() if '"orders" join "customers"' in body)
    assert '"customers.segment"' in rules[f"{join}-col"] and '"orders.status"' in rules[f"{join}-col"]
    assert '"title"' not in rules[f"{join}-col"]


def test_names_a_grammar_cannot_hold_are_refused_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE "order lines" (id INTEGER)')
    with pytest.raises(SchemaGrammarError, match=r"odd\.db: 'order lines' is not a plain SQL identifier"):
        read_sql_schema(path)
    with pytest.raises(SchemaGrammarError, match="not a schema tag"):
        schema_from_json('{"tables": []}')
    with pytest.raises(SchemaGrammarError, match="not a plain SQL identifier"):
        schema_from_json('{"tables": {"a\\"b": ["x"]}, "foreign_keys": []}')


def test_a_schema_too_large_for_a_tag_is_refused() -> None:
    schema = SqlSchema(tuple((f"table_{i}", tuple(f"column_{j}" for j in range(20))) for i in range(40)), ())
    with pytest.raises(SchemaGrammarError, match="more than a registry tag holds"):
        schema_json(schema)


def test_constrained_decoding_needs_the_database() -> None:
    with pytest.raises(ValueError, match="evaluate.decoding 'sql_schema' needs evaluate.database"):
        EvalConfig(scorer="exact_match", decoding="sql_schema")
    assert EvalConfig(scorer="exact_match").decoding == "free"
