#!/usr/bin/env bash
# A Prefect server for a team, on PostgreSQL (Prefect's advice beyond one user: SQLite locks under
# concurrent writers and logs "database is locked"), with a process worker for the `local` pool.
#
#   bash scripts/prefect-server.sh start    # PostgreSQL, then the Prefect server on it, then a worker
#   bash scripts/prefect-server.sh status   # what runs, with process ids
#   bash scripts/prefect-server.sh stop     # each stopped by its own process id; nothing is left running
#
# Everything lives under the project's .prefect/ (git-ignored): PREFECT_HOME, the PostgreSQL cluster
# (.prefect/postgres, Debian's postgresql package: initdb and pg_ctl), logs and pid files. Nothing outside
# it is touched, so `stop` never ends another project's server. Single-user runs need none of this:
# `leccr run` runs in its own process (`--prefect` starts a temporary Prefect server on SQLite).
#
# Run as root, PostgreSQL runs as the `postgres` user, which must be able to enter the state folder: a
# clone under a private folder (`mktemp -d` makes them mode 700) needs LECCR_PREFECT_DIR elsewhere.
# LECCR_PREFECT_DATABASE=sqlite starts the server on Prefect's embedded SQLite instead (no PostgreSQL;
# one user's load); `start` records the choice, so `status` and `stop` need not be told again.
#
# Settings (environment): LECCR_PREFECT_DIR (default <project>/.prefect), LECCR_PREFECT_DATABASE
# (postgresql or sqlite; default postgresql), LECCR_PREFECT_PORT (4200), LECCR_PG_PORT (5433, beside a
# system cluster on 5432), LECCR_STOP_TIMEOUT (seconds before SIGKILL, 10), PREFECT (the prefect command;
# default .venv/bin/prefect, else the one on PATH).
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
state=$(realpath -m "${LECCR_PREFECT_DIR:-$project/.prefect}")
port=${LECCR_PREFECT_PORT:-4200}
pg_port=${LECCR_PG_PORT:-5433}
stop_timeout=${LECCR_STOP_TIMEOUT:-10}
if [ -n "${PREFECT:-}" ]; then prefect=$PREFECT
elif [ -x "$project/.venv/bin/prefect" ]; then prefect=$project/.venv/bin/prefect
else prefect=$(command -v prefect || true)
fi
pg_data=$state/postgres/data
pg_socket=$state/postgres/run
api=http://127.0.0.1:$port/api

say() { echo "prefect-server: $*"; }
die() { echo "prefect-server: error: $*" >&2; exit 1; }

