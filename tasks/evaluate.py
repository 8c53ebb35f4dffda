"""Evaluate stage: perplexity, task accuracy through vLLM, paired bootstrap comparisons, train/serve parity.

    report = evaluate(cfg.evaluate, adapter, data, base=resolved, store=store, tracker=tracker,
                      server_url="http://127.0.0.1:8000", served_base="base", workdir=work, champion=None)

The test prompts go to the vLLM server (the engine that will serve the adapter) in batches at temperature
0, with the adapter loaded at runtime; the base and, when there is one, the current champion answer the
same prompts. Each answer is scored (SQL by sandboxed execution, or exact match, regex, or a scorer named
by import path). The accuracy difference gets a paired bootstrap 95 % confidence interval and a list of
regressions and fixes. Perplexity is the token-weighted sliding-window NLL of transformers' "Perplexity of
fixed-length models". Parity compares greedy outputs of PEFT/transformers and vLLM on a sample of prompts.
Every test split of the dataset (``test`` and each ``data.extra_test``, e.g. the demo's paraphrase split) is
scored the same way with its own CIs; for SQL, each answer's invented tables and columns are counted too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.artifacts import ARTIFACT_SCHEME, ArtifactStore, local_path, tree_sha256
from infra.errors import UserError
from infra.sql_grammar import decoding_fields, read_sql_schema, schema_json
from infra.tracking import MlflowTracker
from infra.vllm_server import complete, load_lora_adapter, unload_lora_adapter
from tasks.base_model import ResolvedModel
from tasks.config import EvalConfig, registered_scorers
from tasks.generation import greedy_generate
from tasks.preprocess import load_splits
from tasks.refs import AdapterRef, Comparison, DatasetRef, EvalReport, split_metric
from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match
from tasks.sql_identifiers import Schema, invented_identifiers, read_schema


class EvaluateError(UserError, ValueError):
    """The evaluation cannot run as configured."""


# ------------------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class Score:
    correct: bool
    error: str | None = None


Scorer = Callable[[str, str], Score]  # (prediction, reference) -> Score


def normalize_sql(sql: str) -> str:
    """Whitespace collapsed, trailing semicolons dropped: for exact match after normalisation."""
    return re.sub(r"\s+", " ", sql).strip().rstrip(";").strip()


def sql_execution_scorer(database: Path, *, timeout_s: float) -> Scorer:
    """Correct when the prediction's result set equals the reference's (sandboxed, read-only, time-limited)."""
    if not Path(database).is_file():
        raise EvaluateError(f"evaluate.database: {database} does not exist")
    conn = connect_readonly(Path(database))
    gold_cache: dict[str, Any] = {}

    def score(prediction: str, reference: str) -> Score:
        if reference not in gold_cache:
            gold = execute_sql(conn, reference, timeout_s=timeout_s)
            if not gold.ok:
                raise EvaluateError(f"the reference query fails on {database}: {reference!r}: {gold.error}")
            gold_cache[reference] = gold.rows
        pred = execute_sql(conn, prediction, timeout_s=timeout_s)
        if not pred.ok:
            return Score(False, pred.error)
        return Score(results_match(gold_cache[reference], pred.rows or [], ordered=is_ordered(reference)))

    return score


def _database(cfg: EvalConfig, store: ArtifactStore | None) -> Path:
    """``evaluate.database`` as a local file; it may be an ``artifact://`` path in ``store``."""
    database = cfg.database or ""
    if store is not None and database.startswith(ARTIFACT_SCHEME):
        return local_path(database, store, what="evaluate.database")
    if not Path(database).is_file():
        raise EvaluateError(f"evaluate.database: {database} does not exist")
    return Path(database)


