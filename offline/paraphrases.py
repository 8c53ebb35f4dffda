"""The paraphrase test split's phrasings: the demo task's intents asked the way people type them.

This module is the *only* source of the paraphrase split's wording and is never used to write training
rows: its sentence forms, its extra table synonyms, its lead-ins and its noise (lower case, missing
punctuation, small typos) are kept apart from the training generator (``offline/demo_task.py``) by
construction, and ``tests/unit/test_demo_task.py`` proves the separation on the generated files (no
training form, no question and no held-out synonym of this module appears in the training split).

A form is a ``str.format`` template over the intent's slots (``{who}``: a word for customers, ``{what}``:
for products or orders, ``{shop1}``: one store, …); the intent and its gold SQL come from the same
functions as the templated split, so both splits ask about the same things.
"""

from __future__ import annotations

import random
import re

# Words for the tables that the training generator never uses. A paraphrase question uses one of them for
# a third of its table mentions; the rest use the training synonyms, as real users mix both.
HELD_OUT_SYNONYMS = {
    "customers": ["buyers", "patrons"],
    "products": ["goods", "wares"],
    "stores": ["outlets", "locations"],
    "employees": ["team members", "personnel"],
    "orders": ["sales", "transactions"],
}
HELD_OUT_SINGULAR = {
    "buyers": "buyer",
    "patrons": "patron",
    "goods": "product",
    "wares": "product",
    "outlets": "outlet",
    "locations": "location",
    "team members": "team member",
    "personnel": "staff member",
    "sales": "sale",
    "transactions": "transaction",
}
HELD_OUT_SHARE = 1 / 3

# The aggregate words of the price and salary questions, as people say them.
AGGREGATE_WORDS = {
    "average": ["average", "mean", "avg"],
    "highest": ["highest", "max", "top"],
    "lowest": ["lowest", "min", "smallest"],
}

