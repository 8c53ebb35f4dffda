"""The invented-identifier check finds planted tables and columns the schema lacks, and nothing in valid SQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.sql_identifiers import invented_identifiers, read_schema


@pytest.fixture(scope="module")
def schema(demo_task: Path):
    return read_schema(demo_task / "retail.db")


def test_reads_the_schema(schema) -> None:
    assert set(schema) == {"customers", "products", "stores", "employees", "orders", "order_items"}
    assert {"customer_id", "full_name", "city", "segment", "joined_year"} == schema["customers"]


def test_every_gold_query_names_only_what_exists(schema, demo_task: Path) -> None:
    for name in ("train.jsonl", "test.jsonl", "test_paraphrase.jsonl"):
        for line in (demo_task / name).read_text().splitlines():
            sql = json.loads(line)["response"]
            assert invented_identifiers(sql, schema) == [], sql


@pytest.mark.parametrize(
    ("sql", "invented"),
    [
        # tables that do not exist, as a model that never learnt the schema writes them
        ("SELECT COUNT(*) FROM custommployees;", ["custommployees"]),
        ("SELECT name FROM proders WHERE price < 5", ["proders"]),
        ("SELECT COUNT(*) FROM orders JOIN eers ON orders.store_id = eers.store_id", ["eers"]),
        # columns of the wrong table, qualified (directly or through an alias) or not
        ("SELECT title FROM customers", ["?.title"]),
        ("SELECT c.title FROM customers AS c", ["customers.title"]),
        ("SELECT customers.id FROM customers", ["customers.id"]),
        (
            "SELECT e.full_name FROM employees e JOIN stores s ON e.store_id = s.store_id WHERE s.region_name = 'X'",
            ["stores.region_name"],
        ),
        ("SELECT COUNT(*) FROM orders WHERE order_date > 2020", ["?.order_date"]),
        # valid: aliases, CTEs, subqueries, columns of any table the query reads
        ("SELECT city, COUNT(*) AS n FROM stores GROUP BY city ORDER BY n DESC", []),
        ("WITH t AS (SELECT city FROM stores) SELECT city FROM t", []),
        ("SELECT x.c FROM (SELECT city AS c FROM customers) AS x", []),
        ("SELECT title, quantity FROM products JOIN order_items ON products.product_id = order_items.product_id", []),
    ],
)
def test_planted_invented_names_are_found(schema, sql: str, invented: list[str]) -> None:
    assert invented_identifiers(sql, schema) == invented


@pytest.mark.parametrize("text", ["", "SELECT ((( FROM", "the answer is Paris", "SELECT * FROM WHERE"])
def test_text_that_is_not_a_query_is_not_counted_as_one(schema, text: str) -> None:
    assert invented_identifiers(text, schema) is None