def build_scorer(cfg: EvalConfig, store: ArtifactStore | None = None) -> Scorer:
    """The scorer ``cfg`` names; ``evaluate.database`` may be an ``artifact://`` path in ``store``."""
    if cfg.scorer == "sql_execution":
        return sql_execution_scorer(_database(cfg, store), timeout_s=cfg.sql_timeout_s)
    if cfg.scorer == "exact_match":
        return lambda prediction, reference: Score(prediction.strip() == reference.strip())
    if cfg.scorer == "regex":
        pattern = re.compile(cfg.regex or "")
        return lambda prediction, reference: Score(pattern.fullmatch(prediction.strip()) is not None)
    try:
        fn = registered_scorers()[cfg.scorer].load()
    except (KeyError, ImportError, AttributeError) as exc:
        raise EvaluateError(f"evaluate.scorer: cannot load the registered scorer {cfg.scorer!r}: {exc}") from None
    return lambda prediction, reference: Score(bool(fn(prediction, reference)))


def normalized_sql_match(prediction: str, reference: str) -> bool:
    """Equal after :func:`normalize_sql` (registered as the ``sql_exact`` scorer in pyproject.toml)."""
    return normalize_sql(prediction) == normalize_sql(reference)


# --------------------------------------------------------------------------------------- statistics


