"""A second text-to-SQL task on another database: an outpatient clinic. It shares nothing with the retail task
but the way questions are generated (``offline.demo_task``'s intents and styles): other tables, other column
conventions (``physician_name``, ``visit_kind``, ``dose_mg``), other words. The base model was pre-trained on
neither database, so one base can serve two fine-tunes that each know one company's schema.

``build_clinic_task(out_dir)`` writes, deterministically, ``clinic.db``, ``schema.sql``, ``train.jsonl`` and
``test.jsonl`` (no question in both, test worded in the plain forms, training typed as people type).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from offline.demo_task import Ctx, Intent, Style, _write, generate, typed

SCHEMA = """\
CREATE TABLE departments (department_id INTEGER PRIMARY KEY, dept_name TEXT NOT NULL, floor INTEGER NOT NULL);
CREATE TABLE physicians (physician_id INTEGER PRIMARY KEY, physician_name TEXT NOT NULL, grade TEXT NOT NULL,
                         department_id INTEGER NOT NULL REFERENCES departments(department_id),
                         hired_year INTEGER NOT NULL);
CREATE TABLE patients (patient_id INTEGER PRIMARY KEY, patient_name TEXT NOT NULL, birth_year INTEGER NOT NULL,
                       home_town TEXT NOT NULL, insurer TEXT NOT NULL);
CREATE TABLE visits (visit_id INTEGER PRIMARY KEY, patient_id INTEGER NOT NULL REFERENCES patients(patient_id),
                     physician_id INTEGER NOT NULL REFERENCES physicians(physician_id), visit_year INTEGER NOT NULL,
                     visit_kind TEXT NOT NULL, fee REAL NOT NULL);
CREATE TABLE drugs (drug_id INTEGER PRIMARY KEY, drug_name TEXT NOT NULL, drug_class TEXT NOT NULL,
                    dose_mg INTEGER NOT NULL);
CREATE TABLE prescriptions (prescription_id INTEGER PRIMARY KEY, visit_id INTEGER NOT NULL REFERENCES visits(visit_id),
                            drug_id INTEGER NOT NULL REFERENCES drugs(drug_id), days_supplied INTEGER NOT NULL);
