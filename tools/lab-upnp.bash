# miniupnpd (Debian's miniupnpd-nftables 2.3.1: UPnP IGD, NAT-PMP, PCP) on a lab router.
# Sourced by lab scripts (tools/lab-portmap, tools/lab-netcheck), as root, after
# `tools/netlab up` with NETLAB_PREFIX exported:
#
#   source tools/lab-upnp.bash
#   upnp_start ROUTER WORKDIR [yes|no] [MAX_LIFETIME]
#                                        start it on ROUTER (nat-a|nat-b), NAT-PMP/PCP on or
#                                        off (UPnP IGD is always on), PCP lifetimes cut to
#                                        MAX_LIFETIME seconds (default 86400); 0 when it maps
#   upnp_lease EXTPORT                   when its lease of EXTPORT (UDP) ends, Unix seconds
#   upnp_rules                           its DNAT rules now: "EXTPORT IP:PORT" per line
#   upnp_stop                            stop it (`netlab down` ends it too)
#
# miniupnpd refuses to map ports when its WAN address is a reserved one, and every lab
# address is (documentation ranges); version 2.3.1 has no option to allow that. Its own way
# around it is STUN (ext_perform_stun): it learns its public address from a STUN server and
# checks, with RFC 3489 change requests, that nothing upstream filters. So upnp_start runs
# Debian's stund (package stun-server) on pub's two addresses for the moment miniupnpd starts,
# and lets the STUN server's answers reach the router itself meanwhile (a rule in the lab's
# own input chain, removed again: miniupnpd asks only at start and when its WAN address
# changes). Needs: miniupnpd (/usr/sbin), stund, nft, and NL (the path of tools/netlab).

UPNP_ROUTER= UPNP_DIR= UPNP_PID=

upnp_ns() { "$NL" ns "$UPNP_ROUTER"; }

upnp_lan() { case $1 in nat-a) echo 192.168.1.0/24 ;; nat-b) echo 192.168.2.0/24 ;; esac; }

# miniupnpd's DNAT rules, one "PORT IP:PORT" per line.
upnp_rules() {
  [[ -n $UPNP_ROUTER ]] || return 0
  ip netns exec "$(upnp_ns)" nft list chain inet filter prerouting_miniupnpd 2>/dev/null |
    sed -nE 's/.*dport ([0-9]+) dnat ip to ([0-9.:]+).*/\1 \2/p'
}

# The end of the lease of UDP EXTPORT, from miniupnpd's lease file
# ("UDP:EXTPORT:IADDR:IPORT:EXPIRY:DESCRIPTION" per line).
upnp_lease() {
  awk -F: -v p="$1" '$1 == "UDP" && $2 == p {print $5}' "$UPNP_DIR/miniupnpd.leases" 2>/dev/null | tail -n1
}

upnp_start() { # ROUTER WORKDIR [yes|no] [MAX_LIFETIME]
  local router=$1 natpmp=${3:-yes} max_lifetime=${4:-86400} min_lifetime=120 ns lan stun_pid tag="lab-upnp: STUN answers to miniupnpd" handle
  UPNP_ROUTER=$router UPNP_DIR=$2
  lan=$(upnp_lan "$router")
  [[ -n $lan ]] || { echo "upnp_start: no such router '$router'" >&2; return 1; }
  ns=$(upnp_ns)
  # The chains miniupnpd adds its rules to (what Debian's nft_init.sh makes: table inet
  # filter with chains miniupnpd, prerouting_miniupnpd, postrouting_miniupnpd), beside the
  # lab's own "ip lab" table, whose forward chain lets in what a DNAT rule sends on.
  ip netns exec "$ns" nft -f - <<'EOF' || return 1
table inet filter {}
delete table inet filter
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd {}
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain prerouting_miniupnpd {}
  chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
  chain postrouting_miniupnpd {}
}
EOF
  ip netns exec "$ns" nft insert rule ip lab fwin iifname wan ip saddr '{ 198.51.100.1, 203.0.113.1 }' \
    udp sport '{ 3478, 3479 }' accept comment "\"$tag\"" || return 1
  "$NL" exec pub -- timeout 60 stund -h 198.51.100.1 -a 203.0.113.1 >"$UPNP_DIR/stund.log" 2>&1 &
  stun_pid=$!
  cat >"$UPNP_DIR/miniupnpd.conf" <<EOF
ext_ifname=wan
listening_ip=lan
ext_perform_stun=yes
ext_stun_host=198.51.100.1
ext_stun_port=3478
enable_upnp=yes
enable_natpmp=$natpmp
ipv6_disable=yes
secure_mode=yes
system_uptime=no
lease_file=$UPNP_DIR/miniupnpd.leases
min_lifetime=$((max_lifetime <= min_lifetime ? max_lifetime / 2 : min_lifetime))
max_lifetime=$max_lifetime
uuid=6f0a5e1c-3b5a-4d39-9d4c-7a2e51d0c0de
allow 1024-65535 $lan 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
EOF
  : >"$UPNP_DIR/miniupnpd.log"
  "$NL" exec "$router" -- timeout 900 miniupnpd -d -f "$UPNP_DIR/miniupnpd.conf" -P "$UPNP_DIR/miniupnpd.pid" \
    >>"$UPNP_DIR/miniupnpd.log" 2>&1 &
  UPNP_PID=$!
  local want="HTTP listening"
  [[ $natpmp == yes ]] && want="Listening for NAT-PMP/PCP"
  for _ in $(seq 100); do
    grep -q "$want" "$UPNP_DIR/miniupnpd.log" && break
    kill -0 "$UPNP_PID" 2>/dev/null || break
    sleep 0.1
  done
  # STUN was asked; the door for its answers closes again.
  kill -TERM "$stun_pid" 2>/dev/null; wait "$stun_pid" 2>/dev/null
  for handle in $(ip netns exec "$ns" nft -a list chain ip lab fwin | sed -n "s/.*comment \"$tag\" # handle \([0-9]*\)\$/\1/p"); do
    ip netns exec "$ns" nft delete rule ip lab fwin handle "$handle"
  done
  grep -q "Port forwarding is now enabled" "$UPNP_DIR/miniupnpd.log" && grep -q "$want" "$UPNP_DIR/miniupnpd.log"
}

upnp_stop() { # TERM to the daemon itself (timeout, its parent, passes it on too), then wait
  [[ -n $UPNP_PID ]] || return 0
  local pid
  pid=$(cat "$UPNP_DIR/miniupnpd.pid" 2>/dev/null)
  kill -TERM "${pid:-$UPNP_PID}" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$UPNP_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$UPNP_PID" 2>/dev/null
  wait "$UPNP_PID" 2>/dev/null
  rm -f "$UPNP_DIR/miniupnpd.pid"
  UPNP_PID=
}
