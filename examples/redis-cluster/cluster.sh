#!/bin/sh
# `make cluster` / `make cluster-stop`: a six-node Redis Cluster (3 masters,
# 3 replicas) on 127.0.0.1:7000-7005 and `srw serve` beside it, six srw nodes
# and the HTTP proxy, from examples/redis-cluster/config.toml.  Everything
# lives under var/redis-cluster/ (data, logs, pid files, and keys/: the
# Redis passwords, redis.conf and the push secret, written once by
# `srw keys init`).  Every Redis node starts with keys/redis.conf: its default
# user (yours; redis-cli gets it from REDISCLI_AUTH here) has a password no
# srw process reads, and srw and its scripts log in as the user srw, which
# has no admin, dangerous or Lua commands (README "Redis Cluster").
#
#   cluster.sh start    start what is not running yet; returns once all is ready
#   cluster.sh stop     srw first (it drains), then the Redis nodes
#
# SRW names the srw command (the Makefile passes the venv's).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
VAR="$(cd "$HERE/../.." && pwd)/var/redis-cluster"
CONFIG="$HERE/config.toml"
SRW=${SRW:-srw}
PORTS="7000 7001 7002 7003 7004 7005"
KEYS="$VAR/keys"

# Poll a command until its output contains a word; give up after $3 seconds.
wait_for() {
    tries=$(($3 * 10))
    until $1 2>/dev/null | grep -q "$2"; do
        tries=$((tries - 1))
        if [ $tries -le 0 ]; then
            echo "cluster.sh: gave up waiting for '$2' from: $1" >&2
            exit 1
        fi
        sleep 0.1
    done
}

make_keys() {
    if [ ! -f "$KEYS/redis.conf" ]; then
        mkdir -p "$VAR"
        "$SRW" keys init --dir "$KEYS"
    fi
    REDISCLI_AUTH=$(cat "$KEYS/redis-admin.secret")
    export REDISCLI_AUTH
}

start_redis() {
    for port in $PORTS; do
        dir="$VAR/redis-$port"
        mkdir -p "$dir"
        if redis-cli -p "$port" ping >/dev/null 2>&1; then
            continue
        fi
        # Diskless sync with no delay: a replica is in sync (able to take over)
        # within a second instead of after the default 5 s.  The append-only
        # file keeps the data across cluster-stop / cluster.  maxmemory: scripts
        # may write any key; past it, writes fail (noeviction) instead of the host.
        redis-server "$KEYS/redis.conf" --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --maxmemory 256mb --maxmemory-policy noeviction \
            --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
            --dir "$dir" --save '' --appendonly yes --repl-diskless-sync-delay 0 \
            --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    done
    for port in $PORTS; do
        wait_for "redis-cli -p $port ping" PONG 10
    done
}

join_redis() {
    # nodes.conf keeps the layout across restarts: create the cluster only once.
    if ! redis-cli -p 7000 cluster info | grep -q "cluster_slots_assigned:16384"; then
        addresses=""
        for port in $PORTS; do addresses="$addresses 127.0.0.1:$port"; done
        # shellcheck disable=SC2086  # one argument per address
        redis-cli --cluster create $addresses --cluster-replicas 1 --cluster-yes >/dev/null
    fi
    for port in $PORTS; do
        wait_for "redis-cli -p $port cluster info" "cluster_state:ok" 30
    done
    for port in $PORTS; do
        if redis-cli -p "$port" info replication | grep -q "role:slave"; then
            wait_for "redis-cli -p $port info replication" "master_link_status:up" 30
        fi
    done
}

start_srw() {
    if [ -f "$VAR/srw.pid" ] && kill -0 "$(cat "$VAR/srw.pid")" 2>/dev/null; then
        echo "srw already runs (pid $(cat "$VAR/srw.pid"))"
        return
    fi
    : >"$VAR/serve.out"
    nohup "$SRW" serve --config "$CONFIG" >>"$VAR/serve.out" 2>&1 </dev/null &
    wait_for "grep -c ready $VAR/serve.out" "^6$" 60
    cat "$VAR/serve.out"
}

stop_all() {
    if [ -f "$KEYS/redis-admin.secret" ]; then
        REDISCLI_AUTH=$(cat "$KEYS/redis-admin.secret")
        export REDISCLI_AUTH
    fi
    if [ -f "$VAR/srw.pid" ]; then
        "$SRW" stop --config "$CONFIG" || true
    fi
    for port in $PORTS; do
        redis-cli -p "$port" shutdown >/dev/null 2>&1 || true
    done
    echo "cluster.sh: stopped the Redis nodes on $PORTS"
}

case "${1:-}" in
    start)
        make_keys
        start_redis
        join_redis
        start_srw
        echo "ready: srw --config examples/redis-cluster/config.toml exec test_script.py" \
             "--for KEY; HTTP on 127.0.0.1:9100 (README \"Redis Cluster\")"
        ;;
    stop) stop_all ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
