#!/usr/bin/env bash
# Start or stop the server topologies the store tests run on, on loopback ports of their own:
#
#   - a Redis Cluster of 3 masters (no replicas);
#   - a Redis primary + replica watched by one Sentinel (service "safe-openai");
#   - PgBouncer in front of the local PostgreSQL: database "test" in transaction pooling,
#     "test_statement" in statement pooling.
#
# Usage: .ci/topologies.sh start|stop|status
#
# `start` stops what an earlier `start` left running, then writes the URLs the tests read to
# $SAFE_OPENAI_TOPOLOGY_DIR/env (default: .topologies/env in the repository), one
# NAME=value a line, ready to `source`:
#
#   SAFE_OPENAI_TEST_REDIS_CLUSTER_URL     redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
#   SAFE_OPENAI_TEST_REDIS_SENTINEL_URL    redis+sentinel://127.0.0.1:PS/safe-openai
#   SAFE_OPENAI_TEST_PGBOUNCER_URL         postgresql://127.0.0.1:PB/test
#   SAFE_OPENAI_TEST_PGBOUNCER_STATEMENT_URL postgresql://127.0.0.1:PB/test_statement
#
# The tests' fixtures read that file when those variables are not set, so a laptop runs the
# topology tests after one `.ci/topologies.sh start` (and skips them without it). `stop` ends
# every process `start` began (by the pids it recorded) and removes the directory.
# Needs redis-server, redis-cli, pgbouncer and a PostgreSQL on SAFE_OPENAI_TEST_POSTGRES_URL's
# host and port (default 127.0.0.1:5432, database test, trust auth).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${SAFE_OPENAI_TOPOLOGY_DIR:-$ROOT/.topologies}
BASE_PORT=${SAFE_OPENAI_TOPOLOGY_BASE_PORT:-17100}
PG_HOST=${SAFE_OPENAI_TOPOLOGY_PG_HOST:-127.0.0.1}
PG_PORT=${SAFE_OPENAI_TOPOLOGY_PG_PORT:-5432}
SERVICE=safe-openai

log() { echo "topologies: $*" >&2; }

free_ports() {  # free_ports N: N loopback ports from BASE_PORT up whose +10000 bus port is free too
    python3 - "$1" "$BASE_PORT" <<'PY'
import socket, sys
want, port, found = int(sys.argv[1]), int(sys.argv[2]), []
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
    return True
while len(found) < want and port < 40000:
    if free(port) and free(port + 10000):
        found.append(port)
    port += 1
if len(found) < want:
    sys.exit("no free ports")
print(*found)
PY
}

wait_for() {  # wait_for WHAT COMMAND...: retry COMMAND for up to 30 s
    local what=$1; shift
    for _ in $(seq 1 150); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "$what did not come up"
    return 1
}

cli() { redis-cli -h 127.0.0.1 -p "$@"; }

stop() {
    [ -d "$DIR" ] || return 0
    local pidfile pid
    for pidfile in "$DIR"/*.pid "$DIR"/*/*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
    log "stopped"
}

redis_node() {  # redis_node NAME PORT [redis-server options...]
    local name=$1 port=$2; shift 2
    mkdir -p "$DIR/$name"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$DIR/$name" --daemonize yes \
        --pidfile "$DIR/$name/redis.pid" --logfile "$DIR/$name/redis.log" \
        --save "" --appendonly no "$@"
    wait_for "redis $name on $port" cli "$port" ping
}

start_cluster() {
    local p1=$1 p2=$2 p3=$3 p
    for p in "$p1" "$p2" "$p3"; do
        redis_node "cluster-$p" "$p" --cluster-enabled yes \
            --cluster-config-file "$DIR/cluster-$p/nodes.conf" --cluster-node-timeout 3000
    done
    redis-cli --cluster create "127.0.0.1:$p1" "127.0.0.1:$p2" "127.0.0.1:$p3" \
        --cluster-replicas 0 --cluster-yes >"$DIR/cluster-create.log" 2>&1 || {
        cat "$DIR/cluster-create.log" >&2; return 1; }
    for p in "$p1" "$p2" "$p3"; do
        wait_for "cluster state on $p" bash -c "redis-cli -p $p cluster info | grep -q cluster_state:ok"
    done
}

