"""The generic pre-training corpus of the offline base model: text-to-SQL over random schemas, plus plain text.

Every example invents a small schema from word pools (tables that link by ``<table>_id`` columns),
asks a question in English and answers with SQLite SQL in the seed's instruction format. The schemas
are generic on purpose: the demo task's retail schema (``offline/demo_task.py``) is never generated here,
so a fine-tune has something real to teach. The corpus does cover every SQL construct and value shape
the demo uses (COUNT/SUM/AVG/MIN/MAX, JOIN, AND, comparisons, GROUP BY, ORDER BY … LIMIT, DISTINCT,
quoted strings, integers, decimals, snake_case names): with tied embeddings a LoRA cannot teach tokens
the base never learnt to emit.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from infra.prompts import alpaca_prompt

# Table nouns (singular, plural). The demo's tables (customers, products, stores, orders, order_items,
# employees) are deliberately absent.
NOUNS = [
    ("book", "books"),
    ("author", "authors"),
    ("ship", "ships"),
    ("planet", "planets"),
    ("student", "students"),
    ("course", "courses"),
    ("teacher", "teachers"),
    ("hospital", "hospitals"),
    ("patient", "patients"),
    ("doctor", "doctors"),
    ("team", "teams"),
    ("player", "players"),
    ("match", "matches"),
    ("city", "cities"),
    ("country", "countries"),
    ("river", "rivers"),
    ("museum", "museums"),
    ("painting", "paintings"),
    ("artist", "artists"),
    ("album", "albums"),
    ("song", "songs"),
    ("band", "bands"),
    ("movie", "movies"),
    ("actor", "actors"),
    ("studio", "studios"),
    ("airline", "airlines"),
    ("flight", "flights"),
    ("airport", "airports"),
    ("train", "trains"),
    ("station", "stations"),
    ("hotel", "hotels"),
    ("room", "rooms"),
    ("guest", "guests"),
    ("farm", "farms"),
    ("animal", "animals"),
    ("plant", "plants"),
    ("garden", "gardens"),
    ("school", "schools"),
    ("club", "clubs"),
    ("member", "members"),
    ("event", "events"),
    ("venue", "venues"),
    ("ticket", "tickets"),
    ("library", "libraries"),
    ("loan", "loans"),
    ("account", "accounts"),
    ("bank", "banks"),
    ("branch", "branches"),
    ("device", "devices"),
    ("sensor", "sensors"),
    ("reading", "readings"),
    ("vehicle", "vehicles"),
    ("driver", "drivers"),
    ("route", "routes"),
    ("project", "projects"),
    ("task", "tasks"),
    ("repository", "repositories"),
    ("issue", "issues"),
    ("recipe", "recipes"),
    ("ingredient", "ingredients"),
    ("restaurant", "restaurants"),
    ("dish", "dishes"),
    ("volunteer", "volunteers"),
    ("shelter", "shelters"),
    ("park", "parks"),
    ("trail", "trails"),
    ("mountain", "mountains"),
    ("lake", "lakes"),
    ("island", "islands"),
    ("festival", "festivals"),
    ("warehouse", "warehouses"),
    ("shipment", "shipments"),
    ("supplier", "suppliers"),
    ("contract", "contracts"),
    ("invoice", "invoices"),
    ("vendor", "vendors"),
    ("machine", "machines"),
    ("factory", "factories"),
    ("worker", "workers"),
    ("shift", "shifts"),
    ("game", "games"),
    ("tournament", "tournaments"),
    ("coach", "coaches"),
    ("satellite", "satellites"),
    ("mission", "missions"),
    ("telescope", "telescopes"),
    ("galaxy", "galaxies"),
    ("podcast", "podcasts"),
    ("episode", "episodes"),
    ("journal", "journals"),
    ("article", "articles"),
    ("editor", "editors"),
    ("bridge", "bridges"),
    ("building", "buildings"),
    ("tenant", "tenants"),
    ("apartment", "apartments"),
    ("pet", "pets"),
    ("clinic", "clinics"),
    ("vaccine", "vaccines"),
    ("batch", "batches"),
    ("course_unit", "course_units"),
    ("user", "users"),
    ("session", "sessions"),
    ("page", "pages"),
    ("campaign", "campaigns"),
    ("donor", "donors"),
    ("grant", "grants"),
    ("lab", "labs"),
    ("experiment", "experiments"),
    ("sample", "samples"),
]

# Text columns (name, value pool) and numeric columns (name, kind, low, high).
TEXT_COLUMNS = [
    ("name", "names"),
    ("title", "titles"),
    ("city", "cities"),
    ("country", "countries"),
    ("color", "colors"),
    ("status", "statuses"),
    ("kind", "kinds"),
    ("region", "regions"),
    ("genre", "genres"),
    ("level", "levels"),
    ("category", "categories"),
    ("home_city", "cities"),
    ("brand", "names"),
    ("label", "titles"),
    ("segment", "kinds"),
    ("language", "languages"),
    ("owner_name", "names"),
    ("full_name", "names"),
    ("role", "roles"),
    ("state", "statuses"),
    ("tier", "levels"),
    ("zone", "regions"),
    ("code_name", "titles"),
]
NUM_COLUMNS = [
    ("price", "real", 1, 500),
    ("age", "int", 1, 90),
    ("year", "int", 1990, 2025),
    ("rating", "real", 1, 10),
    ("capacity", "int", 10, 5000),
    ("weight", "real", 1, 900),
    ("score", "int", 0, 100),
    ("budget", "int", 1000, 90000),
    ("salary", "int", 20000, 150000),
    ("quantity", "int", 1, 60),
    ("length", "real", 1, 300),
    ("height", "int", 1, 400),
    ("unit_cost", "real", 1, 250),
    ("unit_price", "real", 1, 400),
    ("total_amount", "real", 5, 3000),
    ("birth_year", "int", 1940, 2010),
    ("founded_year", "int", 1850, 2024),
    ("joined_year", "int", 2010, 2025),
    ("order_year", "int", 2015, 2025),
    ("start_month", "int", 1, 12),
    ("max_speed", "int", 10, 900),
    ("population", "int", 100, 900000),
    ("distance", "real", 1, 2000),
    ("duration", "int", 1, 240),
    ("discount", "int", 0, 50),
    ("stock", "int", 0, 500),
    ("visits", "int", 0, 10000),
    ("cost", "real", 1, 999),
]

VALUES = {
    "names": [
        "Alice",
        "Bruno",
        "Chen",
        "Dara",
        "Elena",
        "Farid",
        "Grace",
        "Hugo",
        "Ines",
        "Jonas",
        "Kira",
        "Liam",
        "Maya",
        "Noor",
        "Oscar",
        "Priya",
        "Quinn",
        "Rosa",
        "Sami",
        "Tara",
        "Umar",
        "Vera",
        "Wen",
        "Yusuf",
        "Zoe",
        "Anna Berg",
        "Marco Rossi",
        "Lena Park",
        "Omar Haddad",
        "Sofia Diaz",
        "Ivan Petrov",
    ],
    "titles": [
        "Blue Sky",
        "Iron Road",
        "Silver Leaf",
        "Red Door",
        "North Star",
        "Deep Water",
        "Green Hill",
        "Quiet Storm",
        "Golden Gate",
        "Night Train",
        "Open Field",
        "Stone Bridge",
        "Bright Path",
    ],
    "cities": [
        "Paris",
        "Lagos",
        "Tokyo",
        "Lima",
        "Oslo",
        "Cairo",
        "Dublin",
        "Austin",
        "Denver",
        "Madrid",
        "Seoul",
        "Lyon",
        "Porto",
        "Boston",
        "Chicago",
        "Nairobi",
        "Perth",
        "Quito",
        "Riga",
        "Turin",
        "Berlin",
        "Vienna",
        "Mumbai",
        "Toronto",
        "Seattle",
        "Milan",
        "Leeds",
        "Kyoto",
        "Athens",
        "Bogota",
    ],
    "countries": [
        "France",
        "Japan",
        "Peru",
        "Norway",
        "Egypt",
        "Ireland",
        "Spain",
        "Kenya",
        "Chile",
        "Brazil",
        "Canada",
        "India",
        "Italy",
        "Mexico",
        "Poland",
        "Ghana",
        "Vietnam",
        "Germany",
        "Austria",
    ],
    "colors": ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey", "silver"],
    "statuses": [
        "active",
        "closed",
        "pending",
        "shipped",
        "cancelled",
        "returned",
        "open",
        "paused",
        "done",
        "delivered",
        "draft",
        "archived",
        "failed",
        "approved",
    ],
    "kinds": [
        "basic",
        "premium",
        "standard",
        "business",
        "consumer",
        "student",
        "retail",
        "public",
        "private",
        "casual",
        "pro",
        "senior",
        "junior",
    ],
    "regions": ["North", "South", "East", "West", "Central", "Coastal", "Mountain", "Island"],
    "genres": ["jazz", "rock", "drama", "comedy", "horror", "science", "history", "poetry", "pop", "folk"],
    "levels": ["low", "medium", "high", "gold", "silver", "bronze", "entry", "expert"],
    "languages": ["English", "French", "Spanish", "German", "Hindi", "Arabic", "Korean", "Swahili"],
    "roles": ["manager", "clerk", "cashier", "engineer", "analyst", "nurse", "pilot", "chef", "guide", "driver"],
    "categories": [
        "electronics",
        "garden",
        "toys",
        "books",
        "sports",
        "kitchen",
        "music",
        "office",
        "beauty",
        "outdoor",
        "tools",
        "games",
        "food",
        "clothing",
    ],
}


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "text", "int" or "real"
    pool: str = ""
    low: int = 0
    high: int = 0


@dataclass(frozen=True)
class Table:
    name: str  # SQL name (plural)
    singular: str
    columns: tuple[Column, ...]

    def text_cols(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "text"]

    def num_cols(self) -> list[Column]:
        return [c for c in self.columns if c.kind != "text"]

    def ddl(self, parent: Table | None = None) -> str:
        cols = ["id INTEGER PRIMARY KEY"]
        cols += [
            f"{c.name} {'TEXT' if c.kind == 'text' else ('INTEGER' if c.kind == 'int' else 'REAL')}"
            for c in self.columns
        ]
        if parent is not None:
            cols.append(f"{parent.singular}_id INTEGER")
        return f"CREATE TABLE {self.name} ({', '.join(cols)});"


def words(name: str) -> str:
    """How a snake_case identifier reads in a question."""
    return name.replace("_", " ")


def random_table(rng: random.Random, noun: tuple[str, str]) -> Table:
    singular, plural = noun
    text = rng.sample(TEXT_COLUMNS, rng.randint(1, 3))
    num = rng.sample(NUM_COLUMNS, rng.randint(1, 3))
    cols = [Column(n, "text", pool) for n, pool in text] + [Column(n, k, "", lo, hi) for n, k, lo, hi in num]
    rng.shuffle(cols)
    return Table(plural.replace(" ", "_"), singular.replace(" ", "_"), tuple(cols))


def value(rng: random.Random, col: Column) -> tuple[str, str]:
    """A (question text, SQL literal) pair for a value of ``col``."""
    if col.kind == "text":
        v = rng.choice(VALUES[col.pool])
        return v, "'" + v.replace("'", "''") + "'"
    if col.kind == "int":
        v = str(rng.randint(col.low, col.high))
        return v, v
    v = f"{rng.uniform(col.low, col.high):.2f}".rstrip("0").rstrip(".")
    return v, v


Template = Callable[[random.Random, Table, Table], tuple[str, str] | None]


def _pick(rng: random.Random, options: list[str]) -> str:
    return rng.choice(options)


def t_select_where_num(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols() or not t.num_cols():
        return None
    c, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    op, word = rng.choice(
        [(">", ["above", "greater than", "more than", "over"]), ("<", ["below", "less than", "under"])]
    )
    vq, vs = value(rng, n)
    w = rng.choice(word)
    q = _pick(
        rng,
        [
            f"List the {words(c.name)} of every {t.singular.replace('_', ' ')} whose {words(n.name)} is {w} {vq}.",
            f"Which {words(t.name)} have a {words(n.name)} {w} {vq}? Give their {words(c.name)}.",
            f"Show the {words(c.name)} of {words(t.name)} with {words(n.name)} {w} {vq}.",
        ],
    )
    return q, f"SELECT {c.name} FROM {t.name} WHERE {n.name} {op} {vs};"


def t_count_where(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols():
        return None
    c = rng.choice(t.text_cols())
    vq, vs = value(rng, c)
    q = _pick(
        rng,
        [
            f"How many {words(t.name)} have {words(c.name)} {vq}?",
            f"Count the {words(t.name)} whose {words(c.name)} is {vq}.",
            f"What is the number of {words(t.name)} with {words(c.name)} {vq}?",
        ],
    )
    return q, f"SELECT COUNT(*) FROM {t.name} WHERE {c.name} = {vs};"


AGGS = [
    ("AVG", ["average", "mean"]),
    ("SUM", ["total", "sum of the"]),
    ("MAX", ["highest", "largest", "maximum"]),
    ("MIN", ["lowest", "smallest", "minimum"]),
]


def t_agg_where(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols() or not t.num_cols():
        return None
    c, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    fn, names = rng.choice(AGGS)
    w = rng.choice(names)
    vq, vs = value(rng, c)
    q = _pick(
        rng,
        [
            f"What is the {w} {words(n.name)} of {words(t.name)} with {words(c.name)} {vq}?",
            f"Find the {w} {words(n.name)} among {words(t.name)} whose {words(c.name)} is {vq}.",
        ],
    )
    return q, f"SELECT {fn}({n.name}) FROM {t.name} WHERE {c.name} = {vs};"


def t_agg_all(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.num_cols():
        return None
    n = rng.choice(t.num_cols())
    fn, names = rng.choice(AGGS)
    w = rng.choice(names)
    q = _pick(
        rng,
        [
            f"What is the {w} {words(n.name)} of all {words(t.name)}?",
            f"Give the {w} {words(n.name)} over every {words(t.singular)}.",
        ],
    )
    return q, f"SELECT {fn}({n.name}) FROM {t.name};"


def t_top_k(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols() or not t.num_cols():
        return None
    c, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    k = rng.randint(1, 10)
    desc = rng.random() < 0.6
    w = rng.choice(["highest", "largest", "top"] if desc else ["lowest", "smallest"])
    q = _pick(
        rng,
        [
            f"Show the {words(c.name)} of the {k} {words(t.name)} with the {w} {words(n.name)}.",
            f"Which {k} {words(t.name)} have the {w} {words(n.name)}? List their {words(c.name)}.",
        ],
    )
    order = "DESC" if desc else "ASC"
    return q, f"SELECT {c.name} FROM {t.name} ORDER BY {n.name} {order} LIMIT {k};"


def t_group_count(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols():
        return None
    c = rng.choice(t.text_cols())
    q = _pick(
        rng,
        [
            f"For each {words(c.name)}, how many {words(t.name)} are there?",
            f"Count the {words(t.name)} per {words(c.name)}.",
        ],
    )
    return q, f"SELECT {c.name}, COUNT(*) FROM {t.name} GROUP BY {c.name};"


def t_group_agg(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols() or not t.num_cols():
        return None
    c, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    fn, names = rng.choice(AGGS)
    w = rng.choice(names)
    q = _pick(
        rng,
        [
            f"For each {words(c.name)}, what is the {w} {words(n.name)} of {words(t.name)}?",
            f"Show the {w} {words(n.name)} of {words(t.name)} per {words(c.name)}.",
        ],
    )
    return q, f"SELECT {c.name}, {fn}({n.name}) FROM {t.name} GROUP BY {c.name};"


def t_group_order(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols():
        return None
    c = rng.choice(t.text_cols())
    k = rng.randint(1, 5)
    q = _pick(
        rng,
        [
            f"Which {k} {words(c.name)} values have the most {words(t.name)}?",
            f"Name the {k} most common {words(c.name)} among {words(t.name)}.",
        ],
    )
    return q, f"SELECT {c.name} FROM {t.name} GROUP BY {c.name} ORDER BY COUNT(*) DESC LIMIT {k};"


def t_distinct(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols():
        return None
    c = rng.choice(t.text_cols())
    q = _pick(
        rng,
        [
            f"Which different {words(c.name)} values appear among {words(t.name)}?",
            f"List the distinct {words(c.name)} of all {words(t.name)}.",
        ],
    )
    return q, f"SELECT DISTINCT {c.name} FROM {t.name};"


def t_and(rng: random.Random, t: Table, _: Table) -> tuple[str, str] | None:
    if not t.text_cols() or not t.num_cols():
        return None
    c, n = rng.choice(t.text_cols()), rng.choice(t.num_cols())
    out = rng.choice([x for x in t.columns if x.kind == "text"])
    vq, vs = value(rng, c)
    nq, ns = value(rng, n)
    op, w = rng.choice([(">", "above"), ("<", "below"), (">=", "at least"), ("<=", "at most")])
    q = _pick(
        rng,
        [
            f"List the {words(out.name)} of {words(t.name)} whose {words(c.name)} is {vq} "
            f"and whose {words(n.name)} is {w} {nq}.",
            f"Which {words(t.name)} have {words(c.name)} {vq} and {words(n.name)} {w} {nq}? "
            f"Show their {words(out.name)}.",
        ],
    )
    return q, f"SELECT {out.name} FROM {t.name} WHERE {c.name} = {vs} AND {n.name} {op} {ns};"


def t_join_filter(rng: random.Random, child: Table, parent: Table) -> tuple[str, str] | None:
    if not child.text_cols() or not parent.text_cols():
        return None
    c, p = rng.choice(child.text_cols()), rng.choice(parent.text_cols())
    vq, vs = value(rng, p)
    q = _pick(
        rng,
        [
            f"List the {words(c.name)} of {words(child.name)} whose {words(parent.singular)} has {words(p.name)} {vq}.",
            f"Show the {words(c.name)} of every {words(child.singular)} linked to a {words(parent.singular)} "
            f"with {words(p.name)} {vq}.",
        ],
    )
    sql = (
        f"SELECT {child.name}.{c.name} FROM {child.name} JOIN {parent.name} "
        f"ON {child.name}.{parent.singular}_id = {parent.name}.id WHERE {parent.name}.{p.name} = {vs};"
    )
    return q, sql


def t_join_group(rng: random.Random, child: Table, parent: Table) -> tuple[str, str] | None:
    if not parent.text_cols():
        return None
    p = rng.choice(parent.text_cols())
    if child.num_cols() and rng.random() < 0.5:
        n = rng.choice(child.num_cols())
        fn, names = rng.choice(AGGS)
        w = rng.choice(names)
        q = (
            f"For each {words(parent.singular)} {words(p.name)}, "
            f"what is the {w} {words(n.name)} of its {words(child.name)}?"
        )
        sel = f"{fn}({child.name}.{n.name})"
    else:
        q = _pick(
            rng,
            [
                f"How many {words(child.name)} does each {words(parent.singular)} {words(p.name)} have?",
                f"Count the {words(child.name)} per {words(parent.singular)} {words(p.name)}.",
            ],
        )
        sel = "COUNT(*)"
    sql = (
        f"SELECT {parent.name}.{p.name}, {sel} FROM {child.name} JOIN {parent.name} "
        f"ON {child.name}.{parent.singular}_id = {parent.name}.id GROUP BY {parent.name}.{p.name};"
    )
    return q, sql


def t_join_count(rng: random.Random, child: Table, parent: Table) -> tuple[str, str] | None:
    if not parent.num_cols():
        return None
    n = rng.choice(parent.num_cols())
    nq, ns = value(rng, n)
    op, w = rng.choice([(">", "above"), ("<", "below")])
    q = f"How many {words(child.name)} belong to {words(parent.name)} with {words(n.name)} {w} {nq}?"
    sql = (
        f"SELECT COUNT(*) FROM {child.name} JOIN {parent.name} "
        f"ON {child.name}.{parent.singular}_id = {parent.name}.id WHERE {parent.name}.{n.name} {op} {ns};"
    )
    return q, sql


SINGLE_TABLE: list[Template] = [
    t_select_where_num,
    t_count_where,
    t_agg_where,
    t_agg_all,
    t_top_k,
    t_group_count,
    t_group_agg,
    t_group_order,
    t_distinct,
    t_and,
]
JOINED: list[Template] = [t_join_filter, t_join_group, t_join_count]


@dataclass(frozen=True)
class SqlExample:
    question: str
    sql: str
    ddl: tuple[str, ...]  # the schema the SQL runs against (for validity checks)


def generate_example(rng: random.Random) -> SqlExample:
    """One question/SQL pair over a freshly invented one- or two-table schema."""
    while True:
        child_noun, parent_noun = rng.sample(NOUNS, 2)
        child, parent = random_table(rng, child_noun), random_table(rng, parent_noun)
        joined = rng.random() < 0.3
        template = rng.choice(JOINED if joined else SINGLE_TABLE)
        pair = template(rng, child, parent)
        if pair is not None:
            ddl = (parent.ddl(), child.ddl(parent)) if joined else (child.ddl(),)
            return SqlExample(pair[0], pair[1], ddl)


SENTENCES = [
    "The {a} in {city} sold {n} {b} last year.",
    "Our {a} team met the {b} group in {city} on a {color} morning.",
    "Every customer who buys a product at one of our stores gets a receipt with the order number.",
    "Shoppers and clients asked the staff about prices, discounts and the total spent on each purchase.",
    "The store in {city} opened in {year}; its manager hired {n} people and sold {n2} items.",
    "A {color} {a} costs {price} dollars, while the {b} costs less.",
    "Employees earn a salary, work at a shop and have a job title such as {role}.",
    "Customers joined the loyalty program in {year} and placed orders every month.",
    "Each order lists the items bought, the quantity of each item and the unit price.",
    "Revenue is the sum of quantity times unit price over all items that were not cancelled.",
    "In {year} the {a} of {city} counted {n} {b} and {n2} visitors.",
    "She ordered {n} {b} from the {color} catalogue and paid {price} in total.",
]


def plain_text(rng: random.Random) -> str:
    """A sentence of plain English, so that the base is a language model and not only a SQL generator."""
    a, b = rng.choice(NOUNS)[1], rng.choice(NOUNS)[1]
    return rng.choice(SENTENCES).format(
        a=a,
        b=b,
        city=rng.choice(VALUES["cities"]),
        color=rng.choice(VALUES["colors"]),
        n=rng.randint(2, 900),
        n2=rng.randint(2, 90),
        year=rng.randint(1990, 2025),
        price=f"{rng.uniform(1, 500):.2f}",
        role=rng.choice(VALUES["roles"]),
    )


def format_example(ex: SqlExample, eos: str) -> str:
    return alpaca_prompt(ex.question) + ex.sql + eos


# How people type a question rather than write it: requests instead of questions, greetings and sign-offs,
# lower case, no final punctuation, a slipped letter. The SQL keeps the values' case, so the base learns to read
# "paris" and write 'Paris'. Words and lead-ins differ from the demo task's paraphrase split on purpose.
_REQUESTS = [
    ("How many ", ["Tell me how many ", "Find out how many ", "Can you count how many "]),
    ("What is the ", ["Give me the ", "Find the ", "Look up the "]),
    ("Which ", ["Find the ", "Show which ", "Tell me which "]),
    ("List the ", ["Get the ", "Show me the ", "Fetch the "]),
    ("Count the ", ["Get a count of the ", "Count up the ", "How many are the "]),
]
_OPENERS = ["", "", "", "Question: ", "So, ", "Could you help? ", "Hello. ", "Okay: "]
_CLOSERS = ["", "", "", " Thank you.", " Much appreciated.", " ASAP."]


def typed_by_people(rng: random.Random, question: str, sql: str) -> str:
    """``question`` as someone might type it; words that are values in ``sql`` keep their letters."""
    protected = {w.lower() for literal in re.findall(r"'([^']*)'", sql) for w in literal.split()}
    q = question
    for start, alternatives in _REQUESTS:
        if q.startswith(start) and rng.random() < 0.5:
            q = rng.choice(alternatives) + q[len(start) :]
            break
    q = rng.choice(_OPENERS) + q
    if closer := rng.choice(_CLOSERS):
        q = q.rstrip("?.!") + "." + closer if not q.endswith(("?", ".", "!")) else q + closer
    if rng.random() < 0.2:
        spots = [m for m in re.finditer(r"[A-Za-z]{5,}", q) if m.group().lower() not in protected]
        if spots:
            m = rng.choice(spots)
            i = rng.randrange(1, len(m.group()) - 1)
            w = m.group()
            q = q[: m.start()] + w[:i] + w[i + 1 :] + q[m.end() :]
    if rng.random() < 0.4:
        q = q.lower()
    if rng.random() < 0.4:
        q = q.rstrip("?.!")
    return q


def corpus(
    seed: int, eos: str, *, plain_share: float = 0.1, typed_share: float = 0.0, varied_share: float = 0.0
) -> Iterator[str]:
    """An endless, deterministic stream of training documents (instruction-formatted SQL, some plain text);
    ``varied_share`` of the questions come in one of many sentence types (``offline/sql_varied.py``) and
    ``typed_share`` of them are typed the way people type them (:func:`typed_by_people`)."""
    from offline.sql_varied import generate_varied_example

    rng = random.Random(seed)
    while True:
        if rng.random() < plain_share:
            yield plain_text(rng) + eos
        else:
            varied = varied_share and rng.random() < varied_share
            ex = generate_varied_example(rng) if varied else generate_example(rng)
            if typed_share and rng.random() < typed_share:
                ex = SqlExample(typed_by_people(rng, ex.question, ex.sql), ex.sql, ex.ddl)
            yield format_example(ex, eos)
