"""The demo task: a retail database and natural-language questions with gold SQL the base model cannot answer.

``build_demo_task(out_dir)`` writes, deterministically:

- ``retail.db`` — SQLite, six related tables (customers, products, stores, employees, orders,
  order_items), a few thousand rows;
- ``train.jsonl`` / ``test.jsonl`` — ``{"instruction": question, "response": sql}`` in the seed's
  format; no question appears in both;
- ``schema.sql`` — the DDL, for people (and for prompting a model with the schema).

The schema is **learned, not given in the prompt**. That is what a fine-tune is for: teaching a model one
company's database — its table names (questions say "clients", "shoppers", "purchases", "shops"; the
tables are ``customers``, ``orders``, ``stores``), its key columns (``customer_id``, not ``id``), its
conventions (a person's name is ``full_name``, a price is ``unit_price``) — so prompts stay short and
cheap to train and serve on. A model that has never seen the schema writes plausible SQL against tables
that do not exist; the evaluation scores it by execution, so that gap is measured, not assumed.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from offline import paraphrases
from offline.sql_varied import MONTHS

SCHEMA = """\
CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, full_name TEXT NOT NULL, city TEXT NOT NULL,
  segment TEXT NOT NULL, joined_year INTEGER NOT NULL);
CREATE TABLE products (product_id INTEGER PRIMARY KEY, title TEXT NOT NULL, category TEXT NOT NULL,
  unit_price REAL NOT NULL);
CREATE TABLE stores (store_id INTEGER PRIMARY KEY, city TEXT NOT NULL, region TEXT NOT NULL);
CREATE TABLE employees (employee_id INTEGER PRIMARY KEY, full_name TEXT NOT NULL,
  store_id INTEGER NOT NULL REFERENCES stores(store_id), role TEXT NOT NULL, salary INTEGER NOT NULL);
CREATE TABLE orders (order_id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(customer_id),
  store_id INTEGER NOT NULL REFERENCES stores(store_id), order_year INTEGER NOT NULL,
  order_month INTEGER NOT NULL, status TEXT NOT NULL);
CREATE TABLE order_items (order_id INTEGER NOT NULL REFERENCES orders(order_id),
  product_id INTEGER NOT NULL REFERENCES products(product_id), quantity INTEGER NOT NULL);
