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
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


# Synonyms the questions use for each table: the model must learn which table they mean.
CUSTOMERS = ["customers", "clients", "shoppers"]
PRODUCTS = ["products", "items", "articles"]
STORES = ["stores", "shops", "branches"]
STAFF = ["employees", "staff members", "workers"]
ORDERS = ["orders", "purchases"]
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


def singular(plural: str) -> str:
    """The singular of a table synonym ("branches" → "branch", "shops" → "shop")."""
    return plural[:-2] if plural.endswith("ches") else plural[:-1]


@dataclass(frozen=True)
class Ctx:
    """Values drawn from the database, so that gold queries return real rows."""

    rng: random.Random
    db: sqlite3.Connection

    def pick(self, sql: str) -> object:
        return self.rng.choice([row[0] for row in self.db.execute(sql)])


def q_customers_in_city(c: Ctx) -> tuple[str, str]:
    city, who = c.pick("SELECT DISTINCT city FROM customers"), c.rng.choice(CUSTOMERS)
    q = c.rng.choice(
        [
            f"How many {who} live in {city}?",
            f"Count the {who} based in {city}.",
            f"What is the number of {who} from {city}?",
        ]
    )
    return q, f"SELECT COUNT(*) FROM customers WHERE city = '{city}';"


def q_customer_names_segment_year(c: Ctx) -> tuple[str, str]:
    seg, year, who = c.rng.choice(SEGMENTS), c.rng.choice(YEARS[:-1]), c.rng.choice(CUSTOMERS)
    q = c.rng.choice(
        [
            f"List the names of {seg} {who} who joined after {year}.",
            f"Which {seg} {who} signed up after {year}? Give their names.",
        ]
    )
    return q, f"SELECT full_name FROM customers WHERE segment = '{seg}' AND joined_year > {year};"


def q_customers_joined_in(c: Ctx) -> tuple[str, str]:
    year, city, who = c.rng.choice(YEARS), c.pick("SELECT DISTINCT city FROM customers"), c.rng.choice(CUSTOMERS)
    q = c.rng.choice(
        [
            f"Which {who} from {city} joined in {year}? Show their names.",
            f"Give the names of {who} in {city} who signed up in {year}.",
        ]
    )
    return q, f"SELECT full_name FROM customers WHERE city = '{city}' AND joined_year = {year};"


def q_products_cheaper(c: Ctx) -> tuple[str, str]:
    cat, price, what = (
        c.pick("SELECT DISTINCT category FROM products"),
        c.rng.choice([50, 100, 150, 200, 250, 300]),
        c.rng.choice(PRODUCTS),
    )
    q = c.rng.choice(
        [f"Which {cat} {what} cost less than {price} dollars?", f"List the {cat} {what} priced under {price}."]
    )
    return q, f"SELECT title FROM products WHERE category = '{cat}' AND unit_price < {price};"


def q_top_priced(c: Ctx) -> tuple[str, str]:
    k, what = c.rng.randint(1, 8), c.rng.choice(PRODUCTS)
    if c.rng.random() < 0.5:
        q = c.rng.choice([f"What are the {k} most expensive {what}?", f"Name the {k} priciest {what}."])
        return q, f"SELECT title FROM products ORDER BY unit_price DESC LIMIT {k};"
    q = c.rng.choice([f"What are the {k} cheapest {what}?", f"Name the {k} least expensive {what}."])
    return q, f"SELECT title FROM products ORDER BY unit_price ASC LIMIT {k};"


def q_cheapest_in_category(c: Ctx) -> tuple[str, str]:
    cat, what = c.pick("SELECT DISTINCT category FROM products"), c.rng.choice(PRODUCTS)
    if c.rng.random() < 0.5:
        q = c.rng.choice(
            [f"Which {cat} {what[:-1]} is the cheapest?", f"What is the least expensive {cat} {what[:-1]}?"]
        )
        return q, f"SELECT title FROM products WHERE category = '{cat}' ORDER BY unit_price ASC LIMIT 1;"
    q = c.rng.choice([f"Which {cat} {what[:-1]} is the most expensive?", f"What is the priciest {cat} {what[:-1]}?"])
    return q, f"SELECT title FROM products WHERE category = '{cat}' ORDER BY unit_price DESC LIMIT 1;"


def q_price_stat(c: Ctx) -> tuple[str, str]:
    cat, what = c.pick("SELECT DISTINCT category FROM products"), c.rng.choice(PRODUCTS)
    fn, word = c.rng.choice([("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest")])
    q = c.rng.choice([f"What is the {word} price of {cat} {what}?", f"Give the {word} unit price among {cat} {what}."])
    return q, f"SELECT {fn}(unit_price) FROM products WHERE category = '{cat}';"


