"""Preprocess: every bad row is rejected with its file:line and reason, nothing is dropped silently,
splits are stable, and the prompt is masked out of the labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from infra.artifacts import ArtifactStore, LocalBackend
from infra.prompts import alpaca_prompt
from tasks.base_model import ResolvedModel
from tasks.config import load_run_config
from tasks.preprocess import PreprocessError, load_splits, preprocess


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache")


@pytest.fixture
def base(tiny_base) -> ResolvedModel:
    return ResolvedModel("tuneship/sql-tiny", str(tiny_base.path), tiny_base.ref.sha256)


def good_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {
            "instruction": f"How many ships have capacity {i}?",
            "response": f"SELECT COUNT(*) FROM ships WHERE capacity = {i};",
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, lines: list[object]) -> Path:
    with path.open("wb") as fh:
        for line in lines:
            fh.write(
                line if isinstance(line, bytes) else (json.dumps(line) if not isinstance(line, str) else line).encode()
            )
            fh.write(b"\n")
    return path


def run(path: Path | str, base: ResolvedModel, store: ArtifactStore, tmp_path: Path, *overrides: str):
    cfg = load_run_config(None, list(overrides), name="t", base_model=base.id, data={"source": str(path)})
    return preprocess(cfg.preprocess, cfg.data, name=cfg.name, base=base, store=store, workdir=tmp_path / "work")


def rejects_of(ref, store: ArtifactStore) -> list[dict[str, str]]:
    return [json.loads(line) for line in (store.get_dir(ref.artifact) / "rejects.jsonl").read_text().splitlines()]


def test_bad_rows_are_rejected_with_file_line_and_reason(base, store, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            *good_rows(40),
            '{"instruction": "broken", "response": ',  # line 41: malformed JSON
            {"instruction": "no response here"},  # line 42
            {"instruction": "", "response": "SELECT 1;"},  # line 43
            {"instruction": "typed", "response": 7},  # line 44
            b'{"instruction": "caf\xe9", "response": "SELECT 1;"}',  # line 45: Latin-1, not UTF-8
            {"instruction": "long " * 400, "response": "SELECT 1;"},  # line 46
            good_rows(1)[0],  # line 47: duplicate of line 1
            [1, 2, 3],  # line 48
        ],
    )
    ref = run(path, base, store, tmp_path, "preprocess.max_reject_rate=0.5")
    stats = ref.stats
    assert stats.rows_in == 48 and stats.kept == 40 and stats.rejected == 8
    assert stats.rows_in == stats.kept + stats.rejected
    by_line = {r["where"].rsplit(":", 1)[1]: r for r in rejects_of(ref, store)}
    assert by_line["41"]["code"] == "malformed_json" and "column" in by_line["41"]["reason"]
    assert by_line["42"]["reason"] == "missing field 'response'"
    assert by_line["43"]["reason"] == "field 'instruction' is empty"
    assert by_line["44"]["reason"] == "field 'response' is int, expected a string"
    assert by_line["45"]["code"] == "not_utf8" and "0xe9" in by_line["45"]["reason"]
    assert by_line["46"]["code"] == "too_long" and "preprocess.max_seq_len=256" in by_line["46"]["reason"]
    assert by_line["47"]["reason"] == f"exact duplicate of {path}:1"
    assert by_line["48"]["code"] == "not_an_object"
    assert all(r["where"].startswith(str(path)) and r["raw"] for r in by_line.values())  # nothing lost
    codes = ("malformed_json", "missing_field", "empty_field", "wrong_type", "not_utf8", "too_long", "duplicate")
    assert stats.reject_reasons == dict.fromkeys((*codes, "not_an_object"), 1)


def test_a_utf8_byte_order_mark_keeps_the_first_row(base, store, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bom.jsonl", good_rows(40))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as spreadsheet and Windows exporters write it
    ref = run(path, base, store, tmp_path)
    assert ref.stats.rows_in == 40 and ref.stats.kept == 40 and ref.stats.rejected == 0, ref.stats
    splits = load_splits(ref, store)
    prompts = [row["prompt"] for name in splits for row in splits[name]]
    assert sum(good_rows(1)[0]["instruction"] in p for p in prompts) == 1  # the row after the mark, intact


def test_empty_file_fails_naming_it(base, store, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(PreprocessError, match=rf"{path}: no training rows kept out of 0"):
        run(path, base, store, tmp_path)


def test_all_duplicates_fail_with_the_worst_reason_and_keep_the_rejects(base, store, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dups.jsonl", good_rows(1) * 30)
    with pytest.raises(
        PreprocessError, match=r"29 of 30 rows rejected \(97% > preprocess.max_reject_rate=10%\): duplicate ×29"
    ) as info:
        run(path, base, store, tmp_path)
    rejects_file = Path(str(info.value).rsplit("all rejects in ", 1)[1])
    assert len(rejects_file.read_text().splitlines()) == 29


def test_prompt_is_masked_and_splits_are_stable(base, store, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    first = run(write_jsonl(tmp_path / "a.jsonl", good_rows(200)), base, store, tmp_path)
    splits = load_splits(first, store)
    assert sum(first.stats.splits.values()) == 200 and all(first.stats.splits[s] > 0 for s in ("train", "eval", "test"))
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    row = splits["train"][0]
    n_prompt = len(tokenizer(row["prompt"])["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id

    before = {r["prompt"]: split for split in splits for r in splits[split]}
    grown = run(write_jsonl(tmp_path / "b.jsonl", good_rows(200) + good_rows(50, start=1000)), base, store, tmp_path)
    after = {r["prompt"]: split for split in load_splits(grown, store) for r in load_splits(grown, store)[split]}
    assert all(after[prompt] == split for prompt, split in before.items())
    assert grown.fingerprint != first.fingerprint


def test_csv_parquet_hf_and_artifact_sources(base, store, tmp_path: Path) -> None:
    import datasets

    rows = good_rows(30)
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "d.csv", index=False)
    ds.to_parquet(tmp_path / "d.parquet")
    ds.save_to_disk(str(tmp_path / "hfdir"))
    (tmp_path / "art").mkdir()
    write_jsonl(tmp_path / "art" / "train.jsonl", rows)
    store.put_dir(tmp_path / "art", "raw/demo")
    fingerprints = set()
    sources = [
        str(tmp_path / "d.csv"),
        str(tmp_path / "d.parquet"),
        str(tmp_path / "hfdir"),
        "artifact://raw/demo/train.jsonl",
    ]
    for source in sources:
        cfg = load_run_config(None, [], name="t", base_model=base.id, data={"source": source})
        ref = preprocess(cfg.preprocess, cfg.data, name=cfg.name, base=base, store=store, workdir=tmp_path / "work")
        assert ref.stats.kept == 30, source
        fingerprints.add(ref.fingerprint)
    assert len(fingerprints) == 1  # same rows, same dataset, whatever the container


def test_csv_rejects_name_the_csv_line(base, store, tmp_path: Path) -> None:
    lines = (
        ["instruction,response"]
        + [f'"{r["instruction"]}","{r["response"]}"' for r in good_rows(20)]
        + ['"only instruction",']
    )
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    ref = run(tmp_path / "d.csv", base, store, tmp_path)
    (reject,) = rejects_of(ref, store)
    assert reject["where"] == f"{tmp_path / 'd.csv'}:22" and reject["reason"] == "missing field 'response'"


def test_chat_messages_rows(base, store, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    rows = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]}
        for r in good_rows(20)
    ]
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    ref = run(write_jsonl(tmp_path / "chat.jsonl", rows), base, store, tmp_path)
    assert ref.stats.kept == 20 and ref.stats.reject_reasons == {"bad_messages": 1}
    # The offline tokenizer's chat template renders the seed's format: the same tokens, one BOS.
    chat = run(tmp_path / "chat.jsonl", base, store, tmp_path, "data.template=chat")
    assert chat.stats.kept == 20 and chat.stats.token_length == ref.stats.token_length  # one BOS, not two
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "q?"}], tokenize=False)
    assert rendered == tokenizer.bos_token + alpaca_prompt("q?")


def test_chat_template_needs_a_tokenizer_that_has_one(base, store, tmp_path: Path) -> None:
    plain = tmp_path / "no-template"
    shutil.copytree(base.path, plain)
    (plain / "chat_template.jinja").unlink()
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(PreprocessError, match="data.template: 'chat' but the tokenizer"):
        run(
            write_jsonl(tmp_path / "c.jsonl", rows),
            ResolvedModel(str(plain), str(plain), "x"),
            store,
            tmp_path,
            "data.template=chat",
        )
