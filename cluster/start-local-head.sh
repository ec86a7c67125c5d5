#!/usr/bin/env bash
# A local Ray head to try `platescope submit` against: token authentication on (as Ray 2.60
# clusters run), the dashboard and its Job Submission API on 127.0.0.1 only.
#
#   cluster/start-local-head.sh            # then, from the repository:
#   platescope submit jobs/demo.yaml --address http://127.0.0.1:8265 --follow
#   ray stop                               # when done
#
# The token: RAY_AUTH_TOKEN if set, else ~/.ray/auth_token (made here when missing); `submit` finds
# it the same way. Settings: RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (all cores),
# RAY_TEMP_DIR; further arguments go to `ray start` (e.g. --block, --num-gpus=1).
set -euo pipefail

port="${RAY_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
num_cpus="${RAY_NUM_CPUS:-$(nproc)}"
export RAY_AUTH_MODE=token

if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    ray get-auth-token --generate >/dev/null
fi

echo "Ray head: dashboard and Job API on http://127.0.0.1:${dashboard_port} (token authentication)"
echo "try: platescope submit jobs/demo.yaml --address http://127.0.0.1:${dashboard_port} --follow"
exec ray start --head \
    --node-ip-address=127.0.0.1 --port="${port}" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="${dashboard_port}" \
    --num-cpus="${num_cpus}" --disable-usage-stats \
    ${RAY_TEMP_DIR:+--temp-dir="${RAY_TEMP_DIR}"} "$@"
