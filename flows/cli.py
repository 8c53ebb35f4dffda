"""tuneship's command line.

    tuneship demo                        # the pipeline on embedded defaults (`make demo`)
    tuneship doctor                      # check settings, artifact store and environments
    tuneship artifacts put DIR KEY       # upload a directory (manifest written last)
    tuneship artifacts get KEY           # download and verify into the cache, print the path
    tuneship artifacts list [PREFIX]
    tuneship services up                 # a loopback S3 endpoint + MLflow server, until Ctrl-C
    tuneship base build [--recipe sql-small] [--rebuild]   # load (or pre-train) the offline base model
    tuneship demo-data --out DIR         # the demo task: retail.db, train.jsonl, test.jsonl
    tuneship preprocess CONFIG [--set key=value ...]   # the preprocess stage alone
    tuneship train CONFIG [--set key=value ...] [--run-id ID]   # preprocess + fine-tune (resumable)
    tuneship retrain CONFIG [--set key=value ...] [--no-deploy]  # the whole retrain flow (Prefect)
    tuneship models list NAME | models show NAME VERSION   # the registry: aliases, metrics, lineage
    tuneship rollback NAME               # move @champion back to the previous champion
    tuneship deploy NAME [VERSION]       # hot-swap a version into the running vLLM + gateway (or render manifests)
    tuneship serve [NAME]                # gateway (+ local vLLM) serving the champion, until Ctrl-C
    tuneship bench --url URL [--model champion] [--concurrency 16 | --rate 5] [--requests 200]   # load test

Bad settings and store errors end the command with one ``tuneship: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra.artifacts import open_store
from infra.errors import UserError
from infra.settings import SettingsError, load_settings

app = typer.Typer(
    help="Fine-tune an LLM with LoRA/QLoRA, prove it is better, register it and ship it to vLLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
artifacts_app = typer.Typer(help="Inspect and move artifacts in the artifact store.", no_args_is_help=True)
services_app = typer.Typer(help="Local services on loopback (S3 endpoint, MLflow server).", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(services_app, name="services")
models_app = typer.Typer(help="Registered models: versions, aliases, metrics, lineage.", no_args_is_help=True)
app.add_typer(models_app, name="models")
base_app = typer.Typer(help="The offline base model tuneship builds for itself.", no_args_is_help=True)
app.add_typer(base_app, name="base")


def _console() -> Console:
    """rich's console; when stdout is not a terminal (CI logs, ``| tee``) lines and tables are not wrapped."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(width=100_000, soft_wrap=True, no_color=True, highlight=False)


console = _console()


@app.command()
def doctor() -> None:
    """Check the settings, reach the artifact store, and report where everything is."""
    settings = load_settings()
    store = open_store(settings, check=True)
    table = Table("setting", "value", title="tuneship settings")
    table.add_row("artifact root", store.root_uri)
    table.add_row("S3 endpoint", settings.s3_endpoint_url or "(AWS default)")
    table.add_row("cache", str(settings.cache_dir))
    table.add_row("MLflow tracking URI", settings.mlflow_tracking_uri)
    vllm_python = settings.vllm_python
    local = f"local ({vllm_python}, {settings.vllm_device}{', on a Unix socket' if settings.vllm_uds else ''})"
    vllm = settings.vllm_url if settings.vllm_url != "local" else local
    table.add_row("vLLM", vllm)
    table.add_row("gateway API keys", f"{len(settings.api_keys)} configured" if settings.api_keys else "none (open)")
    console.print(table)
    if settings.vllm_url == "local" and not Path(vllm_python).exists():
        raise SettingsError(f"TUNESHIP_VLLM_PYTHON: {vllm_python} does not exist; run `make setup`")