pg_bin() {  # Debian keeps initdb and pg_ctl out of PATH, under /usr/lib/postgresql/<version>/bin
  local name=$1 found
  found=$(command -v "$name" 2>/dev/null || true)
  [ -z "$found" ] && found=$(ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$found" ] || die "no $name: install PostgreSQL (Debian: apt-get install -y postgresql)"
  echo "$found"
}

as_pg() {  # PostgreSQL refuses to run as root: as root, run it as Debian's postgres user (from /: the
  # working folder may be closed to that user, and every path here is absolute)
  if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

database() {  # the database `start` chose (recorded in the state folder), else the setting
  if [ -f "$state/database" ]; then cat "$state/database"; else echo "${LECCR_PREFECT_DATABASE:-postgresql}"; fi
}

pg_sql() { as_pg env PGPASSWORD="$(cat "$state/postgres/password")" "$(pg_bin psql)" \
  -h 127.0.0.1 -p "$pg_port" -U prefect "$@"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

prefect_env() {
  export PREFECT_HOME=$state PREFECT_API_URL=$api PREFECT_UI_API_URL=$api
  export PREFECT_SERVER_ANALYTICS_ENABLED=false  # offline, its telemetry logs an error every run
  if [ "$(database)" = postgresql ]; then
    PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect:$(cat "$state/postgres/password")@127.0.0.1:$pg_port/prefect"
    export PREFECT_API_DATABASE_CONNECTION_URL
  else  # Prefect's default: $PREFECT_HOME/prefect.db
    unset PREFECT_API_DATABASE_CONNECTION_URL
  fi
}

start_postgres() {
  local initdb pg_ctl
  initdb=$(pg_bin initdb)
  pg_ctl=$(pg_bin pg_ctl)
  mkdir -p "$state/postgres" "$pg_socket"
  if [ ! -f "$pg_data/PG_VERSION" ]; then
    umask 077
    head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$state/postgres/password"
    umask 022
    if [ "$(id -u)" -eq 0 ]; then
      chown -R postgres "$state/postgres"
      as_pg test -x "$state/postgres" || die "the postgres user cannot reach $state (a parent folder is closed" \
        "to other users): set LECCR_PREFECT_DIR to a folder it can reach, or LECCR_PREFECT_DATABASE=sqlite"
    fi
    as_pg "$initdb" -D "$pg_data" -U prefect --pwfile="$state/postgres/password" --auth-local=scram-sha-256 \
      --auth-host=scram-sha-256 -E UTF8 > "$state/postgres/initdb.log" 2>&1 \
      || { cat "$state/postgres/initdb.log" >&2; die "initdb failed"; }
    say "created a PostgreSQL cluster in $pg_data"
  fi
  if as_pg "$pg_ctl" -D "$pg_data" status > /dev/null 2>&1; then
    say "PostgreSQL already running (pid $(head -1 "$pg_data/postmaster.pid"))"
  else
    as_pg "$pg_ctl" -D "$pg_data" -l "$state/postgres/server.log" -w -t 60 \
      -o "-p $pg_port -k $pg_socket -c listen_addresses=127.0.0.1" start > /dev/null \
      || { tail -20 "$state/postgres/server.log" >&2; die "PostgreSQL did not start (log: $state/postgres/server.log)"; }
    say "started PostgreSQL on 127.0.0.1:$pg_port (pid $(head -1 "$pg_data/postmaster.pid"))"
  fi
  if [ "$(pg_sql -d postgres -tAc "SELECT count(*) FROM pg_database WHERE datname = 'prefect'")" != 1 ]; then
    pg_sql -d postgres -qc "CREATE DATABASE prefect" > /dev/null
    say "created database prefect"
  fi
}

start_detached() {  # name, command...: its own session (process group = its pid), log and pid file
  local name=$1; shift
  setsid "$@" > "$state/$name.log" 2>&1 < /dev/null &
  echo $! > "$state/$name.pid"
}

wait_healthy() {
  local deadline=$((SECONDS + 120))
  until curl -fsS "$api/health" > /dev/null 2>&1; do
    alive "$state/server.pid" || { tail -20 "$state/server.log" >&2; die "the Prefect server exited (log: $state/server.log)"; }
    [ $SECONDS -lt $deadline ] || die "the Prefect server is not healthy after 120 s (log: $state/server.log)"
    sleep 1
  done
}

start() {
  [ -n "$prefect" ] || die "no prefect command: run scripts/setup.sh, or set PREFECT"
  mkdir -p "$state"
  local chosen=${LECCR_PREFECT_DATABASE:-postgresql}
  case "$chosen" in
    postgresql|sqlite) ;;
    *) die "LECCR_PREFECT_DATABASE must be postgresql or sqlite, not $chosen" ;;
  esac
  if [ -f "$state/database" ] && [ "$(cat "$state/database")" != "$chosen" ] && alive "$state/server.pid"; then
    die "the server in $state runs on $(cat "$state/database"); stop it before starting one on $chosen"
  fi
  echo "$chosen" > "$state/database"
  if [ "$chosen" = postgresql ]; then start_postgres; else say "database: SQLite ($state/prefect.db)"; fi
  prefect_env
  if alive "$state/server.pid"; then
    say "Prefect server already running (pid $(cat "$state/server.pid"))"
  else
    start_detached server "$prefect" server start --host 127.0.0.1 --port "$port"
    wait_healthy
    say "started the Prefect server on $api (pid $(cat "$state/server.pid"), log $state/server.log)"
  fi
  if ! "$prefect" work-pool inspect local > /dev/null 2>&1; then
    "$prefect" work-pool create local --type process > /dev/null
    say "created work pool local (process)"
  fi
  if alive "$state/worker.pid"; then
    say "worker already running (pid $(cat "$state/worker.pid"))"
  else
    start_detached worker "$prefect" worker start --pool local
    say "started a worker for pool local (pid $(cat "$state/worker.pid"), log $state/worker.log)"
  fi
  say "use it with: export PREFECT_API_URL=$api"
}

# name: SIGTERM to its process group (it and what it started), SIGKILL after the timeout. Prefect 3.7's
# worker turns a SIGTERM into a SIGINT to itself and then waits (observed: still running 60 s later, with
# no flow run in progress); only a second signal ends it, so the escalation is what stops it in practice.
stop_group() {
  local name=$1 pidfile=$state/$1.pid pid waited=0
  if ! alive "$pidfile"; then
    say "$name: not running"
    rm -f "$pidfile"
    return
  fi
  pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  while kill -0 -- "-$pid" 2>/dev/null && [ $waited -lt $((stop_timeout * 10)) ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || true
    say "$name: stopped (pid $pid) with SIGKILL: SIGTERM left it running for ${stop_timeout} s"
  else
    say "$name: stopped (pid $pid) with SIGTERM"
  fi
  rm -f "$pidfile"
}

stop() {
  # The worker first (it would log tracebacks once its server is gone), then the server, then its database.
  stop_group worker
  stop_group server
  if [ -f "$pg_data/PG_VERSION" ] && as_pg "$(pg_bin pg_ctl)" -D "$pg_data" status > /dev/null 2>&1; then
    local pid
    pid=$(head -1 "$pg_data/postmaster.pid")
    as_pg "$(pg_bin pg_ctl)" -D "$pg_data" -m fast -w -t "$stop_timeout" stop > /dev/null \
      || as_pg "$(pg_bin pg_ctl)" -D "$pg_data" -m immediate -w stop > /dev/null
    say "PostgreSQL: stopped (pid $pid)"
  elif [ "$(database)" = sqlite ]; then
    say "database: SQLite, nothing to stop"
  else
    say "PostgreSQL: not running"
  fi
}

status() {
  local code=0
  for name in server worker; do
    if alive "$state/$name.pid"; then say "$name: running (pid $(cat "$state/$name.pid"))"
    else say "$name: stopped"; code=3; fi
  done
  if [ "$(database)" = sqlite ]; then
    say "database: SQLite ($state/prefect.db)"
  elif [ -f "$pg_data/PG_VERSION" ] && as_pg "$(pg_bin pg_ctl)" -D "$pg_data" status > /dev/null 2>&1; then
    say "PostgreSQL: running (pid $(head -1 "$pg_data/postmaster.pid"), 127.0.0.1:$pg_port)"
  else
    say "PostgreSQL: stopped"; code=3
  fi
  if curl -fsS "$api/health" > /dev/null 2>&1; then say "API: $api healthy"; fi
  return $code
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
