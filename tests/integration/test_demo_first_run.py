"""`tuneship demo` the way a new user first runs it: a pristine TUNESHIP_HOME and PREFECT_HOME, the Prefect server
and vLLM starting side by side on the same two cores.

The first `make demo` on a fresh machine once failed right here: Prefect's temporary server had to create and
migrate its database while vLLM started, gave up after 20 s, and the flow died. The demo now starts its own
`prefect server` and waits on its health (or its death), never on a short timer; this test runs the demo's own
code path (a shorter fine-tune, no serving comparison) and sets Prefect's temporary-server timeout to 1 s, so
a fall-back to that server fails it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SHORT = ["finetune.train.max_steps=60", "evaluate.max_examples=24", "evaluate.parity_sample=4"]


def test_first_demo_on_a_pristine_prefect_home(base_model, tmp_path: Path) -> None:
    from infra.settings import load_settings

    home, prefect_home = tmp_path / "home", tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TUNESHIP_", "MLFLOW_", "AWS_"))}
    env |= {
        "TUNESHIP_HOME": str(home),
        "TUNESHIP_CACHE_DIR": str(load_settings().cache_dir),  # the base model: what `make setup` left there
        "TUNESHIP_VLLM_PYTHON": str(REPO / ".venv-vllm" / "bin" / "python"),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [str(Path(sys.executable).parent / "tuneship"), "demo", "--no-compare"]
    command += [arg for item in SHORT for arg in ("--set", item)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    seconds = time.perf_counter() - started
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    print(f"\nfirst demo on a pristine Prefect home: {seconds:.0f} s")

    api = re.search(r"Prefect API: (http://127\.0\.0\.1:\d+/api)", out)
    vllm = re.search(r"vLLM: (http://127\.0\.0\.1:\d+)", out)
    assert api and vllm, out
    assert (prefect_home / "prefect.db").is_file()  # the database was created here, by the server the demo ran
    assert re.search(r"Prefect flow run [0-9a-f-]+: Completed", out), out
    assert re.search(r"POST /generate model=\S+ +\(SSE\): SELECT", out), out  # a real request through the gateway
    # The second task: its own registered model, served beside the first by the same gateway and vLLM server.
    assert re.search(r"clinic-sql v\d+: execution accuracy", out), out
    assert "two fine-tunes on one base, one vLLM server" in out, out
    assert re.search(r"model=clinic-sql\S* \(served clinic-sql-v\d+\): \S", out), out
    for url in (api.group(1) + "/health", vllm.group(1) + "/health"):  # stopped with the command
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)