@artifacts_app.command("put")
def artifacts_put(
    local: Annotated[Path, typer.Argument(help="Directory to upload.", exists=True, file_okay=False)],
    key: Annotated[str, typer.Argument(help="Store-relative key, e.g. datasets/demo-v1.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a different artifact at the same key.")] = False,
) -> None:
    """Upload a directory; the manifest is written last."""
    ref = open_store(load_settings()).put_dir(local, key, overwrite=overwrite)
    console.print_json(ref.model_dump_json())


@artifacts_app.command("get")
def artifacts_get(key: Annotated[str, typer.Argument(help="Store-relative key.")]) -> None:
    """Download (or reuse from the cache) a verified copy and print its local path."""
    print(open_store(load_settings()).get_dir(key))


@artifacts_app.command("list")
def artifacts_list(prefix: Annotated[str, typer.Argument(help="Key prefix.")] = "") -> None:
    """List complete artifacts (those with a manifest)."""
    table = Table("key", "size", "sha256", "created")
    for ref in open_store(load_settings()).list(prefix):
        table.add_row(ref.key, f"{ref.size:,}", ref.sha256[:12], ref.created_at.isoformat(timespec="seconds"))
    console.print(table)


@services_app.command("up")
def services_up(
    workdir: Annotated[Path, typer.Option(help="Where service data and logs go.")] = Path(".tuneship/services"),
) -> None:
    """Start a loopback S3 endpoint and an MLflow server on it, print how to use them, wait for Ctrl-C."""
    from infra.services import start_mlflow, start_s3

    with start_s3(workdir) as s3, start_mlflow(workdir, s3=s3) as mlflow:
        console.print(f"S3 endpoint:  {s3.endpoint_url}   (credentials: {', '.join(s3.client_env())})")
        console.print(f"MLflow:       {mlflow.tracking_uri}")
        console.print("export " + " ".join(f"{k}={v}" for k, v in s3.client_env().items()))
        console.print(f"export MLFLOW_TRACKING_URI={mlflow.tracking_uri}")
        try:
            while s3.running and mlflow.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


