"""The PII scrubber on ≥ 200 real-looking strings of every kind, inside sentences and SQL, and on text that must
stay as it is (the demo task's SQL, dates, times, prices)."""

from __future__ import annotations

import json
import random

import pytest

from infra.pii import PatternError, Scrubber

PATTERNS = {"ticket": r"TCK-\d{6}"}
CONTEXTS = [
    "my details: {} — please use them",
    "Contact: {}.",
    "SELECT * FROM customers WHERE note = '{}'",
    "({}) is what I typed",
    "{}",
    "hey, {} thx",
]


def test_every_seeded_string_is_replaced_by_its_placeholder(pii_corpus) -> None:
    scrub = Scrubber(PATTERNS)
    rng = random.Random(7)
    for kind, values in pii_corpus.items():
        assert len(values) >= 200, kind
        for value in values:
            text = rng.choice(CONTEXTS).format(value)
            clean = scrub(text)
            assert value not in clean, (kind, text, clean)
            assert f"<{kind.upper()}>" in clean, (kind, text, clean)


def test_many_kinds_in_one_text_and_inside_structures(pii_corpus) -> None:
    scrub = Scrubber(PATTERNS)
    picks = [values[i] for values in pii_corpus.values() for i in (0, 1)]
    text = " and ".join(picks)
    clean = scrub(text)
    assert not [p for p in picks if p in clean]
    assert clean.count("<") == len(picks), clean
    messages = [{"role": "user", "content": f"mail {picks[0]}"}, {"role": "assistant", "content": ["ok", picks[2]]}]
    cleaned = scrub.value(messages)
    assert picks[0] not in json.dumps(cleaned) and picks[2] not in json.dumps(cleaned)
    assert cleaned[0]["role"] == "user"


@pytest.mark.parametrize(
    "text",
    [
        "SELECT name FROM products WHERE price > 19.99 ORDER BY name LIMIT 5",
        "SELECT COUNT(*) FROM orders WHERE order_date BETWEEN '2024-03-01' AND '2024-03-31'",
        "meeting at 12:30:00 on 2024-11-27, order 1234, 3 items, version 1.2.3",
        "SELECT SUM(quantity * unit_price) FROM order_items WHERE order_id = 104",
        "card ending 1111, 4 digits only; account 12345678",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert Scrubber(PATTERNS)(text) == text


def test_a_number_next_to_a_card_number_stays_and_the_card_goes() -> None:
    assert Scrubber()("card 4111 1111 1111 1111 2 items") == "card <CARD> 2 items"
    assert Scrubber()("pay DE89 3704 0044 0532 0130 00 AND more") == "pay <IBAN> AND more"


def test_bad_user_patterns_name_themselves() -> None:
    with pytest.raises(PatternError, match="'broken'"):
        Scrubber({"broken": "(unclosed"})
    with pytest.raises(PatternError, match="Bad-Name"):
        Scrubber({"Bad-Name": "x"})