start_sentinel() {
    local primary=$1 replica=$2 sentinel=$3
    redis_node "primary-$primary" "$primary"
    redis_node "replica-$replica" "$replica" --replicaof 127.0.0.1 "$primary"
    wait_for "replication $replica <- $primary" \
        bash -c "redis-cli -p $replica info replication | grep -q master_link_status:up"
    mkdir -p "$DIR/sentinel-$sentinel"
    cat >"$DIR/sentinel-$sentinel/sentinel.conf" <<EOF
bind 127.0.0.1
port $sentinel
daemonize yes
pidfile $DIR/sentinel-$sentinel/redis.pid
logfile $DIR/sentinel-$sentinel/redis.log
dir $DIR/sentinel-$sentinel
sentinel monitor $SERVICE 127.0.0.1 $primary 1
sentinel down-after-milliseconds $SERVICE 2000
sentinel failover-timeout $SERVICE 10000
sentinel parallel-syncs $SERVICE 1
EOF
    redis-server "$DIR/sentinel-$sentinel/sentinel.conf" --sentinel
    wait_for "sentinel on $sentinel" \
        bash -c "redis-cli -p $sentinel sentinel replicas $SERVICE | grep -q $replica"
}

start_pgbouncer() {
    local port=$1 user
    user=$(id -un)
    mkdir -p "$DIR/pgbouncer"
    printf '"%s" ""\n"postgres" ""\n' "$user" >"$DIR/pgbouncer/users.txt"
    cat >"$DIR/pgbouncer/pgbouncer.ini" <<EOF
[databases]
test = host=$PG_HOST port=$PG_PORT dbname=test
test_statement = host=$PG_HOST port=$PG_PORT dbname=test pool_mode=statement

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $DIR/pgbouncer/users.txt
pool_mode = transaction
; few server connections for many clients: each transaction may land on any of them
default_pool_size = 3
max_client_conn = 500
logfile = $DIR/pgbouncer/pgbouncer.log
pidfile = $DIR/pgbouncer/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
    if [ "$(id -u)" = 0 ]; then
        # PgBouncer refuses to run as root; it drops to this user after reading its files
        echo "user = postgres" >>"$DIR/pgbouncer/pgbouncer.ini"
        chown -R postgres "$DIR/pgbouncer"
    fi
    pgbouncer -d "$DIR/pgbouncer/pgbouncer.ini"
    wait_for "pgbouncer on $port" pg_isready -h 127.0.0.1 -p "$port" -d test
}

start() {
    stop
    local missing=() tool
    for tool in redis-server redis-cli pgbouncer pg_isready python3; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ "${#missing[@]}" -ne 0 ]; then
        log "missing: ${missing[*]}"
        return 1
    fi
    mkdir -p "$DIR"
    # shellcheck disable=SC2207
    local ports=($(free_ports 7))
    start_cluster "${ports[0]}" "${ports[1]}" "${ports[2]}"
    start_sentinel "${ports[3]}" "${ports[4]}" "${ports[5]}"
    start_pgbouncer "${ports[6]}"
    cat >"$DIR/env.tmp" <<EOF
SAFE_OPENAI_TEST_REDIS_CLUSTER_URL=redis+cluster://127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}
SAFE_OPENAI_TEST_REDIS_SENTINEL_URL=redis+sentinel://127.0.0.1:${ports[5]}/$SERVICE
SAFE_OPENAI_TEST_PGBOUNCER_URL=postgresql://127.0.0.1:${ports[6]}/test
SAFE_OPENAI_TEST_PGBOUNCER_STATEMENT_URL=postgresql://127.0.0.1:${ports[6]}/test_statement
EOF
    mv "$DIR/env.tmp" "$DIR/env"
    log "started; URLs in $DIR/env"
    cat "$DIR/env"
}

status() {
    [ -f "$DIR/env" ] || { log "not running"; return 1; }
    cat "$DIR/env"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
