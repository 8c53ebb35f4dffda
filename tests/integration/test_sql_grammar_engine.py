"""The decoding grammar, checked by the grammar engine vLLM runs it with (xgrammar, in the vLLM venv): the demo
task's reference queries are in it (three of each query shape: the engine takes ≈30 ms a string); queries that
name a column of a table they do not read, a table the database lacks, or a join no foreign key supports are not."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from infra.sql_grammar import read_sql_schema, sql_grammar

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CHECK = """
import json, sys
import xgrammar
from xgrammar.testing import _is_grammar_accept_string as accepts
job = json.load(sys.stdin)
grammar = xgrammar.Grammar.from_ebnf(job["grammar"])
print(json.dumps([accepts(grammar, text) for text in job["texts"]]))
"""
OUTSIDE = [
    "SELECT COUNT(*) FROM customers WHERE category = 'sports';",  # products' column on customers
    "SELECT COUNT(*) FROM custommers;",  # no such table
    "SELECT title FROM orders WHERE order_year = 2021;",
    "SELECT customers.unit_price FROM orders JOIN customers ON orders.customer_id = customers.customer_id;",
    "SELECT COUNT(*) FROM products JOIN stores ON products.product_id = stores.store_id;",  # no such foreign key
    "SELECT COUNT(*) FROM orders WHERE segment = 'student' AND order_year = 2020;",  # customers' column
]


def accepted(grammar: str, texts: list[str]) -> list[bool]:
    job = json.dumps({"grammar": grammar, "texts": texts})
    out = subprocess.run(
        [str(REPO / ".venv-vllm" / "bin" / "python"), "-c", CHECK],
        input=job,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_the_grammar_admits_every_reference_query_and_nothing_off_schema(demo_task: Path) -> None:
    grammar = sql_grammar(read_sql_schema(demo_task / "retail.db"))
    shapes: dict[str, list[str]] = {}
    for split in ("train", "test", "test_paraphrase"):
        for line in (demo_task / f"{split}.jsonl").read_text().splitlines():
            query = json.loads(line)["response"]
            shape = re.sub(r"'[^']*'|\b\d+\b", "?", query)
            shapes.setdefault(shape, []).append(query)
    references = [q for queries in shapes.values() for q in queries[:3]]
    verdicts = accepted(grammar, references + OUTSIDE)
    refused = [q for q, ok in zip(references, verdicts, strict=False) if not ok]
    assert len(shapes) >= 30 and not refused, refused[:5]
    assert verdicts[len(references) :] == [False] * len(OUTSIDE)