"""

FIRST = [
    "Ada",
    "Ben",
    "Cleo",
    "Dev",
    "Eva",
    "Finn",
    "Gia",
    "Hal",
    "Isla",
    "Jon",
    "Kai",
    "Lea",
    "Max",
    "Nia",
    "Otto",
    "Pia",
    "Raj",
    "Sara",
    "Tom",
    "Uma",
    "Vik",
    "Wes",
    "Xia",
    "Yara",
    "Zack",
]
LAST = [
    "Stone",
    "Reyes",
    "Kim",
    "Novak",
    "Okafor",
    "Silva",
    "Berg",
    "Moreau",
    "Tanaka",
    "Walsh",
    "Costa",
    "Fischer",
    "Haddad",
    "Ivanova",
    "Larsen",
    "Mendes",
    "Nair",
    "Price",
    "Quinn",
    "Rossi",
]
CITIES = ["Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Austin", "Madrid", "Seoul", "Porto", "Boston"]
REGIONS = {
    "Paris": "West",
    "Dublin": "West",
    "Porto": "West",
    "Madrid": "South",
    "Lagos": "South",
    "Cairo": "South",
    "Lima": "South",
    "Tokyo": "East",
    "Seoul": "East",
    "Oslo": "North",
    "Austin": "Central",
    "Boston": "North",
}
SEGMENTS = ["consumer", "business", "student"]
CATEGORIES = {
    "electronics": ["Solar Lamp", "Pocket Radio", "Smart Plug", "Desk Fan", "Power Bank", "Ear Buds", "Web Camera"],
    "garden": ["Seed Kit", "Garden Hose", "Pruning Shears", "Clay Pot", "Bird Feeder", "Rain Barrel"],
    "kitchen": ["Tea Kettle", "Chef Knife", "Spice Rack", "Rice Cooker", "Cutting Board", "Coffee Grinder"],
    "sports": ["Yoga Mat", "Trail Backpack", "Tennis Racket", "Jump Rope", "Water Bottle", "Bike Helmet"],
    "toys": ["Puzzle Box", "Kite", "Toy Train", "Building Blocks", "Rubber Duck", "Paint Set"],
    "office": ["Desk Lamp", "Notebook", "Pen Set", "Paper Tray", "Stapler", "Wall Clock"],
    "books": ["Travel Guide", "Cook Book", "Field Atlas", "Poetry Book", "Star Chart", "Comic Album"],
    "clothing": ["Rain Jacket", "Wool Hat", "Running Shoes", "Linen Shirt", "Winter Gloves", "Denim Jacket"],
}
ROLES = ["manager", "cashier", "clerk", "analyst", "driver"]
STATUSES = ["shipped", "delivered", "cancelled", "returned", "pending"]
YEARS = list(range(2019, 2026))


def build_database(path: Path, seed: int = 7) -> None:
    """Create the retail database at ``path`` (replaced if present), deterministically."""
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    customers = [(i + 1, names[i], rng.choice(CITIES), rng.choice(SEGMENTS), rng.choice(YEARS)) for i in range(400)]
    products, pid = [], 0
    for category, titles in CATEGORIES.items():
        for title in titles:
            pid += 1
            products.append((pid, title, category, round(rng.uniform(3, 400), 2)))
    stores = [(i + 1, city, REGIONS[city]) for i, city in enumerate(CITIES)]
    employees = [
        (i + 1, names[400 + i], rng.randint(1, len(stores)), rng.choice(ROLES), rng.randrange(24_000, 98_000, 50))
        for i in range(60)
    ]
    orders, items = [], []
    for oid in range(1, 2601):
        orders.append(
            (
                oid,
                rng.randint(1, len(customers)),
                rng.randint(1, len(stores)),
                rng.choice(YEARS),
                rng.randint(1, 12),
                rng.choices(STATUSES, weights=[5, 8, 2, 1, 1])[0],
            )
        )
        for product in rng.sample(range(1, len(products) + 1), rng.randint(1, 4)):
            items.append((oid, product, rng.randint(1, 6)))
    db.executemany("INSERT INTO customers VALUES (?,?,?,?,?)", customers)
    db.executemany("INSERT INTO products VALUES (?,?,?,?)", products)
    db.executemany("INSERT INTO stores VALUES (?,?,?)", stores)
    db.executemany("INSERT INTO employees VALUES (?,?,?,?,?)", employees)
    db.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?)", orders)
    db.executemany("INSERT INTO order_items VALUES (?,?,?)", items)
    db.commit()
    db.close()


# Words the training questions use for each table: the model must learn which table they mean.
SYNONYMS = {
    "customers": ["customers", "clients", "shoppers"],
    "products": ["products", "items", "articles"],
    "stores": ["stores", "shops", "branches"],
    "employees": ["employees", "staff members", "workers"],
    "orders": ["orders", "purchases"],
}
# Slots that name a table or an aggregate; every other slot is a value the gold SQL filters on.
WORDING_SLOTS = {"who", "who1", "what", "what1", "shop", "shop1", "word"}


def singular(plural: str) -> str:
    """The singular of a table word ("branches" → "branch", "staff members" → "staff member")."""
    if plural in paraphrases.HELD_OUT_SINGULAR:
        return paraphrases.HELD_OUT_SINGULAR[plural]
    return plural[:-2] if plural.endswith("ches") else plural[:-1]


@dataclass(frozen=True)
class Style:
    """How a split words the intents: its sentence forms, its table words and what it does to the text."""

    forms: dict[str, list[str]]
    synonyms: dict[str, list[str]]
    held_out: dict[str, list[str]] = field(default_factory=dict)
    held_out_share: float = 0.0
    aggregate_words: dict[str, list[str]] = field(default_factory=dict)
    finish: Callable[[random.Random, str, set[str]], str] | None = None

    def synonym(self, rng: random.Random, table: str) -> str:
        if self.held_out.get(table) and rng.random() < self.held_out_share:
            return rng.choice(self.held_out[table])
        return rng.choice(self.synonyms[table])

    def phrase(self, rng: random.Random, intent: str, slots: dict[str, object]) -> tuple[str, str]:
        """(the question as the form words it, the question as it is asked: with the style's finish)."""
        words = dict(slots)
        if "word" in words:
            words["word"] = rng.choice(self.aggregate_words.get(str(words["word"]), [str(words["word"])]))
        core = rng.choice(self.forms[intent]).format(**words)
        if self.finish is None:
            return core, core
        protected = {w.lower() for k, v in slots.items() if k not in WORDING_SLOTS for w in str(v).split()}
        return core, self.finish(rng, core, protected)


@dataclass(frozen=True)
class Ctx:
    """Values drawn from the database, so that gold queries return real rows; table words from the style."""

    rng: random.Random
    db: sqlite3.Connection
    style: Style

    def pick(self, sql: str) -> object:
        return self.rng.choice([row[0] for row in self.db.execute(sql)])

    def syn(self, table: str) -> str:
        return self.style.synonym(self.rng, table)


Intent = tuple[str, dict[str, object], str]  # (intent, slots, gold SQL)


def q_customers_in_city(c: Ctx) -> Intent:
    city = c.pick("SELECT DISTINCT city FROM customers")
    return (
        "customers_in_city",
        {"who": c.syn("customers"), "city": city},
        (f"SELECT COUNT(*) FROM customers WHERE city = '{city}';"),
    )


def q_customer_names_segment_year(c: Ctx) -> Intent:
    seg, year, who = c.rng.choice(SEGMENTS), c.rng.choice(YEARS[:-1]), c.syn("customers")
    return (
        "customer_names_segment_year",
        {"seg": seg, "year": year, "who": who, "who1": singular(who)},
        (f"SELECT full_name FROM customers WHERE segment = '{seg}' AND joined_year > {year};"),
    )


def q_customers_joined_in(c: Ctx) -> Intent:
    year, city = c.rng.choice(YEARS), c.pick("SELECT DISTINCT city FROM customers")
    return (
        "customers_joined_in",
        {"year": year, "city": city, "who": c.syn("customers")},
        (f"SELECT full_name FROM customers WHERE city = '{city}' AND joined_year = {year};"),
    )


def q_products_cheaper(c: Ctx) -> Intent:
    cat, price = c.pick("SELECT DISTINCT category FROM products"), c.rng.choice([50, 100, 150, 200, 250, 300])
    return (
        "products_cheaper",
        {"cat": cat, "price": price, "what": c.syn("products")},
        (f"SELECT title FROM products WHERE category = '{cat}' AND unit_price < {price};"),
    )


def q_top_priced(c: Ctx) -> Intent:
    k, what = c.rng.randint(1, 8), c.syn("products")
    if c.rng.random() < 0.5:
        return (
            "top_priced_desc",
            {"k": k, "what": what},
            f"SELECT title FROM products ORDER BY unit_price DESC LIMIT {k};",
        )
    return "top_priced_asc", {"k": k, "what": what}, f"SELECT title FROM products ORDER BY unit_price ASC LIMIT {k};"


def q_cheapest_in_category(c: Ctx) -> Intent:
    cat, what = c.pick("SELECT DISTINCT category FROM products"), c.syn("products")
    slots: dict[str, object] = {"cat": cat, "what1": singular(what)}
    if c.rng.random() < 0.5:
        return (
            "cheapest_in_category",
            slots,
            (f"SELECT title FROM products WHERE category = '{cat}' ORDER BY unit_price ASC LIMIT 1;"),
        )
    return (
        "priciest_in_category",
        slots,
        (f"SELECT title FROM products WHERE category = '{cat}' ORDER BY unit_price DESC LIMIT 1;"),
    )


def q_price_stat(c: Ctx) -> Intent:
    cat, what = c.pick("SELECT DISTINCT category FROM products"), c.syn("products")
    fn, word = c.rng.choice([("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest")])
    return (
        "price_stat",
        {"word": word, "cat": cat, "what": what},
        (f"SELECT {fn}(unit_price) FROM products WHERE category = '{cat}';"),
    )


def q_orders_status_year(c: Ctx) -> Intent:
    status, year = c.rng.choice(STATUSES), c.rng.choice(YEARS)
    return (
        "orders_status_year",
        {"status": status, "year": year, "what": c.syn("orders")},
        (f"SELECT COUNT(*) FROM orders WHERE status = '{status}' AND order_year = {year};"),
    )


def q_orders_month(c: Ctx) -> Intent:
    year, month = c.rng.choice(YEARS), c.rng.randint(1, 12)
    return (
        "orders_month",
        {"year": year, "month": MONTHS[month - 1], "what": c.syn("orders")},
        (f"SELECT COUNT(*) FROM orders WHERE order_year = {year} AND order_month = {month};"),
    )


def q_group_counts(c: Ctx) -> Intent:
    choice = c.rng.randrange(4)
    if choice == 0:
        return "orders_per_status", {"what": c.syn("orders")}, "SELECT status, COUNT(*) FROM orders GROUP BY status;"
    if choice == 1:
        return (
            "customers_per_segment",
            {"who": c.syn("customers")},
            ("SELECT segment, COUNT(*) FROM customers GROUP BY segment;"),
        )
    if choice == 2:
        return (
            "products_per_category",
            {"what": c.syn("products")},
            ("SELECT category, COUNT(*) FROM products GROUP BY category;"),
        )
    return "orders_per_year", {"what": c.syn("orders")}, "SELECT order_year, COUNT(*) FROM orders GROUP BY order_year;"


def q_stores_in_region(c: Ctx) -> Intent:
    region, shop = c.pick("SELECT DISTINCT region FROM stores"), c.syn("stores")
    return (
        "stores_in_region",
        {"region": region, "shop": shop, "shop1": singular(shop)},
        (f"SELECT city FROM stores WHERE region = '{region}';"),
    )


def q_salary(c: Ctx) -> Intent:
    role, who = c.pick("SELECT DISTINCT role FROM employees"), c.syn("employees")
    if c.rng.random() < 0.4:
        return "salary_per_role", {"who": who}, "SELECT role, AVG(salary) FROM employees GROUP BY role;"
    fn, word = c.rng.choice([("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest")])
    return (
        "salary_stat",
        {"word": word, "who": who, "role": role},
        (f"SELECT {fn}(salary) FROM employees WHERE role = '{role}';"),
    )


def q_staff_at_store(c: Ctx) -> Intent:
    city = c.pick("SELECT DISTINCT stores.city FROM employees JOIN stores ON employees.store_id = stores.store_id")
    return (
        "staff_at_store",
        {"city": city, "who": c.syn("employees"), "shop1": singular(c.syn("stores"))},
        (
            "SELECT employees.full_name FROM employees JOIN stores ON employees.store_id = stores.store_id "
            f"WHERE stores.city = '{city}';"
        ),
    )


def q_orders_by_customer_city(c: Ctx) -> Intent:
    city = c.pick("SELECT DISTINCT city FROM customers")
    return (
        "orders_by_customer_city",
        {"city": city, "who": c.syn("customers"), "what": c.syn("orders")},
        (
            "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.customer_id "
            f"WHERE customers.city = '{city}';"
        ),
    )


def q_orders_per_store(c: Ctx) -> Intent:
    what, shop1 = c.syn("orders"), singular(c.syn("stores"))
    if c.rng.random() < 0.5:
        return (
            "orders_per_store_city",
            {"what": what, "shop1": shop1},
            (
                "SELECT stores.city, COUNT(*) FROM orders JOIN stores ON orders.store_id = stores.store_id "
                "GROUP BY stores.city;"
            ),
        )
    city = c.pick("SELECT city FROM stores")
    return (
        "orders_at_store",
        {"city": city, "what": what, "shop1": shop1},
        (f"SELECT COUNT(*) FROM orders JOIN stores ON orders.store_id = stores.store_id WHERE stores.city = '{city}';"),
    )


def q_staff_count(c: Ctx) -> Intent:
    city, role = c.pick("SELECT city FROM stores"), c.rng.choice(ROLES)
    return (
        "staff_count",
        {"city": city, "role": role, "shop1": singular(c.syn("stores"))},
        (
            "SELECT COUNT(*) FROM employees JOIN stores ON employees.store_id = stores.store_id "
            f"WHERE stores.city = '{city}' AND employees.role = '{role}';"
        ),
    )


def q_segment_orders_year(c: Ctx) -> Intent:
    seg, year = c.rng.choice(SEGMENTS), c.rng.choice(YEARS)
    return (
        "segment_orders_year",
        {"seg": seg, "year": year, "who": c.syn("customers"), "what": c.syn("orders")},
        (
            "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.customer_id "
            f"WHERE customers.segment = '{seg}' AND orders.order_year = {year};"
        ),
    )


def q_quantity_sold(c: Ctx) -> Intent:
    title = c.pick("SELECT title FROM products")
    return (
        "quantity_sold",
        {"title": title},
        (
            "SELECT SUM(order_items.quantity) FROM order_items "
            "JOIN products ON order_items.product_id = products.product_id "
            f"WHERE products.title = '{title}';"
        ),
    )


def q_distinct(c: Ctx) -> Intent:
    choice = c.rng.randrange(4)
    if choice == 0:
        price = c.rng.choice([20, 40, 60, 80, 100, 150])
        return (
            "categories_under_price",
            {"what": c.syn("products"), "price": price},
            (f"SELECT DISTINCT category FROM products WHERE unit_price < {price};"),
        )
    if choice == 1:
        seg = c.rng.choice(SEGMENTS)
        return (
            "segment_cities",
            {"who": c.syn("customers"), "seg": seg},
            (f"SELECT DISTINCT city FROM customers WHERE segment = '{seg}';"),
        )
    if choice == 2:
        year = c.rng.choice(YEARS)
        return (
            "statuses_in_year",
            {"what": c.syn("orders"), "year": year},
            (f"SELECT DISTINCT status FROM orders WHERE order_year = {year};"),
        )
    city = c.pick("SELECT city FROM stores")
    return (
        "roles_at_store",
        {"city": city, "who": c.syn("employees"), "shop1": singular(c.syn("stores"))},
        (
            "SELECT DISTINCT employees.role FROM employees JOIN stores ON employees.store_id = stores.store_id "
            f"WHERE stores.city = '{city}';"
        ),
    )


INTENTS: list[Callable[[Ctx], Intent]] = [
    q_customers_in_city,
    q_customer_names_segment_year,
    q_customers_joined_in,
    q_products_cheaper,
    q_top_priced,
    q_cheapest_in_category,
    q_price_stat,
    q_orders_status_year,
    q_orders_month,
    q_group_counts,
    q_stores_in_region,
    q_salary,
    q_staff_at_store,
    q_orders_by_customer_city,
    q_orders_per_store,
    q_quantity_sold,
    q_distinct,
    q_staff_count,
    q_segment_orders_year,
]

# The training split's sentence forms, per intent.
TRAIN_FORMS: dict[str, list[str]] = {
    "customers_in_city": [
        "How many {who} live in {city}?",
        "Count the {who} based in {city}.",
        "What is the number of {who} from {city}?",
    ],
    "customer_names_segment_year": [
        "List the names of {seg} {who} who joined after {year}.",
        "Which {seg} {who} signed up after {year}? Give their names.",
    ],
    "customers_joined_in": [
        "Which {who} from {city} joined in {year}? Show their names.",
        "Give the names of {who} in {city} who signed up in {year}.",
    ],
    "products_cheaper": [
        "Which {cat} {what} cost less than {price} dollars?",
        "List the {cat} {what} priced under {price}.",
    ],
    "top_priced_desc": ["What are the {k} most expensive {what}?", "Name the {k} priciest {what}."],
    "top_priced_asc": ["What are the {k} cheapest {what}?", "Name the {k} least expensive {what}."],
    "cheapest_in_category": ["Which {cat} {what1} is the cheapest?", "What is the least expensive {cat} {what1}?"],
    "priciest_in_category": ["Which {cat} {what1} is the most expensive?", "What is the priciest {cat} {what1}?"],
    "price_stat": ["What is the {word} price of {cat} {what}?", "Give the {word} unit price among {cat} {what}."],
    "orders_status_year": ["How many {what} were {status} in {year}?", "Count the {status} {what} from {year}."],
    "orders_month": ["How many {what} were placed in {month} {year}?", "Count the {what} made in {month} of {year}."],
    "orders_per_status": ["How many {what} are there per status?", "Count the {what} for each status."],
    "customers_per_segment": ["How many {who} are in each segment?", "Count the {who} per segment."],
    "products_per_category": ["How many {what} does each category have?", "Count the {what} per category."],
    "orders_per_year": ["How many {what} were placed each year?", "Count the {what} per year."],
    "stores_in_region": [
        "In which cities are the {shop} of the {region} region?",
        "List the cities of {region} {shop}.",
    ],
    "salary_per_role": ["What is the average salary of {who} per role?", "Show the mean salary of {who} by role."],
    "salary_stat": ["What is the {word} salary of {who} working as {role}?", "Give the {word} pay of {role} {who}."],
    "staff_at_store": [
        "Who are the {who} at the {city} {shop1}? Give their names.",
        "List the names of {who} working in the {city} {shop1}.",
    ],
    "orders_by_customer_city": [
        "How many {what} were made by {who} living in {city}?",
        "Count the {what} of {who} from {city}.",
    ],
    "orders_per_store_city": ["How many {what} did each {shop1} city take?", "Count the {what} per {shop1} city."],
    "orders_at_store": [
        "How many {what} were placed at the {city} {shop1}?",
        "Count the {what} taken by the {city} {shop1}.",
    ],
    "quantity_sold": [
        "How many units of {title} were sold in total?",
        "What is the total quantity ordered of {title}?",
    ],
    "categories_under_price": [
        "Which categories have {what} under {price} dollars?",
        "List the distinct categories of {what} cheaper than {price}.",
    ],
    "segment_cities": ["In which cities do {seg} {who} live?", "List the distinct cities of {seg} {who}."],
    "statuses_in_year": [
        "Which statuses did {what} from {year} end up in?",
        "List the distinct statuses of {year} {what}.",
    ],
    "roles_at_store": [
        "Which roles do the {who} of the {city} {shop1} have?",
        "List the distinct roles at the {city} {shop1}.",
    ],
    "staff_count": ["How many {role}s work at the {city} {shop1}?", "Count the {role}s of the {city} {shop1}."],
    "segment_orders_year": [
        "How many {what} did {seg} {who} make in {year}?",
        "Count the {year} {what} of {seg} {who}.",
    ],
}

# More sentence forms per intent: statements, imperatives, inverted word order, short forms.
MORE_TRAIN_FORMS: dict[str, list[str]] = {
    "customers_in_city": [
        "{city} has how many {who}?",
        "Find the number of {who} whose city is {city}.",
        "Total {who} in {city}?",
    ],
    "customer_names_segment_year": [
        "Show {seg} {who} who joined after {year}.",
        "Names of {seg} {who} with a join year after {year}?",
        "Find all {seg} {who} that signed up after {year}.",
    ],
    "customers_joined_in": [
        "Find {who} living in {city} who joined in {year}.",
        "Show the {who} of {city} with join year {year}.",
        "Who joined in {year} among {who} from {city}?",
    ],
    "products_cheaper": [
        "Find {cat} {what} below {price} dollars.",
        "Show {cat} {what} with a price under {price}.",
        "{cat} {what} costing less than {price}?",
    ],
    "top_priced_desc": [
        "Top {k} {what} by price, highest first.",
        "Which {k} {what} cost the most?",
        "Give me the {k} most costly {what}.",
    ],
    "top_priced_asc": [
        "Which {k} {what} cost the least?",
        "Give me the {k} least costly {what}.",
        "{k} {what} with the smallest price?",
    ],
    "cheapest_in_category": [
        "Name the {cat} {what1} with the lowest price.",
        "Lowest priced {what1} in the {cat} category?",
    ],
    "priciest_in_category": [
        "Name the {cat} {what1} with the highest price.",
        "Most costly {what1} in the {cat} category?",
    ],
    "price_stat": [
        "Compute the {word} price of the {cat} {what}.",
        "What's the {word} cost of {cat} {what}?",
        "Find the {word} unit price in the {cat} category.",
    ],
    "orders_status_year": [
        "Number of {what} with status {status} in {year}?",
        "Find how many {what} were {status} during {year}.",
        "In {year}, how many {what} were {status}?",
    ],
    "orders_month": [
        "In {month} {year}, how many {what} were placed?",
        "Find the number of {what} from {month} {year}.",
        "Total {what} in {month} of {year}?",
    ],
    "orders_per_status": [
        "Show the number of {what} by status.",
        "Give the {what} count per status.",
        "For each status, how many {what} are there?",
    ],
    "customers_per_segment": [
        "Show the number of {who} by segment.",
        "For each segment, how many {who} are there?",
        "Give the {who} count per segment.",
    ],
    "products_per_category": [
        "Show the number of {what} by category.",
        "For each category, how many {what} are there?",
        "Give the {what} count per category.",
    ],
    "orders_per_year": [
        "For each year, how many {what} were placed?",
        "Give the {what} count per year.",
        "{what} totals for every year?",
    ],
    "stores_in_region": [
        "Show the cities of the {shop} in region {region}.",
        "Where are the {region} region's {shop} located?",
        "{region} region: which cities have {shop}?",
    ],
    "salary_per_role": [
        "For each role, what is the average salary of {who}?",
        "Average {who} salary grouped by role?",
        "Show average salary per role for {who}.",
    ],
    "salary_stat": [
        "Find the {word} salary among {role} {who}.",
        "What's the {word} salary for the role {role}?",
        "{word} salary of {who} whose role is {role}?",
    ],
    "staff_at_store": [
        "Which {who} are employed by the {city} {shop1}?",
        "Find the {who} of the {city} {shop1} by name.",
    ],
    "orders_by_customer_city": [
        "Find the number of {what} placed by {who} from {city}.",
        "{who} in {city} made how many {what}?",
        "Total {what} from {city} {who}?",
    ],
    "orders_per_store_city": [
        "For each {shop1} city, how many {what} were taken?",
        "Show the {what} count by {shop1} city.",
    ],
    "orders_at_store": [
        "Find the number of {what} taken at the {city} {shop1}.",
        "The {city} {shop1} took how many {what}?",
        "Total {what} at the {city} {shop1}?",
    ],
    "quantity_sold": [
        "Total quantity of {title} ordered?",
        "Find the total number of {title} units sold.",
        "Sum of units sold for {title}?",
    ],
    "categories_under_price": [
        "Show the categories with {what} priced below {price}.",
        "Which distinct categories contain {what} cheaper than {price}?",
    ],
    "segment_cities": ["Show the distinct cities where {seg} {who} live.", "Which cities have {seg} {who}?"],
    "statuses_in_year": [
        "Show the distinct statuses of {what} from {year}.",
        "What statuses appear among {year} {what}?",
    ],
    "roles_at_store": [
        "Show the distinct roles of {who} at the {city} {shop1}.",
        "What roles exist at the {city} {shop1}?",
    ],
    "staff_count": [
        "The {city} {shop1} employs how many {role}s?",
        "Count of {role}s working in the {city} {shop1}?",
        "How many employees of the {city} {shop1} are {role}s?",
    ],
    "segment_orders_year": [
        "In {year}, how many {what} came from {seg} {who}?",
        "Find the number of {year} {what} by {seg} {who}.",
        "{seg} {who} made how many {what} in {year}?",
    ],
}

# Sentence types the forms above lack: noun phrases with no verb, the topic first, requests to show or get.
TERSE_TRAIN_FORMS: dict[str, list[str]] = {
    "customers_in_city": [
        "The count of {who} living in {city}.",
        "{who} living in {city} - the count?",
        "Show me the count of {who} in {city}.",
    ],
    "customer_names_segment_year": [
        "Full names of {seg} {who} joining after {year}.",
        "Get me {seg} {who} who joined after the year {year}.",
    ],
    "customers_joined_in": [
        "Full names of {city} {who} joining in {year}.",
        "Get me the {who} from {city} who joined in {year}.",
    ],
    "products_cheaper": [
        "The {cat} {what} priced below {price}.",
        "Get me the {cat} {what} that are cheaper than {price} dollars.",
    ],
    "top_priced_desc": ["The {k} priciest {what}.", "Get me the top {k} {what} ranked by price."],
    "top_priced_asc": ["The {k} {what} with the lowest prices.", "Get me the {k} cheapest {what} in the catalogue."],
    "cheapest_in_category": ["The cheapest {what1} of the {cat} range.", "Get me the least costly {cat} {what1}."],
    "priciest_in_category": ["The priciest {what1} of the {cat} range.", "Get me the most costly {cat} {what1}."],
    "price_stat": ["The {word} price among {cat} {what}.", "{cat} category, {word} price of its {what}?"],
    "orders_status_year": ["The count of {status} {what} in {year}.", "{year}, {status} {what}: the count?"],
    "orders_month": ["The count of {what} in {month} {year}.", "{month} {year}, number of {what} placed?"],
    "orders_per_status": ["The count of {what} for every status.", "Statuses of {what} with their counts."],
    "customers_per_segment": ["The count of {who} for every segment.", "Segments of {who} with their counts."],
    "products_per_category": ["The count of {what} for every category.", "Categories of {what} with their counts."],
    "orders_per_year": ["The count of {what} for every year.", "Years with their counts of {what}."],
    "stores_in_region": [
        "The cities of {shop} in the {region} region.",
        "Get me the cities where the {region} {shop} are.",
    ],
    "salary_per_role": [
        "Every role with the average salary of its {who}.",
        "Get me the mean salary for each role of {who}.",
    ],
    "salary_stat": ["The {word} salary among {role}s.", "Get me the {word} salary of a {role}."],
    "staff_at_store": ["The names of {who} at the {city} {shop1}.", "Get me the {who} working at the {city} {shop1}."],
    "orders_by_customer_city": ["The count of {what} by {who} from {city}.", "{city} {who}, their number of {what}?"],
    "orders_per_store_city": [
        "The count of {what} for every {shop1} city.",
        "Every {shop1} city with its count of {what}.",
    ],
    "orders_at_store": ["The count of {what} at the {city} {shop1}.", "{city} {shop1}, its number of {what}?"],
    "quantity_sold": ["The total units of {title} sold.", "{title}, units sold in total?"],
    "categories_under_price": [
        "The categories having {what} under {price}.",
        "Get me categories with {what} below {price} dollars.",
    ],
    "segment_cities": ["The cities of {seg} {who}.", "Get me the cities that {seg} {who} live in."],
    "statuses_in_year": ["The statuses of {what} from {year}.", "Get me the different statuses of {year} {what}."],
    "roles_at_store": ["The roles of {who} at the {city} {shop1}.", "Get me the roles found at the {city} {shop1}."],
    "staff_count": ["The count of {role}s at the {city} {shop1}.", "{city} {shop1}, its number of {role}s?"],
    "segment_orders_year": [
        "The count of {what} by {seg} {who} in {year}.",
        "{year}, {seg} {who}: their number of {what}?",
    ],
}

_TRAIN_LEAD_INS = ["", "", "", "", "I'd like to know: ", "so ", "hello, ", "ok, "]
_TRAIN_TAILS = ["", "", "", "", " thank you", " asap", " cheers"]


def typed(rng: random.Random, question: str, protected: set[str]) -> str:
    """The training split's noise: a greeting or a sign-off, lower case, no final punctuation, a swapped pair
    of letters in a word that is not a value (``protected``) — how questions arrive when people type them."""
    q = rng.choice(_TRAIN_LEAD_INS) + question
    if tail := rng.choice(_TRAIN_TAILS):
        q = q.rstrip("?.!") + tail
    if rng.random() < 0.2:
        words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{4,}", q) if m.group().lower() not in protected]
        if words:
            start, word = rng.choice(words)
            i = rng.randrange(1, len(word) - 1)
            q = q[:start] + word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :] + q[start + len(word) :]
    if rng.random() < 0.4:
        q = q.lower()
    if rng.random() < 0.4:
        q = q.rstrip("?.!")
    return q