def paired_bootstrap(
    candidate: Sequence[bool], other: Sequence[bool], *, samples: int, seed: int = 0
) -> tuple[float, float, float]:
    """Accuracy difference (candidate − other) and its 95 % percentile interval over paired resamples."""
    import numpy as np

    a, b = np.asarray(candidate, dtype=float), np.asarray(other, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(low), float(high)


def perplexity(
    model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, window: int, stride: int, batch_size: int = 16
) -> tuple[float, int]:
    """Token-weighted perplexity of ``rows`` (input ids, labels with -100 for unscored tokens).

    Each row longer than ``window`` is covered by windows ``stride`` apart; a window scores only the tokens
    the previous one did not, with the rest of the window as context. The NLL is summed over every scored
    token and divided by their number: not the (biased) mean of per-window means. Returns (ppl, tokens).
    """
    import torch

    if not 0 < stride <= window:
        raise EvaluateError(f"perplexity stride {stride} must be in 1..window ({window})")
    chunks: list[tuple[list[int], list[int]]] = []
    for input_ids, labels in rows:
        ids, labs, prev_end = list(input_ids), list(labels), 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            new = end - prev_end
            target = [-100] * (end - begin - new) + labs[end - new : end]
            chunks.append((ids[begin:end], target))
            prev_end = end
            if end == len(ids):
                break
    chunks.sort(key=lambda c: len(c[0]))
    pad = getattr(model.config, "pad_token_id", None) or 0
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([c[0] + [pad] * (width - len(c[0])) for c in batch])
            labels = torch.tensor([c[1] + [-100] * (width - len(c[1])) for c in batch])
            mask = torch.tensor([[1] * len(c[0]) + [0] * (width - len(c[0])) for c in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total_nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise EvaluateError("perplexity: no tokens to score")
    return math.exp(total_nll / total_tokens), total_tokens


# ------------------------------------------------------------------------------------------ one test split


@dataclass(frozen=True)
class ScoredSplit:
    """Every model's answers to one test split, scored."""

    prompts: list[str]
    references: list[str]
    outputs: dict[str, list[str]]  # role (base, candidate, champion) -> answers
    scores: dict[str, list[Score]]
    invented: dict[str, list[list[str] | None]]  # role -> per answer: invented identifiers (None: not a query)

    def rows(self) -> Iterator[dict[str, Any]]:
        for i, (prompt, reference) in enumerate(zip(self.prompts, self.references, strict=True)):
            row: dict[str, Any] = {"index": i, "prompt": prompt, "reference": reference}
            for role, outs in self.outputs.items():
                row[role] = {"output": outs[i], "correct": self.scores[role][i].correct}
                row[role]["error"] = self.scores[role][i].error
                if role in self.invented:
                    row[role]["invented_identifiers"] = self.invented[role][i]
            yield row

    def statistics(self, bootstrap_samples: int) -> tuple[dict[str, float], dict[str, Comparison]]:
        """Metrics (accuracy, exact match, errors, invented identifiers per role) and the candidate's paired
        comparisons with the base and the champion."""
        n = len(self.prompts)
        correct = {role: [s.correct for s in scores] for role, scores in self.scores.items()}
        metrics = {"examples": float(n)}
        for role, outs in self.outputs.items():
            metrics[f"accuracy_{role}"] = sum(correct[role]) / n
            exact = sum(normalize_sql(o) == normalize_sql(r) for o, r in zip(outs, self.references, strict=True))
            metrics[f"exact_match_{role}"] = exact / n
            metrics[f"error_rate_{role}"] = sum(s.error is not None for s in self.scores[role]) / n
        for role, found in self.invented.items():
            metrics[f"invented_identifiers_{role}"] = sum(bool(f) for f in found) / n
            metrics[f"unparsable_{role}"] = sum(f is None for f in found) / n
        comparisons = {}
        for other in [r for r in ("base", "champion") if r in correct]:
            diff, low, high = paired_bootstrap(correct["candidate"], correct[other], samples=bootstrap_samples)
            comparisons[other] = Comparison(
                against=other,
                accuracy_diff=diff,
                ci_low=low,
                ci_high=high,
                regressions=[i for i in range(n) if correct[other][i] and not correct["candidate"][i]],
                fixes=[i for i in range(n) if correct["candidate"][i] and not correct[other][i]],
            )
            metrics |= {f"accuracy_diff_vs_{other}": diff, f"ci_low_vs_{other}": low, f"ci_high_vs_{other}": high}
        return metrics, comparisons


def _score_split(
    split: Any,
    models: dict[str, str],
    scorer: Scorer,
    schema: Schema | None,
    ev: EvalConfig,
    *,
    server_url: str,
    server_key: str | None,
    decoding: dict[str, Any] | None = None,
) -> ScoredSplit:
    """Every served model in ``models`` (role -> served name) answers ``split`` through vLLM (under ``decoding``'s
    request fields, the same for every model); score the answers."""
    prompts, references = list(split["prompt"]), list(split["response"])
    outputs = {
        role: complete(server_url, served, prompts, max_tokens=ev.max_new_tokens, api_key=server_key, extra=decoding)
        for role, served in models.items()
    }
    scores = {role: [scorer(o, r) for o, r in zip(outs, references, strict=True)] for role, outs in outputs.items()}
    invented = {}
    if schema is not None:
        invented = {role: [invented_identifiers(o, schema) for o in outs] for role, outs in outputs.items()}
    return ScoredSplit(prompts, references, outputs, scores, invented)


# ------------------------------------------------------------------------------------------ the stage


def _served_name(adapter: AdapterRef) -> str:
    return f"adapter-{adapter.sha256[:16]}"


def _bar_chart(
    accuracy: dict[str, dict[str, float]], comparisons: dict[str, dict[str, Comparison]], path: Path
) -> Path:
    """Accuracy per model (base, fine-tuned, champion), grouped by test split, with the gain's CI per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(accuracy)
    models = list(accuracy[splits[0]])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(splits), 3.5))
    for k, (model, color) in enumerate(zip(models, ["#999999", "#2a7ab9", "#e0a030"], strict=False)):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(splits))]
        bars = ax.bar(xs, [accuracy[s][model] * 100 for s in splits], width, label=model, color=color)
        for bar, split in zip(bars, splits, strict=True):
            ax.annotate(
                f"{accuracy[split][model]:.0%}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    labels = []
    for split in splits:
        vs_base = comparisons.get(split, {}).get("base")
        ci = f"\ngain {vs_base.ci_low:+.0%} … {vs_base.ci_high:+.0%}" if vs_base else ""
        labels.append(split + ci)
    ax.set_xticks(range(len(splits)), labels, fontsize=8)
    ax.set_ylabel("task accuracy (%)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _summary(
    metrics: dict[str, float], comparisons: dict[str, dict[str, Comparison]], parity_diffs: list[dict[str, str]]
) -> str:
    lines = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    lines += [
        "",
        "| split | candidate vs | accuracy diff | 95 % CI | regressions | fixes |",
        "|---|---|---|---|---|---|",
    ]
    for split, by_other in comparisons.items():
        for name, c in by_other.items():
            lines.append(
                f"| {split} | {name} | {c.accuracy_diff:+.3f} | [{c.ci_low:+.3f}, {c.ci_high:+.3f}] "
                f"| {len(c.regressions)} | {len(c.fixes)} |"
            )
    if parity_diffs:
        lines += ["", "## First train/serve differences", ""]
        lines += [f"- `{d['prompt'][-80:]!r}`: PEFT `{d['peft']!r}` vs vLLM `{d['vllm']!r}`" for d in parity_diffs]
    return "\n".join(lines) + "\n"


def evaluate(
    cfg: EvalConfig,
    adapter: AdapterRef,
    data: DatasetRef,
    *,
    base: ResolvedModel,
    store: ArtifactStore,
    tracker: MlflowTracker,
    server_url: str,
    served_base: str,
    workdir: Path,
    champion: AdapterRef | None = None,
    server_key: str | None = None,
) -> EvalReport:
    """Score base, candidate (and champion) on the test split; write the report; return its ref. ``server_key``
    is the vLLM server's API key, when it has one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ev = cfg
    splits = load_splits(data, store)
    test = splits["test"]
    if len(test) == 0:
        raise EvaluateError(f"{data.artifact.uri}: the test split is empty")
    # The test split first, then any extra test sets (data.extra_test), each scored the same way.
    test_splits = {"test": test} | {n: d for n, d in splits.items() if n not in ("train", "eval", "test") and len(d)}
    if ev.max_examples:
        test_splits = {n: d.select(range(min(ev.max_examples, len(d)))) for n, d in test_splits.items()}
    test = test_splits["test"]
    scorer = build_scorer(ev, store)
    schema = read_schema(_database(ev, store)) if ev.scorer == "sql_execution" else None
    sql_schema = decoding = None
    if ev.decoding == "sql_schema":  # every model answers under the grammar of the database's own names
        constrained = read_sql_schema(_database(ev, store))
        sql_schema = schema_json(constrained)
        decoding = decoding_fields(constrained)

    # 1. Generation through vLLM: the base and every adapter answer the same prompts, greedily.
    models = {"base": served_base}
    load_lora_adapter(server_url, _served_name(adapter), store.get_dir(adapter.artifact), api_key=server_key)
    models["candidate"] = _served_name(adapter)
    if champion is not None:
        champion_dir = store.get_dir(champion.artifact)
        load_lora_adapter(server_url, _served_name(champion), champion_dir, api_key=server_key)
        models["champion"] = _served_name(champion)
    scored = {
        name: _score_split(
            split, models, scorer, schema, ev, server_url=server_url, server_key=server_key, decoding=decoding
        )
        for name, split in test_splits.items()
    }
    prompts, outputs = scored["test"].prompts, scored["test"].outputs

    # 2. Perplexity (base and candidate) and train/serve parity, in-process with transformers + PEFT.
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    window = int(getattr(base_model.config, "max_position_embeddings", 2048))
    stride = ev.perplexity_stride or max(1, window // 2)
    rows = [
        (ids, labels if ev.perplexity_on == "response" else ids)
        for ids, labels in zip(test["input_ids"], test["labels"], strict=True)
    ]
    ppl_base, n_tokens = perplexity(base_model, rows, window=window, stride=stride)
    tuned = PeftModel.from_pretrained(base_model, str(store.get_dir(adapter.artifact)))
    ppl_candidate, _ = perplexity(tuned, rows, window=window, stride=stride)
    sample = list(range(min(ev.parity_sample, len(prompts))))
    peft_out = greedy_generate(tuned, tokenizer, [prompts[i] for i in sample], max_new_tokens=ev.max_new_tokens)
    # Parity compares like with like: PEFT decodes freely, so vLLM's answers for it are free too.
    served_out = outputs["candidate"]
    if decoding is not None:
        free = complete(
            server_url,
            models["candidate"],
            [prompts[i] for i in sample],
            max_tokens=ev.max_new_tokens,
            api_key=server_key,
        )
        served_out = dict(zip(sample, free, strict=True))
    agree = [peft_out[k] == served_out[i] for k, i in enumerate(sample)]
    parity_diffs = [
        {"prompt": prompts[i], "peft": peft_out[k], "vllm": served_out[i]} for k, i in enumerate(sample) if not agree[k]
    ][:5]

    # 3. Statistics per test split: accuracies, invented identifiers, paired bootstrap CIs, regressions and fixes.
    metrics: dict[str, float] = {}
    split_comparisons: dict[str, dict[str, Comparison]] = {}
    for split_name, result in scored.items():
        split_metrics, split_comparisons[split_name] = result.statistics(ev.bootstrap_samples)
        metrics |= {split_metric(split_name, k): v for k, v in split_metrics.items()}
    comparisons = split_comparisons.pop("test")
    n = len(prompts)
    metrics |= {
        "perplexity_base": ppl_base,
        "perplexity_candidate": ppl_candidate,
        "perplexity_tokens": float(n_tokens),
        "parity_agreement": sum(agree) / len(agree),
        "parity_examples": float(len(agree)),
        "max_new_tokens": float(ev.max_new_tokens),
        "constrained_decoding": float(decoding is not None),
    }

    # 4. The report: per-example JSONL, markdown summary, bar chart, metrics — in the store and in MLflow.
    settings_hash = hashlib.sha256(json.dumps(ev.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:8]
    name = (
        f"{adapter.sha256[:16]}-vs-{champion.sha256[:16] if champion else 'none'}-{data.fingerprint[:12]}"
        f"-{settings_hash}"
    )
    out = workdir / f"evals-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with (out / "examples.jsonl").open("w") as fh:
        for split_name, result in scored.items():
            for row in result.rows():
                fh.write(json.dumps({"split": split_name} | row, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if decoding is not None:
        (out / "grammar.gbnf").write_text(decoding["structured_outputs"]["grammar"])
    all_comparisons = {"test": comparisons} | split_comparisons
    (out / "comparisons.json").write_text(
        json.dumps({s: {k: v.model_dump() for k, v in c.items()} for s, c in all_comparisons.items()}, indent=1)
    )
    (out / "summary.md").write_text(_summary(metrics, all_comparisons, parity_diffs))
    names = {"base": "base", "candidate": "fine-tuned", "champion": "champion"}
    accuracy = {
        split: {
            label: metrics[split_metric(split, f"accuracy_{role}")] for role, label in names.items() if role in models
        }
        for split in scored
    }
    _bar_chart(accuracy, all_comparisons, out / "accuracy.png")
    # Content-addressed and never overwritten: a re-run that scores differently writes a new report next to
    # the old one, so the report a registered version names stays what its gate and smoke test read.
    ref = store.put_dir(out, f"evals/{name}-{tree_sha256(out)[:16]}")
    with tracker.run(ref.key.split("/", 1)[1], stage="evaluate", tags={"tuneship.adapter_sha256": adapter.sha256}):
        tracker.log_params({"evaluate": ev.model_dump(mode="json"), "adapter_uri": adapter.artifact.uri})
        tracker.log_metrics(metrics)
        for file in ("summary.md", "accuracy.png", "examples.jsonl", "metrics.json", "comparisons.json"):
            tracker.log_artifact(out / file, artifact_path="eval")
        if decoding is not None:
            tracker.log_artifact(out / "grammar.gbnf", artifact_path="eval")
    for served in list(models.values())[1:]:
        unload_lora_adapter(server_url, served, api_key=server_key)
    return EvalReport(
        artifact=ref,
        candidate_sha256=adapter.sha256,
        champion_sha256=champion.sha256 if champion else None,
        base_model=base.id,
        n_examples=n,
        metrics=metrics,
        comparisons=comparisons,
        split_comparisons=split_comparisons,
        sql_schema=sql_schema,
    )
