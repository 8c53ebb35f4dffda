#!/usr/bin/env bash
# Deploy on merge (run by .github/workflows/deploy.yml, tested against a local Prefect server):
# register tuneship's Prefect deployments and start a deploy-champion run.
#   PREFECT_API_URL=… [PREFECT_API_KEY=…] [PREFECT=.venv/bin/prefect] deployments/ci-deploy.sh
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (and PREFECT_API_KEY for Prefect Cloud)}"
PREFECT=${PREFECT:-.venv/bin/prefect}
GPU_POOL_TYPE=${TUNESHIP_GPU_POOL_TYPE:-process}   # kubernetes / docker / ecs / modal:push in production (deployments/work-pools/)
cd "$(dirname "$0")/.."

ensure_pool() {  # name type [base-job-template]
  if ! "$PREFECT" work-pool inspect "$1" >/dev/null 2>&1; then
    "$PREFECT" work-pool create "$1" --type "$2" ${3:+--base-job-template "$3"}
  fi
}
ensure_pool tuneship-cpu process
case "$GPU_POOL_TYPE" in
  kubernetes) ensure_pool tuneship-gpu kubernetes deployments/work-pools/kubernetes-gpu.json ;;
  docker) ensure_pool tuneship-gpu docker deployments/work-pools/docker-gpu.json ;;
  ecs) ensure_pool tuneship-gpu ecs deployments/work-pools/ecs-gpu.json ;;
  modal:push) ensure_pool tuneship-gpu modal:push deployments/work-pools/modal-gpu.json ;;
  *) ensure_pool tuneship-gpu "$GPU_POOL_TYPE" ;;
esac
"$PREFECT" --no-prompt deploy --all --prefect-file deployments/prefect.yaml
"$PREFECT" deployment run deploy-champion/deploy-champion