FORMS: dict[str, list[str]] = {
    "customers_in_city": [
        "number of {who} in {city} please",
        "how many of our {who} are located in {city}",
        "{city}: how many {who} do we have?",
        "tell me how many {who} we've got in {city}",
    ],
    "customer_names_segment_year": [
        "names of {seg} {who} that joined later than {year}",
        "show me every {seg} {who1} who registered after {year}",
        "I need the names of all {seg} {who} who came on board after {year}",
    ],
    "customers_joined_in": [
        "names of {who} in {city} that joined in {year}",
        "show me the {city} {who} who registered in {year}",
        "{year} sign-ups from {city}: list the {who}",
    ],
    "products_cheaper": [
        "{cat} {what} under {price} dollars",
        "show me {cat} {what} that cost below {price}",
        "which {cat} {what} go for less than {price}?",
        "I'm looking for {cat} {what} cheaper than {price} bucks",
    ],
    "top_priced_desc": [
        "top {k} most expensive {what}",
        "show the {k} {what} with the highest price",
        "what are our {k} priciest {what} right now",
    ],
    "top_priced_asc": [
        "the {k} cheapest {what} we sell",
        "bottom {k} {what} by price",
        "show me the {k} lowest priced {what}",
    ],
    "cheapest_in_category": [
        "cheapest {cat} {what1}?",
        "what's the lowest priced {cat} {what1} we sell",
        "which {what1} in {cat} costs the least",
    ],
    "priciest_in_category": [
        "most expensive {cat} {what1}?",
        "what's the priciest {cat} {what1} we sell",
        "which {what1} in {cat} has the highest price tag",
    ],
    "price_stat": [
        "{word} price of our {cat} {what}",
        "what's the {word} unit price in {cat}",
        "{cat} {what}: {word} price?",
    ],
    "orders_status_year": [
        "number of {status} {what} in {year} please",
        "how many {what} got {status} in {year}",
        "{status} {what} for {year} - how many?",
        "total {status} {what} during {year}",
    ],
    "orders_month": [
        "how many {what} came in during {month} {year}",
        "{what} count for {month} {year}",
        "number of {what} in {month} {year} please",
    ],
    "orders_per_status": [
        "break down {what} by status",
        "{what} per status?",
        "how many {what} in each status",
    ],
    "customers_per_segment": [
        "give me a count of {who} by segment",
        "{who} per segment breakdown",
        "how many {who} in every segment",
    ],
    "products_per_category": [
        "number of {what} in every category",
        "break down our {what} by category",
        "how many {what} per category do we have",
    ],
    "orders_per_year": [
        "how many {what} did we get every year",
        "yearly {what} count",
        "number of {what} by year",
    ],
    "stores_in_region": [
        "cities with a {shop1} in the {region} region",
        "where are our {region} {shop}?",
        "list {region} region {shop} cities",
    ],
    "salary_per_role": [
        "average pay by role for {who}",
        "break down mean {who} salary per role",
        "what do {who} earn on average in each role",
    ],
    "salary_stat": [
        "{word} salary for a {role}",
        "what's the {word} pay among {role}s",
        "{role}s: {word} salary?",
    ],
    "staff_at_store": [
        "who works at the {city} {shop1}?",
        "names of {who} at our {city} {shop1}",
        "show me the {city} {shop1}'s {who}",
    ],
    "orders_by_customer_city": [
        "number of {what} from {who} in {city}",
        "how many {what} have {city} {who} made",
        "total {what} by {who} who live in {city}",
    ],
    "orders_per_store_city": [
        "{what} per {shop1} city",
        "break down {what} by {shop1} city",
        "how many {what} has every {shop1} city taken",
    ],
    "orders_at_store": [
        "how many {what} did the {city} {shop1} get",
        "{what} at our {city} {shop1}: how many?",
        "number of {what} handled by the {city} {shop1}",
    ],
    "quantity_sold": [
        "total units sold of {title}",
        "how many {title} have we sold altogether",
        "{title}: total quantity sold?",
    ],
    "categories_under_price": [
        "categories that have {what} below {price}",
        "which categories include {what} under {price} dollars",
    ],
    "segment_cities": [
        "cities where our {seg} {who} live",
        "where do {seg} {who} come from? list the cities",
    ],
    "statuses_in_year": [
        "what statuses do {year} {what} have",
        "list all statuses for {what} placed in {year}",
    ],
    "roles_at_store": [
        "what roles are there at the {city} {shop1}",
        "which jobs do people have at our {city} {shop1}",
    ],
    "staff_count": [
        "number of {role}s at the {city} {shop1}",
        "how many {role}s does the {city} {shop1} have",
        "{city} {shop1}: how many {role}s?",
    ],
    "segment_orders_year": [
        "how many {what} did our {seg} {who} place in {year}",
        "{year} {what} from {seg} {who} - how many",
        "number of {what} by {seg} {who} in {year}",
    ],
}

LEAD_INS = ["", "", "", "quick question: ", "hey, ", "hi! "]
TAIL_WORDS = ["", "", "", " please", " thanks", " thx"]


def typo(rng: random.Random, word: str) -> str:
    """One small slip in ``word``: two inner letters swapped, or one inner letter dropped or doubled."""
    i = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def finish(rng: random.Random, question: str, protected: set[str]) -> str:
    """Lead-in, tail, casing, punctuation and typos as people type them. Words in ``protected`` (the values
    the gold SQL filters on, lower case) never get a typo: the question must stay answerable."""
    q = rng.choice(LEAD_INS) + question
    tail = rng.choice(TAIL_WORDS)
    if tail and "please" not in q:
        q = q.rstrip("?.!") + tail
    if rng.random() < 0.25:
        words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{5,}", q) if m.group().lower() not in protected]
        if words:
            start, word = rng.choice(words)
            q = q[:start] + typo(rng, word) + q[start + len(word) :]
    r = rng.random()
    if r < 0.45:
        q = q.lower()
    elif r < 0.7:
        q = q[0].upper() + q[1:]
    if rng.random() < 0.4:
        q = q.rstrip("?.!")
    return q
