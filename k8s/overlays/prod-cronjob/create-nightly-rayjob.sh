#!/bin/bash
# Starts one night's detection: copies the suspended RayJob $RAYJOB_TEMPLATE as
# $RAYJOB_TEMPLATE-<yesterday, UTC, YYYYMMDD>, not suspended, so that KubeRay runs it once.
# The dated name makes a rerun of this script for the same night (a CronJob retry, or a manual
# `kubectl create job --from=cronjob/...`) a no-op instead of a second run.
set -euo pipefail

template="${RAYJOB_TEMPLATE:?name of the suspended RayJob to copy}"
name="${template}-$(date -u -d yesterday +%Y%m%d)"

if [ -n "$(kubectl get rayjob "$name" --ignore-not-found -o name)" ]; then
    echo "rayjob/$name exists already"
    exit 0
fi

# Only what a new object may carry: the server-set metadata and the status of the template stay behind.
kubectl get rayjob "$template" -o json \
    | jq --arg name "$name" '{
        apiVersion, kind,
        metadata: {name: $name, labels: ((.metadata.labels // {}) + {"platescope/copied-from": .metadata.name})},
        spec: (.spec + {suspend: false})
      }' \
    | kubectl create -f -