def q_orders_status_year(c: Ctx) -> tuple[str, str]:
    status, year, what = c.rng.choice(STATUSES), c.rng.choice(YEARS), c.rng.choice(ORDERS)
    q = c.rng.choice([f"How many {what} were {status} in {year}?", f"Count the {status} {what} from {year}."])
    return q, f"SELECT COUNT(*) FROM orders WHERE status = '{status}' AND order_year = {year};"


def q_orders_month(c: Ctx) -> tuple[str, str]:
    year, month, what = c.rng.choice(YEARS), c.rng.randint(1, 12), c.rng.choice(ORDERS)
    q = c.rng.choice(
        [
            f"How many {what} were placed in {MONTHS[month - 1]} {year}?",
            f"Count the {what} made in {MONTHS[month - 1]} of {year}.",
        ]
    )
    return q, f"SELECT COUNT(*) FROM orders WHERE order_year = {year} AND order_month = {month};"


def q_group_counts(c: Ctx) -> tuple[str, str]:
    choice = c.rng.randrange(4)
    if choice == 0:
        w = c.rng.choice(ORDERS)
        return c.rng.choice([f"How many {w} are there per status?", f"Count the {w} for each status."]), (
            "SELECT status, COUNT(*) FROM orders GROUP BY status;"
        )
    if choice == 1:
        w = c.rng.choice(CUSTOMERS)
        return c.rng.choice([f"How many {w} are in each segment?", f"Count the {w} per segment."]), (
            "SELECT segment, COUNT(*) FROM customers GROUP BY segment;"
        )
    if choice == 2:
        w = c.rng.choice(PRODUCTS)
        return c.rng.choice([f"How many {w} does each category have?", f"Count the {w} per category."]), (
            "SELECT category, COUNT(*) FROM products GROUP BY category;"
        )
    w = c.rng.choice(ORDERS)
    return c.rng.choice([f"How many {w} were placed each year?", f"Count the {w} per year."]), (
        "SELECT order_year, COUNT(*) FROM orders GROUP BY order_year;"
    )


def q_stores_in_region(c: Ctx) -> tuple[str, str]:
    region, what = c.pick("SELECT DISTINCT region FROM stores"), c.rng.choice(STORES)
    q = c.rng.choice(
        [f"In which cities are the {what} of the {region} region?", f"List the cities of {region} {what}."]
    )
    return q, f"SELECT city FROM stores WHERE region = '{region}';"


def q_salary(c: Ctx) -> tuple[str, str]:
    role, who = c.pick("SELECT DISTINCT role FROM employees"), c.rng.choice(STAFF)
    if c.rng.random() < 0.4:
        return c.rng.choice(
            [f"What is the average salary of {who} per role?", f"Show the mean salary of {who} by role."]
        ), ("SELECT role, AVG(salary) FROM employees GROUP BY role;")
    fn, word = c.rng.choice([("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest")])
    q = c.rng.choice(
        [f"What is the {word} salary of {who} working as {role}?", f"Give the {word} pay of {role} {who}."]
    )
    return q, f"SELECT {fn}(salary) FROM employees WHERE role = '{role}';"


def q_staff_at_store(c: Ctx) -> tuple[str, str]:
    city, who, shop = (
        c.pick("SELECT DISTINCT stores.city FROM employees JOIN stores ON employees.store_id = stores.store_id"),
        c.rng.choice(STAFF),
        c.rng.choice(STORES),
    )  # noqa: E501
    q = c.rng.choice(
        [
            f"Who are the {who} at the {city} {singular(shop)}? Give their names.",
            f"List the names of {who} working in the {city} {singular(shop)}.",
        ]
    )
    return q, (
        "SELECT employees.full_name FROM employees JOIN stores ON employees.store_id = stores.store_id "
        f"WHERE stores.city = '{city}';"
    )


def q_orders_by_customer_city(c: Ctx) -> tuple[str, str]:
    city, who, what = c.pick("SELECT DISTINCT city FROM customers"), c.rng.choice(CUSTOMERS), c.rng.choice(ORDERS)
    q = c.rng.choice(
        [f"How many {what} were made by {who} living in {city}?", f"Count the {what} of {who} from {city}."]
    )
    return q, (
        "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.customer_id "
        f"WHERE customers.city = '{city}';"
    )


def q_orders_per_store(c: Ctx) -> tuple[str, str]:
    what, shop = c.rng.choice(ORDERS), c.rng.choice(STORES)
    if c.rng.random() < 0.5:
        q = c.rng.choice(
            [f"How many {what} did each {singular(shop)} city take?", f"Count the {what} per {singular(shop)} city."]
        )
        return q, (
            "SELECT stores.city, COUNT(*) FROM orders JOIN stores ON orders.store_id = stores.store_id "
            "GROUP BY stores.city;"
        )
    city = c.pick("SELECT city FROM stores")
    q = c.rng.choice(
        [
            f"How many {what} were placed at the {city} {singular(shop)}?",
            f"Count the {what} taken by the {city} {singular(shop)}.",
        ]
    )
    return q, (
        f"SELECT COUNT(*) FROM orders JOIN stores ON orders.store_id = stores.store_id WHERE stores.city = '{city}';"
    )