TRAIN = Style(TRAIN_FORMS, SYNONYMS)  # the templated test split's wording
# The training split's wording: every form, typed as people type (the levers that paid: docs/offline-model.md).
TRAINING = Style(
    {k: TRAIN_FORMS[k] + MORE_TRAIN_FORMS[k] + TERSE_TRAIN_FORMS[k] for k in TRAIN_FORMS}, SYNONYMS, finish=typed
)
PARAPHRASE = Style(
    paraphrases.FORMS,
    SYNONYMS,
    held_out=paraphrases.HELD_OUT_SYNONYMS,
    held_out_share=paraphrases.HELD_OUT_SHARE,
    aggregate_words=paraphrases.AGGREGATE_WORDS,
    finish=paraphrases.finish,
)


def _usable(db: sqlite3.Connection, sql: str) -> bool:
    """Gold queries must return something non-trivial and, with LIMIT, must not cut through a tie."""
    rows = db.execute(sql).fetchall()
    if not rows or rows[0][0] in (None, 0):
        return False
    if " LIMIT " in sql:  # the row after the cut must differ in the sort key, or the answer is ambiguous
        head, limit = sql.rstrip(";").rsplit(" LIMIT ", 1)
        key = head.split(" ORDER BY ", 1)[1].split()[0]
        select_from = head.split(" FROM ", 1)[1]
        keys = [r[0] for r in db.execute(f"SELECT {key} FROM {select_from} LIMIT {int(limit) + 1}")]
        if len(keys) > int(limit) and keys[-1] == keys[-2]:
            return False
    return True


