# Shared set-up of the lab benchmarks (sourced by tools/bench/lab-*; not run on its own).
#
#   source tools/bench/lab-common.bash
#   bench_lab_up NAT_A NAT_B    # check the release build, netlab up, q2q-server on pub for
#                               # example.com, alice@example.com (host-a) and bob@example.com
#                               # (host-b) registered
#
# After it: $BIN (release binaries, or $BENCH_BIN), $work (a temporary directory, removed on exit), lab HOST
# CMD... (run in a lab host), BG (pids ended on exit; add yours), alice/bob's homes
# $work/alice and $work/bob. Exit trap: both daemons down, BG ended, the lab and $work
# removed, then `bench_extra_cleanup` if the caller defined it. Needs root (callers check)
# and the lab lock (callers run under `flock /tmp/q2q-lab.lock`).
#
# The scripts do not build: a release build takes minutes on a loaded machine, and everyone
# else waits for the lab lock meanwhile. Build first, then take the lock:
#   cargo build --release --bins --example netimpair --example bench-relay-tag && flock /tmp/q2q-lab.lock tools/bench/lab-speed
# bench_need_bins stops with that advice when a binary is missing or older than a source.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# BENCH_BIN=DIR: use the q2q-tun and q2q-server in DIR as they are (A/B runs of saved builds).
# BENCH_LOGS=DIR: keep both daemons' logs there (alice.log, bob.log); with
# RUST_LOG=info,q2q::ptcp=debug they hold a "session report" every second (round trip,
# window, retransmissions, ACKs, offload counters).
BIN=${BENCH_BIN:-$PWD/target/release}
export Q2Q_PASSWORD=bench-password-1
BG=()
work=$(mktemp -d /tmp/q2q-bench.XXXXXX); chmod 755 "$work"

bench_cleanup() {
  local h p
  # Every step runs, whatever failed before (errexit would stop at the first dead pid, and
  # processes left in the lab would keep the lab lock's file descriptor open).
  set +e
  if declare -F bench_extra_cleanup >/dev/null; then bench_extra_cleanup || true; fi
  if [[ -n ${BENCH_LOGS:-} ]]; then
    mkdir -p "$BENCH_LOGS"
    for h in alice bob; do cp -f "$work/$h/q2q-tun.log" "$BENCH_LOGS/$h.log"; done
  fi
  for h in alice bob; do
    [[ -S $work/$h/q2q.sock ]] && Q2Q_HOME=$work/$h timeout 10 "$BIN/q2q-tun" down >/dev/null 2>&1
  done
  for p in "${BG[@]}"; do kill "$p" 2>/dev/null; done
  tools/netlab down >/dev/null 2>&1; rm -rf "$work"
  set -e
}
trap bench_cleanup EXIT
lab() { local h=$1; shift; tools/netlab exec "$h" -- "$@"; }

# The pid of the q2q-tun daemon running in lab host $1 (empty if none).
bench_daemon_pid() {
  local p
  for p in $(ip netns pids "$(tools/netlab ns "$1")" 2>/dev/null); do
    # cmdline is NUL-separated: the daemon is the q2q-tun with an "up" argument.
    [[ $(cat "/proc/$p/comm" 2>/dev/null) == q2q-tun ]] && tr '\0' '\n' <"/proc/$p/cmdline" | grep -qx up \
      && { echo "$p"; return; }
  done
}

# "RSS now / peak RSS" of pid $1 in MiB (from /proc/PID/status), or "gone".
bench_rss() {
  awk '/^VmRSS:/ { r = $2 } /^VmHWM:/ { h = $2 } END { if (r == "") print "gone"; else printf "%.1f MiB now, %.1f MiB peak", r / 1024, h / 1024 }' \
    "/proc/$1/status" 2>/dev/null || echo gone
}

# CPU time PID has used so far (user + system, all threads), in clock ticks.
bench_cpu_ticks() {
  # Fields 14 and 15 of /proc/PID/stat; the comm field (2) may hold spaces, so cut after ')'.
  sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $12 + $13 }' || echo 0
}

# A process's CPU time in user space so far, in clock ticks (field 14 of /proc/PID/stat).
bench_user_ticks() {
  sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $12 }' || echo 0
}

# The whole machine's CPU time so far, in clock ticks summed over the cores (/proc/stat):
# "busy idle steal". Busy is every process and the kernel (user, nice, system, irq, softirq);
# idle includes iowait; steal is time the hypervisor gave to other machines.
bench_machine_ticks() {
  awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8, $5 + $6, $9; exit }' /proc/stat
}

# Exit 1 unless each of $BIN/NAME... exists and is newer than every source it is built from
# (the workspace's Rust sources, manifests and lock file). Skipped with $BENCH_BIN (saved
# builds are meant to be old).
bench_need_bins() {
  local b stale
  [[ -z ${BENCH_BIN:-} ]] || return 0
  for b in "$@"; do
    if [[ ! -x $BIN/$b ]]; then
      echo "error: $BIN/$b is missing: build first, outside the lab lock: cargo build --release --bins --example netimpair --example bench-relay-tag" >&2
      exit 1
    fi
    stale=$(find src netstack/src tools/lab Cargo.toml Cargo.lock netstack/Cargo.toml -newer "$BIN/$b" \
      \( -name '*.rs' -o -name '*.toml' -o -name Cargo.lock \) -print -quit)
    if [[ -n $stale ]]; then
      echo "error: $BIN/$b is older than $stale: build first, outside the lab lock: cargo build --release --bins --example netimpair --example bench-relay-tag" >&2
      exit 1
    fi
  done
}

bench_lab_up() {
  local nat_a=${1:-cone} nat_b=${2:-cone}
  bench_need_bins q2q-tun q2q-server
  tools/netlab up --nat-a "$nat_a" --nat-b "$nat_b" >/dev/null
  lab pub "$BIN/q2q-server" --data-dir "$work/srv" init --domain example.com >/dev/null
  # The lab's servers are at documentation addresses, which a server refuses to fetch
  # other domains' CAs from unless config.toml allows them.
  sed -i 's|^federation_allow = .*|federation_allow = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]|' "$work/srv/config.toml"
  lab pub timeout 3600 "$BIN/q2q-server" --data-dir "$work/srv" run >/dev/null 2>&1 &
  BG+=($!)
  sleep 1
  Q2Q_HOME=$work/alice lab host-a "$BIN/q2q-tun" register alice@example.com --server 198.51.100.1:8788 >/dev/null
  Q2Q_HOME=$work/bob lab host-b "$BIN/q2q-tun" register bob@example.com --server 203.0.113.1:8788 >/dev/null
}