def q_staff_count(c: Ctx) -> tuple[str, str]:
    city, role, shop = c.pick("SELECT city FROM stores"), c.rng.choice(ROLES), c.rng.choice(STORES)
    q = c.rng.choice(
        [f"How many {role}s work at the {city} {singular(shop)}?", f"Count the {role}s of the {city} {singular(shop)}."]
    )
    return q, (
        "SELECT COUNT(*) FROM employees JOIN stores ON employees.store_id = stores.store_id "
        f"WHERE stores.city = '{city}' AND employees.role = '{role}';"
    )


def q_segment_orders_year(c: Ctx) -> tuple[str, str]:
    seg, year, who, what = c.rng.choice(SEGMENTS), c.rng.choice(YEARS), c.rng.choice(CUSTOMERS), c.rng.choice(ORDERS)
    q = c.rng.choice([f"How many {what} did {seg} {who} make in {year}?", f"Count the {year} {what} of {seg} {who}."])
    return q, (
        "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.customer_id "
        f"WHERE customers.segment = '{seg}' AND orders.order_year = {year};"
    )


def q_quantity_sold(c: Ctx) -> tuple[str, str]:
    title = c.pick("SELECT title FROM products")
    q = c.rng.choice(
        [f"How many units of {title} were sold in total?", f"What is the total quantity ordered of {title}?"]
    )
    return q, (
        "SELECT SUM(order_items.quantity) FROM order_items "
        "JOIN products ON order_items.product_id = products.product_id "
        f"WHERE products.title = '{title}';"
    )


def q_distinct(c: Ctx) -> tuple[str, str]:
    choice = c.rng.randrange(4)
    if choice == 0:
        w, price = c.rng.choice(PRODUCTS), c.rng.choice([20, 40, 60, 80, 100, 150])
        q = c.rng.choice(
            [
                f"Which categories have {w} under {price} dollars?",
                f"List the distinct categories of {w} cheaper than {price}.",
            ]
        )
        return q, f"SELECT DISTINCT category FROM products WHERE unit_price < {price};"
    if choice == 1:
        w, seg = c.rng.choice(CUSTOMERS), c.rng.choice(SEGMENTS)
        q = c.rng.choice([f"In which cities do {seg} {w} live?", f"List the distinct cities of {seg} {w}."])
        return q, f"SELECT DISTINCT city FROM customers WHERE segment = '{seg}';"
    if choice == 2:
        w, year = c.rng.choice(ORDERS), c.rng.choice(YEARS)
        q = c.rng.choice(
            [f"Which statuses did {w} from {year} end up in?", f"List the distinct statuses of {year} {w}."]
        )
        return q, f"SELECT DISTINCT status FROM orders WHERE order_year = {year};"
    city, who, shop = c.pick("SELECT city FROM stores"), c.rng.choice(STAFF), c.rng.choice(STORES)
    q = c.rng.choice(
        [
            f"Which roles do the {who} of the {city} {singular(shop)} have?",
            f"List the distinct roles at the {city} {singular(shop)}.",
        ]
    )
    return q, (
        "SELECT DISTINCT employees.role FROM employees JOIN stores ON employees.store_id = stores.store_id "
        f"WHERE stores.city = '{city}';"
    )


TEMPLATES: list[Callable[[Ctx], tuple[str, str]]] = [
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


def build_demo_task(out_dir: Path, *, n_train: int = 2200, n_test: int = 350, seed: int = 11) -> dict[str, int]:
    """Write the database, the train/test JSONL and the schema to ``out_dir``; return the counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    db_path = out_dir / "retail.db"
    build_database(db_path)
    (out_dir / "schema.sql").write_text(SCHEMA)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    ctx = Ctx(random.Random(seed), db)
    pairs: dict[str, str] = {}
    attempts = 0
    while len(pairs) < n_train + n_test:
        attempts += 1
        if attempts > 50 * (n_train + n_test):
            raise RuntimeError(f"only {len(pairs)} distinct questions after {attempts} attempts")
        question, sql = ctx.rng.choice(TEMPLATES)(ctx)
        if question not in pairs and _usable(db, sql):
            pairs[question] = sql
    db.close()
    items = sorted(pairs.items())
    random.Random(seed).shuffle(items)
    splits = {"test": items[:n_test], "train": items[n_test:]}
    for name, rows in splits.items():
        with (out_dir / f"{name}.jsonl").open("w") as fh:
            for question, sql in rows:
                fh.write(json.dumps({"instruction": question, "response": sql}) + "\n")
    return {name: len(rows) for name, rows in splits.items()}