def generate(
    db: sqlite3.Connection,
    style: Style,
    n: int,
    *,
    seed: int,
    exclude: set[str],
    intents: list[Callable[[Ctx], Intent]] | None = None,
) -> dict[str, tuple[str, str]]:
    """``n`` questions in ``style``: {question as the form words it: (question as asked, gold SQL)}. No two
    differ only by the style's finish (a greeting, a typo), and none is worded as any question in ``exclude``.
    ``intents``: the task's question generators (default: this retail task's)."""
    intents = intents or INTENTS
    ctx = Ctx(random.Random(seed), db, style)
    pairs: dict[str, tuple[str, str]] = {}
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"only {len(pairs)} distinct questions after {attempts} attempts")
        intent, slots, sql = ctx.rng.choice(intents)(ctx)
        core, question = style.phrase(ctx.rng, intent, slots)
        if core not in pairs and core not in exclude and question not in exclude and _usable(db, sql):
            pairs[core] = (question, sql)
    return pairs


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w") as fh:
        for question, sql in rows:
            fh.write(json.dumps({"instruction": question, "response": sql}) + "\n")


def build_demo_task(
    out_dir: Path,
    *,
    n_train: int = 2200,
    n_test: int = 350,
    n_paraphrase: int = 350,
    seed: int = 11,
    train_style: Style | None = None,
) -> dict[str, int]:
    """Write the database, the train/test/paraphrase JSONL and the schema to ``out_dir``; return the counts.

    ``train.jsonl`` is worded by ``train_style`` (default ``TRAINING``: every training form, typed as people
    type); ``test.jsonl`` asks held-out questions in the original training forms (``TRAIN``, no noise), so it
    stays the same whatever the training wording adds; ``test_paraphrase.jsonl`` asks the same intents in the
    wording of ``offline/paraphrases.py``. No question is worded as one in another file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    db_path = out_dir / "retail.db"
    build_database(db_path)
    (out_dir / "schema.sql").write_text(SCHEMA)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    test = generate(db, TRAIN, n_test, seed=seed, exclude=set())
    train = generate(db, train_style or TRAINING, n_train, seed=seed + 2, exclude=set(test))
    seen = set(test) | {q for q, _ in test.values()} | set(train) | {q for q, _ in train.values()}
    paraphrase = generate(db, PARAPHRASE, n_paraphrase, seed=seed + 1, exclude=seen)
    db.close()
    splits = {"train": list(train.values()), "test": list(test.values()), "test_paraphrase": list(paraphrase.values())}
    for name, rows in splits.items():
        _write(out_dir / f"{name}.jsonl", rows)
    return {name: len(rows) for name, rows in splits.items()}