@base_app.command("build")
def base_build(
    recipe: Annotated[str, typer.Option(help="Recipe name (see offline/base_model.py RECIPES).")] = "sql-small",
    rebuild: Annotated[
        bool, typer.Option(help="Pre-train from the recipe even if a checkpoint exists, and compare with it.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="With --rebuild: where the rebuilt model goes.")] = None,
) -> None:
    """Load the offline base model (store, cache or the repository's pinned checkpoint), or pre-train it."""
    import tempfile

    from infra.artifacts import tree_sha256
    from offline.base_model import RECIPES, checkpoint_path, ensure_base_model
    from offline.base_model import rebuild as rebuild_recipe

    if recipe not in RECIPES:
        raise SettingsError(f"--recipe {recipe!r}: unknown; choose one of {sorted(RECIPES)}")
    started = time.perf_counter()
    if rebuild:
        target = out or Path(tempfile.mkdtemp(prefix=f"tuneship-{recipe}-"))
        same = rebuild_recipe(RECIPES[recipe], target, log=console.print)
        console.print(f"{recipe}: pre-trained in {time.perf_counter() - started:.0f} s into {target}")
        console.print(f"  pin: PINNED[{checkpoint_path(RECIPES[recipe]).name!r}] = {tree_sha256(target)!r}")
        for name, identical in same.items():
            console.print(f"  {name}: {'identical to' if identical else 'DIFFERS from'} the pinned checkpoint")
        return
    settings = load_settings()
    base = ensure_base_model(
        RECIPES[recipe], store=open_store(settings), cache_dir=settings.cache_dir, log=console.print
    )
    console.print(f"{recipe}: from the {base.source} in {time.perf_counter() - started:.1f} s")
    console.print(f"  artifact: {base.ref.uri}  sha256 {base.ref.sha256[:12]}")
    console.print(f"  local:    {base.path}")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path(".tuneship/demo-task"),
) -> None:
    """Write the demo text-to-SQL task: retail.db, schema.sql, train.jsonl, test.jsonl, test_paraphrase.jsonl."""
    from offline.demo_task import build_demo_task

    counts = build_demo_task(out)
    console.print(
        f"demo task in {out}: {counts['train']} train / {counts['test']} test / {counts['test_paraphrase']} "
        "paraphrase-test questions, retail.db"
    )


Overrides = Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. finetune.train.epochs=1.")]
ConfigPath = Annotated[Path, typer.Argument(help="Run config YAML, e.g. deployments/configs/tiny-cpu.yaml.")]


@app.command("preprocess")
def preprocess_cmd(config: ConfigPath, overrides: Overrides = None) -> None:
    """Validate, tokenise and split the run's data; print the dataset ref (rejects are kept in it)."""
    from tasks.base_model import resolve_base_model
    from tasks.config import load_run_config
    from tasks.preprocess import preprocess

    cfg = load_run_config(config, overrides)
    settings = load_settings()
    store = open_store(settings)
    base = resolve_base_model(cfg.base_model, store=store, cache_dir=settings.cache_dir, log=console.print)
    ref = preprocess(cfg.preprocess, cfg.data, name=cfg.name, base=base, store=store, workdir=settings.home / "work")
    console.print_json(ref.model_dump_json())


@app.command("curate")
def curate_cmd(
    config: ConfigPath,
    labels: Annotated[
        Path | None, typer.Option(help="A needs_labels.jsonl export with 'correction' filled in by people.")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Production feedback since the last curated version → a new curated dataset (training rows + feedback
    holdout), with every rejected row's reason; prints its ref."""
    from tasks.config import load_run_config
    from tasks.curate import curate

    cfg = load_run_config(config, overrides)
    settings = load_settings()
    ref = curate(cfg, store=open_store(settings), workdir=settings.home / "work", labels=labels)
    c = ref.counts
    console.print(
        f"curated v{ref.version}: {c['rows_in']} feedback rows in → {c['train_added']} training rows, "
        f"{c['holdout_added']} holdout rows, {c['rejected']} rejected ({ref.reasons}); "
        f"{c['needs_labels']} need a label ({ref.needs_labels})"
    )
    console.print_json(ref.model_dump_json())


@app.command("train")
def train_cmd(
    config: ConfigPath,
    overrides: Overrides = None,
    run_id: Annotated[
        str | None, typer.Option(help="Resume/reuse this run (default: a hash of config + data).")
    ] = None,
) -> None:
    """Preprocess and fine-tune; a re-run with the same run id resumes from the newest checkpoint."""
    from infra.settings import environ, wandb_env
    from infra.tracking import MlflowTracker
    from tasks.base_model import resolve_base_model
    from tasks.config import load_run_config
    from tasks.finetune import finetune
    from tasks.preprocess import preprocess

    cfg = load_run_config(config, overrides)
    settings = load_settings()
    store = open_store(settings)
    base = resolve_base_model(cfg.base_model, store=store, cache_dir=settings.cache_dir, log=console.print)
    data = preprocess(cfg.preprocess, cfg.data, name=cfg.name, base=base, store=store, workdir=settings.home / "work")
    console.print(f"dataset {data.artifact.key}: {data.stats.splits}, {data.stats.rejected} rejected")
    tracker = MlflowTracker.from_settings(settings)
    wandb = wandb_env(settings)
    with environ(wandb):
        adapter = finetune(
            cfg.finetune,
            data,
            name=cfg.name,
            base=base,
            store=store,
            tracker=tracker,
            workdir=settings.home / "work",
            run_id=run_id,
            report_to=("wandb",) if wandb else (),
        )
    console.print_json(adapter.model_dump_json())


@app.command("stage")
def stage_cmd(
    params: Annotated[Path, typer.Argument(help="A stage request (the `stage` flow's parameters) as JSON.")],
) -> None:
    """Run one stage from its request, as a placed stage does (a SageMaker job's `train` command runs this).

    The flow runs against PREFECT_API_URL if set, else a local `prefect server` started for the stage (a job's
    container has none: Prefect's temporary server would race its 20-s start-up timer on a fresh database)."""
    from flows.prefect_api import prefect_api
    from flows.retrain import StageParams, stage_flow

    request = StageParams.model_validate_json(params.read_text())
    with prefect_api(load_settings(), say=console.print):
        stage_flow(request)
    console.print(f"stage {request.stage}: result in {request.result_key}/result.json")


@app.command("retrain")
def retrain_cmd(
    config: ConfigPath,
    overrides: Overrides = None,
    deploy: Annotated[
        bool, typer.Option("--deploy/--no-deploy", help="Hot-swap a promoted model into the serving stack.")
    ] = True,
    max_eval_examples: Annotated[int | None, typer.Option(help="Score only the first N test examples.")] = None,
    curate: Annotated[
        bool, typer.Option(help="Curate the production feedback first and train on it (the retrain-on-feedback way).")
    ] = False,
) -> None:
    """Run the retrain flow once: [curate →] preprocess → fine-tune → evaluate → register + gate → deploy.

    The flow runs against PREFECT_API_URL if set, else a local `prefect server` started for the run. Deploying
    needs the serving stack in TUNESHIP_VLLM_URL / TUNESHIP_GATEWAY_URL (`tuneship serve` starts one).
    """
    from flows.prefect_api import prefect_api
    from flows.retrain import RetrainParams, publish_config, retrain
    from tasks.config import load_run_config

    load_run_config(config, overrides)  # a bad config or override ends here, before any service starts
    settings = load_settings()
    named = publish_config(config, open_store(settings))  # a file outside deployments/configs/ goes to the store
    params = RetrainParams(
        config=named, overrides=overrides or [], deploy=deploy, max_eval_examples=max_eval_examples, curate=curate
    )
    with prefect_api(settings, say=console.print):
        state = retrain(params, return_state=True)
    if not state.is_completed():
        console.print(f"tuneship: the retrain flow ended {state.name}: {state.message}")
        raise typer.Exit(1)
    console.print_json(state.result().model_dump_json())


@models_app.command("list")
def models_list(name: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Versions of a registered model with their aliases, key metrics, gate decision and lineage."""
    from infra.registry import list_versions

    table = Table("version", "aliases", "accuracy", "perplexity", "gate", "adapter", "dataset", "base model", "git")
    for row in list_versions(name, tracking_uri=load_settings().mlflow_tracking_uri):
        cells = [row["version"], ", ".join(row["aliases"]), row["accuracy"] or "", row["perplexity"] or "", row["gate"]]
        table.add_row(*cells, row["adapter_sha256"], row["dataset"], row["base_model"] or "", row["git_sha"])
    console.print(table)


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version number.")],
) -> None:
    """Every tag of one version: lineage, evaluation metrics and the gate's rule-by-rule decision."""
    from infra.registry import RegistryError, list_versions

    rows = [r for r in list_versions(name, tracking_uri=load_settings().mlflow_tracking_uri) if r["version"] == version]
    if not rows:
        raise RegistryError(f"{name} has no version {version}")
    table = Table("tag", "value", title=f"{name} v{version} ({', '.join(rows[0]['aliases']) or 'no alias'})")
    for key, value in sorted(rows[0]["tags"].items()):
        table.add_row(key, value)
    console.print(table)


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Move the champion alias back to the previous champion and say what is serving now."""
    from infra.registry import list_versions
    from infra.registry import rollback as do_rollback

    uri = load_settings().mlflow_tracking_uri
    version = do_rollback(name, tracking_uri=uri)
    row = next(r for r in list_versions(name, tracking_uri=uri) if r["version"] == version)
    console.print(
        f"{name}: champion is now version {version} (adapter {row['adapter_sha256']}, accuracy {row['accuracy']})"
    )


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to make the champion.")],
    reason: Annotated[str, typer.Option(help="Why the gate is bypassed (kept on the version).")],
) -> None:
    """Make a version the champion by hand, past the gate (e.g. the first model on a new base)."""
    from tasks.register import promote_by_hand

    previous = promote_by_hand(name, version, reason=reason, tracking_uri=load_settings().mlflow_tracking_uri)
    console.print(f"{name}: champion is now version {version} (was {previous or 'none'}); rollback restores it")


@app.command("deploy")
def deploy_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version number or alias.")] = "champion",
    target: Annotated[str, typer.Option(help="existing (TUNESHIP_VLLM_URL + TUNESHIP_GATEWAY_URL) or manifests.")] = (
        "existing"
    ),
    alias: Annotated[str, typer.Option(help="Gateway alias to switch.")] = "champion",
    out: Annotated[Path, typer.Option(help="Where --target manifests writes its files.")] = Path("deploy"),
) -> None:
    """Ship a registered version: zero-downtime hot swap into a running server, or deployment manifests."""
    from tasks.config import DeployConfig
    from tasks.deploy import DeployError, deploy, render_manifests

    settings = load_settings()
    store = open_store(settings)
    uri = settings.mlflow_tracking_uri
    if target == "manifests":
        dep = render_manifests(
            name, version, DeployConfig(target="manifests", manifests_dir=str(out)), store=store, tracking_uri=uri
        )
        console.print(f"{name} v{dep.version}: wrote " + ", ".join(dep.manifests))
        return
    if target != "existing":
        raise DeployError(f"--target {target!r}: use 'existing' or 'manifests' (`tuneship serve` starts a local one)")
    if settings.vllm_url == "local":
        raise DeployError("TUNESHIP_VLLM_URL is 'local': set it to the running vLLM server's URL")
    dep = deploy(
        name,
        version,
        DeployConfig(alias=alias),
        store=store,
        tracking_uri=uri,
        vllm_url=settings.vllm_url,
        gateway_url=settings.gateway_url,
        admin_key=settings.admin_key,
        vllm_key=settings.vllm_key,
    )
    console.print_json(dep.model_dump_json())


@app.command()
def serve(
    name: Annotated[str, typer.Argument(help="Registered model whose champion (and challenger) to serve.")] = (
        "retail-sql"
    ),
    deploy_aliases: Annotated[
        bool, typer.Option("--deploy/--no-deploy", help="--no-deploy: only the gateway, aliases from settings.")
    ] = True,
) -> None:
    """Serve the champion: a local vLLM (when TUNESHIP_VLLM_URL=local), the gateway, the adapters hot-loaded."""
    import threading

    from flows.serve import gateway_config, registry_source, request_log, serving_stack, upstream

    settings = load_settings()
    if not deploy_aliases:
        from serving.app import create_app
        from serving.server import serve_forever

        if settings.vllm_url == "local":
            raise SettingsError("TUNESHIP_VLLM_URL: --no-deploy serves an existing vLLM server; give its URL")
        store = open_store(settings)
        config = gateway_config(settings, default_model=name)
        registry = registry_source(settings, store, name)
        app_ = create_app(config, upstream(settings, settings.vllm_url), request_log(settings, store), registry)
        host, port, grace = settings.gateway_host, settings.gateway_port, settings.gateway_shutdown_grace_s
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises SIGTERM once it has shut down cleanly
            serve_forever(app_, host=host, port=port, grace_s=grace, keep_alive_s=settings.gateway_keep_alive_s)
        return
    with serving_stack(settings, name, say=console.print) as stack:
        console.print(f"gateway: {stack.gateway_url}  (Ctrl-C stops it)")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


@app.command("bench")
def bench_cmd(
    url: Annotated[str, typer.Option(help="Gateway or any OpenAI-compatible server.")],
    model: Annotated[str, typer.Option(help="Model name or gateway alias.")] = "champion",
    concurrency: Annotated[int, typer.Option(help="Concurrent clients (closed loop).")] = 16,
    rate: Annotated[float | None, typer.Option(help="Requests/s, Poisson arrivals (open loop) instead.")] = None,
    requests: Annotated[int, typer.Option(help="Measured requests.")] = 200,
    duration: Annotated[float | None, typer.Option(help="Or measure for this many seconds.")] = None,
    warmup: Annotated[int, typer.Option(help="Requests sent first and not measured.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request.")] = 64,
    stream: Annotated[bool, typer.Option(help="Stream (measures TTFT) or wait for whole completions.")] = True,
    prompts: Annotated[Path | None, typer.Option(help="Evaluation JSONL (instruction field); default synthetic.")] = (
        None
    ),
    prompt_words: Annotated[int, typer.Option(help="Synthetic prompt length in words.")] = 24,
    out: Annotated[Path, typer.Option(help="Where the JSON, markdown and histogram go.")] = Path("bench-results/load"),
    instance: Annotated[str, typer.Option(help="Price table entry (infra/costs.yaml) for the cost lines.")] = (
        "aws-g5.xlarge"
    ),
    registered_model: Annotated[str | None, typer.Option(help="Log to MLflow against this model…")] = None,
    version: Annotated[str | None, typer.Option(help="…and this version.")] = None,
) -> None:
    """Load-test a server: latency / TTFT / time-per-token percentiles, throughput, errors, cost."""
    from flows.bench import bench, eval_prompts, synthetic_prompts
    from serving.loadgen import LoadSpec

    settings = load_settings()
    spec = LoadSpec(
        url=url,
        model=model,
        concurrency=concurrency,
        rate=rate,
        requests=requests,
        duration_s=duration,
        warmup=warmup,
        max_tokens=max_tokens,
        stream=stream,
        api_key=settings.api_keys[0].get_secret_value() if settings.api_keys else None,
    )
    texts = eval_prompts(prompts) if prompts else synthetic_prompts(64, prompt_words)
    tracking = settings.mlflow_tracking_uri if registered_model else None
    report = bench(
        spec, texts, out_dir=out, instance=instance, tracking_uri=tracking, model_name=registered_model, version=version
    )
    console.print(report.markdown())
    cost = report.summary().get("cost")
    if cost:
        console.print(
            f"on {cost['instance']} (${cost['usd_per_hour']}/h): ${cost['usd_per_1k_requests']:.4f} per 1K "
            f"requests, ${cost['usd_per_1m_output_tokens']:.2f} per 1M output tokens"
        )
    console.print(f"written to {out}/")


@app.command()
def demo(
    overrides: Overrides = None,
    compare: Annotated[
        bool, typer.Option(help="End with the serving comparison (base / runtime LoRA / merged) and the costs.")
    ] = True,
    second_task: Annotated[
        bool, typer.Option(help="Also train the clinic task and serve both fine-tunes side by side.")
    ] = True,
) -> None:
    """Run the pipeline on embedded defaults (what `make demo` runs)."""
    from flows.demo import run_demo

    run_demo(load_settings(), overrides=overrides, compare=compare, second_task=second_task, say=console.print)


@app.command("demo-loop")
def demo_loop(
    users: Annotated[int, typer.Option(help="Simulated users' questions, each answered and rated.")] = 480,
) -> None:
    """The feedback loop end to end (what `make demo-loop` runs): v1 serves, users correct it, v2 learns from them."""
    from flows.demo_loop import run_demo_loop

    run_demo_loop(load_settings(), users=users, say=console.print)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind every `with` that started a server, as Ctrl-C does


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2.

    SIGTERM (what systemd, Kubernetes and Docker send) unwinds like Ctrl-C, so every server a command started
    (vLLM, the Prefect server, the gateway) is stopped with it; `tuneship serve` then exits 0, a command cut
    short exits 130.
    """
    signal.signal(signal.SIGTERM, _terminate)
    if prefect_home := os.environ.get("PREFECT_HOME"):  # Prefect creates only the last level, at import
        Path(prefect_home).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        app()
    except UserError as exc:
        print(f"tuneship: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tuneship: interrupted; everything it started is stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