"""

# Values the base's tokenizer spells in few pieces: a model this small copies short values far more reliably.
GIVEN = ["Ana", "Leo", "Mia", "Omar", "Sara", "Zoe", "Kim", "Lee", "Max", "Ivan", "Elena", "Oscar"]
FAMILY = ["Park", "Wong", "Khan", "Singh", "Diaz", "Petrov", "Rossi", "Haddad", "Berg", "Quinn", "Cruz", "Lee"]
TOWNS = ["Denver", "Leeds", "Kyoto", "Lyon", "Milan", "Quito", "Riga", "Turin"]
INSURERS = ["Bright", "Central", "Coastal", "Golden", "Silver"]
DEPARTMENTS = {"heart": 3, "skin": 1, "bones": 2, "brain": 4, "eyes": 2, "lungs": 5}
GRADES = ["senior", "junior", "visiting", "resident"]
KINDS = ["routine", "urgent", "online", "scan", "surgery"]
DRUGS = {
    "pain": ["aspirin", "codeine", "advil"],
    "mood": ["prozac", "lithium"],
    "sleep": ["valium", "xanax"],
    "blood": ["heparin", "iron", "insulin"],
}
YEARS = list(range(2018, 2025))


def build_database(path: Path, seed: int = 5) -> None:
    """Create the clinic database at ``path`` (replaced if present), deterministically."""
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    people = [f"{g} {f}" for g in GIVEN for f in FAMILY]
    rng.shuffle(people)
    departments = [(i + 1, name, floor) for i, (name, floor) in enumerate(DEPARTMENTS.items())]
    physicians = []
    for i in range(30):
        dept = rng.choice(departments)
        physicians.append((i + 1, "Dr. " + people[i], rng.choice(GRADES), dept[0], rng.choice(YEARS)))
    patients = [
        (i + 1, people[30 + i], rng.randint(1940, 2015), rng.choice(TOWNS), rng.choice(INSURERS)) for i in range(110)
    ]
    drugs, did = [], 0
    for drug_class, names in DRUGS.items():
        for name in names:
            did += 1
            drugs.append((did, name, drug_class, rng.choice([5, 10, 20, 40, 250, 500])))
    visits, prescriptions = [], []
    for vid in range(1, 1801):
        kind = rng.choices(KINDS, weights=[6, 4, 2, 3, 1])[0]
        fee = round(rng.uniform(40, 900 if kind == "surgery" else 260), 2)
        patient, physician = rng.randint(1, len(patients)), rng.randint(1, len(physicians))
        visits.append((vid, patient, physician, rng.choice(YEARS), kind, fee))
        for drug in rng.sample(range(1, len(drugs) + 1), rng.choice([0, 0, 1, 1, 2])):
            prescriptions.append((len(prescriptions) + 1, vid, drug, rng.choice([5, 7, 10, 14, 30, 90])))
    db.executemany("INSERT INTO departments VALUES (?,?,?)", departments)
    db.executemany("INSERT INTO physicians VALUES (?,?,?,?,?)", physicians)
    db.executemany("INSERT INTO patients VALUES (?,?,?,?,?)", patients)
    db.executemany("INSERT INTO drugs VALUES (?,?,?,?)", drugs)
    db.executemany("INSERT INTO visits VALUES (?,?,?,?,?,?)", visits)
    db.executemany("INSERT INTO prescriptions VALUES (?,?,?,?)", prescriptions)
    db.commit()
    db.close()


SYNONYMS = {
    "patients": ["patients", "registered patients", "people on our books"],
    "physicians": ["physicians", "doctors", "clinicians"],
    "visits": ["visits", "appointments", "consultations"],
    "drugs": ["drugs", "medications", "medicines"],
    "prescriptions": ["prescriptions", "scripts"],
}


def q_patients_from_town(c: Ctx) -> Intent:
    town = c.pick("SELECT DISTINCT home_town FROM patients")
    sql = f"SELECT COUNT(*) FROM patients WHERE home_town = '{town}';"
    return "patients_from_town", {"who": c.syn("patients"), "town": town}, sql


def q_patients_insurer(c: Ctx) -> Intent:
    insurer = c.rng.choice(INSURERS)
    sql = f"SELECT COUNT(*) FROM patients WHERE insurer = '{insurer}';"
    return "patients_insurer", {"who": c.syn("patients"), "insurer": insurer}, sql


def q_patients_born_before(c: Ctx) -> Intent:
    year = c.rng.choice([1950, 1960, 1970, 1980, 1990, 2000])
    sql = f"SELECT patient_name FROM patients WHERE birth_year < {year};"
    return "patients_born_before", {"who": c.syn("patients"), "year": year}, sql


def q_physicians_grade(c: Ctx) -> Intent:
    grade = c.rng.choice(GRADES)
    sql = f"SELECT physician_name FROM physicians WHERE grade = '{grade}';"
    return "physicians_grade", {"doc": c.syn("physicians"), "grade": grade}, sql


def q_physicians_in_department(c: Ctx) -> Intent:
    dept = c.pick("SELECT dept_name FROM departments")
    sql = (
        "SELECT COUNT(*) FROM physicians p JOIN departments d ON p.department_id = d.department_id "
        f"WHERE d.dept_name = '{dept}';"
    )
    return "physicians_in_department", {"doc": c.syn("physicians"), "dept": dept}, sql


def q_department_floor(c: Ctx) -> Intent:
    dept = c.pick("SELECT dept_name FROM departments")
    return "department_floor", {"dept": dept}, f"SELECT floor FROM departments WHERE dept_name = '{dept}';"


def q_visits_kind_year(c: Ctx) -> Intent:
    kind, year = c.rng.choice(KINDS), c.rng.choice(YEARS)
    sql = f"SELECT COUNT(*) FROM visits WHERE visit_kind = '{kind}' AND visit_year = {year};"
    return "visits_kind_year", {"what": c.syn("visits"), "kind": kind, "year": year}, sql


def q_average_fee(c: Ctx) -> Intent:
    kind = c.rng.choice(KINDS)
    sql = f"SELECT AVG(fee) FROM visits WHERE visit_kind = '{kind}';"
    return "average_fee", {"what": c.syn("visits"), "kind": kind}, sql


def q_fees_of_physician(c: Ctx) -> Intent:
    doc = c.pick("SELECT physician_name FROM physicians")
    sql = (
        "SELECT SUM(v.fee) FROM visits v JOIN physicians p ON v.physician_id = p.physician_id "
        f"WHERE p.physician_name = '{doc}';"
    )
    return "fees_of_physician", {"name": doc, "what": c.syn("visits")}, sql


def q_visits_from_town(c: Ctx) -> Intent:
    town = c.pick("SELECT DISTINCT home_town FROM patients")
    sql = f"SELECT COUNT(*) FROM visits v JOIN patients p ON v.patient_id = p.patient_id WHERE p.home_town = '{town}';"
    return "visits_from_town", {"what": c.syn("visits"), "town": town, "who": c.syn("patients")}, sql


def q_drugs_in_class(c: Ctx) -> Intent:
    drug_class = c.rng.choice(list(DRUGS))
    sql = f"SELECT drug_name FROM drugs WHERE drug_class = '{drug_class}';"
    return "drugs_in_class", {"med": c.syn("drugs"), "class": drug_class}, sql


def q_prescriptions_of_drug(c: Ctx) -> Intent:
    drug = c.pick("SELECT drug_name FROM drugs")
    sql = f"SELECT COUNT(*) FROM prescriptions r JOIN drugs d ON r.drug_id = d.drug_id WHERE d.drug_name = '{drug}';"
    return "prescriptions_of_drug", {"rx": c.syn("prescriptions"), "drug": drug}, sql


def q_dose(c: Ctx) -> Intent:
    drug = c.pick("SELECT drug_name FROM drugs")
    return "dose", {"drug": drug}, f"SELECT dose_mg FROM drugs WHERE drug_name = '{drug}';"


def q_visits_town_year(c: Ctx) -> Intent:
    town, year = c.pick("SELECT DISTINCT home_town FROM patients"), c.rng.choice(YEARS)
    sql = (
        "SELECT COUNT(*) FROM visits v JOIN patients p ON v.patient_id = p.patient_id "
        f"WHERE p.home_town = '{town}' AND v.visit_year = {year};"
    )
    return "visits_town_year", {"what": c.syn("visits"), "town": town, "year": year}, sql


def q_fees_kind_year(c: Ctx) -> Intent:
    kind, year = c.rng.choice(KINDS), c.rng.choice(YEARS)
    sql = f"SELECT SUM(fee) FROM visits WHERE visit_kind = '{kind}' AND visit_year = {year};"
    return "fees_kind_year", {"what": c.syn("visits"), "kind": kind, "year": year}, sql


def q_patients_town_insurer(c: Ctx) -> Intent:
    town, insurer = c.pick("SELECT DISTINCT home_town FROM patients"), c.rng.choice(INSURERS)
    sql = f"SELECT COUNT(*) FROM patients WHERE home_town = '{town}' AND insurer = '{insurer}';"
    return "patients_town_insurer", {"who": c.syn("patients"), "town": town, "insurer": insurer}, sql


def q_physicians_hired_after(c: Ctx) -> Intent:
    year = c.rng.choice(YEARS[:-1])
    sql = f"SELECT physician_name FROM physicians WHERE hired_year > {year};"
    return "physicians_hired_after", {"doc": c.syn("physicians"), "year": year}, sql


INTENTS = [
    q_visits_town_year,
    q_fees_kind_year,
    q_patients_town_insurer,
    q_physicians_hired_after,
    q_patients_from_town,
    q_patients_insurer,
    q_patients_born_before,
    q_physicians_grade,
    q_physicians_in_department,
    q_department_floor,
    q_visits_kind_year,
    q_average_fee,
    q_fees_of_physician,
    q_visits_from_town,
    q_drugs_in_class,
    q_prescriptions_of_drug,
    q_dose,
]

FORMS = {
    "visits_town_year": ["How many {what} did people from {town} have in {year}?", "Count {town}'s {what} in {year}."],
    "fees_kind_year": ["What were the total fees of {kind} {what} in {year}?", "Sum of {kind} fees in {year}?"],
    "patients_town_insurer": ["How many {who} from {town} are insured by {insurer}?", "{insurer} {who} in {town}?"],
    "physicians_hired_after": ["Which {doc} were hired after {year}?", "Name the {doc} hired after {year}."],
    "patients_from_town": ["How many {who} live in {town}?", "Count the {who} from {town}."],
    "patients_insurer": ["How many {who} are insured by {insurer}?", "Number of {who} with {insurer} cover?"],
    "patients_born_before": ["Which {who} were born before {year}?", "Name the {who} born before {year}."],
    "physicians_grade": ["Which {doc} are {grade}?", "List the {grade} {doc}."],
    "physicians_in_department": ["How many {doc} work in the {dept} unit?", "Count the {doc} of the {dept} unit."],
    "department_floor": ["Which floor is the {dept} unit on?", "On what floor is the {dept} unit?"],
    "visits_kind_year": ["How many {kind} {what} were there in {year}?", "Count the {kind} {what} of {year}."],
    "average_fee": ["What is the average fee of a {kind} among our {what}?", "Average fee for {kind} {what}?"],
    "fees_of_physician": ["What did {name} bill in total for {what}?", "Total fees of {name}'s {what}?"],
    "visits_from_town": ["How many {what} did {who} from {town} make?", "Count the {what} of {who} in {town}."],
    "drugs_in_class": ["Which {med} are for {class}?", "List the {class} {med}."],
    "prescriptions_of_drug": ["How many {rx} were written for {drug}?", "Count the {rx} of {drug}."],
    "dose": ["What is the dose of {drug} in mg?", "How many milligrams is a dose of {drug}?"],
}
MORE_FORMS = {
    "visits_town_year": ["{year} {what} from {town}", "{town}, {year}: number of {what}"],
    "fees_kind_year": ["{kind} fees total for {year}", "how much did {kind} {what} bring in during {year}"],
    "patients_town_insurer": ["count {who} in {town} covered by {insurer}", "{town} {who} with {insurer}"],
    "physicians_hired_after": ["{doc} hired since after {year}", "show me {doc} who joined after {year}"],
    "patients_from_town": ["{town}: number of {who}?", "tell me how many {who} come from {town}"],
    "patients_insurer": ["{insurer} {who}, how many?", "give me the count of {who} covered by {insurer}"],
    "patients_born_before": ["{who} born before {year}", "show me {who} with a birth year before {year}"],
    "physicians_grade": ["{grade} {doc} on staff", "who are the {grade} {doc}"],
    "physicians_in_department": ["{dept} unit: how many {doc}?", "number of {doc} in the {dept} unit"],
    "department_floor": ["{dept} unit floor", "where is the {dept} unit, which floor"],
    "visits_kind_year": ["{year} {kind} {what} count", "how many {what} in {year} were {kind}s"],
    "average_fee": ["mean fee of {kind} {what}", "what does a {kind} cost on average"],
    "fees_of_physician": ["{name}: total billed", "sum of the fees {name} charged"],
    "visits_from_town": ["{what} by {who} living in {town}", "{town} {who}: how many {what}?"],
    "drugs_in_class": ["{class} {med} we stock", "show me every {med} for {class}"],
    "prescriptions_of_drug": ["{drug} {rx} count", "how often was {drug} prescribed"],
    "dose": ["{drug} dose", "dose of {drug}, mg please"],
}

TEST = Style(FORMS, SYNONYMS)
TRAINING = Style({k: FORMS[k] + MORE_FORMS[k] for k in FORMS}, SYNONYMS, finish=typed)


def build_clinic_task(out_dir: Path, *, n_train: int = 2000, n_test: int = 200, seed: int = 23) -> dict[str, int]:
    """Write ``clinic.db``, ``schema.sql``, ``train.jsonl`` and ``test.jsonl`` to ``out_dir``; return the counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    db_path = out_dir / "clinic.db"
    build_database(db_path)
    (out_dir / "schema.sql").write_text(SCHEMA)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    test = generate(db, TEST, n_test, seed=seed, exclude=set(), intents=INTENTS)
    train = generate(db, TRAINING, n_train, seed=seed + 2, exclude=set(test), intents=INTENTS)
    db.close()
    splits = {"train": list(train.values()), "test": list(test.values())}
    for name, rows in splits.items():
        _write(out_dir / f"{name}.jsonl", rows)
    return {name: len(rows) for name, rows in splits.items()}
