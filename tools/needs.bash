# What q2q's tools need from the machine, in one place, and how to get it on Debian.
# Sourced (not run) by .ci/run, tools/demo and tools/test:
#
#   source tools/needs.bash
#   needs build lab fuzz    # as root: installs what is missing (apt-get, cargo install);
#                           # otherwise prints what is missing and the one command to get it.
#                           # Returns 0 when nothing of those groups is missing afterwards.
#
# Groups (each entry is "package:what shows it is there", a command or an absolute path):
#   build  compiling q2q (ring and the bundled SQLite need a C compiler and libc headers)
#   lab    the network lab (tools/netlab) and the programs the lab scripts and the demo drive
#   fuzz   cargo-fuzz (installed with `cargo install cargo-fuzz --locked`) and a nightly
#          toolchain, which is only reported: `rustup toolchain install nightly` installs it
# Rust itself (cargo) is never installed here: https://rustup.rs says how. Under sudo, root's
# PATH lacks the invoking user's ~/.cargo/bin: then cargo runs as that user (who owns the
# checkout and the toolchain), through needs_cargo, and only the lab runs as root.

NEEDS_build=(gcc:cc libc6-dev:/usr/include/stdio.h)
NEEDS_lab=(
  iproute2:ip nftables:nft conntrack:conntrack procps:sysctl socat:socat iputils-ping:ping
  openssh-server:sshd openssh-client:ssh iperf3:iperf3 dnsutils:dig jq:jq util-linux:unshare
  python3-minimal:python3 openssl:openssl postgresql:pg_ctlcluster
  miniupnpd-nftables:miniupnpd stun-server:stund
)

# Whether a program (also one in /usr/sbin, outside a user's PATH) or a file is there.
needs_present() {
  case $1 in
    /*) [[ -e $1 ]] ;;
    *) command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /sbin/$1 ]] ;;
  esac
}

# The apt packages of the given groups that are missing, one per line.
needs_missing_packages() {
  local group entry
  for group in "$@"; do
    [[ $group == fuzz ]] && continue
    local -n list="NEEDS_$group"
    for entry in "${list[@]}"; do
      needs_present "${entry#*:}" || echo "${entry%%:*}"
    done
    unset -n list
  done
}

needs_nightly() { needs_cargo +nightly --version >/dev/null 2>&1; }
needs_cargo_fuzz() { needs_cargo fuzz --version >/dev/null 2>&1; }

# Run cargo: ours, or under sudo the invoking user's (as that user, in their environment).
needs_cargo() {
  if command -v cargo >/dev/null 2>&1; then
    cargo "$@"
    return
  fi
  local home
  home=$(getent passwd "${SUDO_USER:-}" | cut -d: -f6) || home=
  if [[ -n ${SUDO_USER:-} && -x $home/.cargo/bin/cargo ]]; then
    runuser -u "$SUDO_USER" -- env HOME="$home" PATH="$home/.cargo/bin:$PATH" cargo "$@"
    return
  fi
  echo "missing: Rust (cargo); install it as https://rustup.rs says, then run this again" >&2
  return 127
}

needs() {
  local missing=() still=() group
  needs_cargo --version >/dev/null || return 1
  mapfile -t missing < <(needs_missing_packages "$@")
  local fuzz=0
  for group in "$@"; do [[ $group == fuzz ]] && fuzz=1; done
  if [[ $(id -u) -eq 0 ]]; then
    if ((${#missing[@]})); then
      echo "installing: ${missing[*]} (apt-get)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null &&
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        echo "apt-get install ${missing[*]} failed" >&2
      mapfile -t missing < <(needs_missing_packages "$@")
    fi
    if ((fuzz)) && ! needs_cargo_fuzz; then
      echo "installing: cargo-fuzz (cargo install cargo-fuzz --locked)"
      needs_cargo install cargo-fuzz --locked --quiet || echo "cargo install cargo-fuzz failed" >&2
    fi
  fi
  if ((${#missing[@]})); then
    still+=("${missing[@]}")
    echo "missing packages: ${missing[*]}; install them with:" >&2
    echo "  sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  fi
  if ((fuzz)) && ! needs_cargo_fuzz; then
    still+=(cargo-fuzz)
    echo "missing: cargo-fuzz; install it with: cargo install cargo-fuzz --locked" >&2
  fi
  if ((fuzz)) && ! needs_nightly; then
    still+=(nightly)
    echo "missing: a nightly toolchain (for fuzzing); install it with: rustup toolchain install nightly" >&2
  fi
  ((${#still[@]} == 0))
}
