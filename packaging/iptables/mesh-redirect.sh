#!/bin/sh
# Sends this host's outgoing TCP connections to mesh-proxy's transparent outbound listener
# (`[[outbound]] transparent = true`), which reads each one's original destination
# (SO_ORIGINAL_DST) and meshes it when a service's `addresses` hold it, or relays it as
# it is. Linux, iptables (nft or legacy backend); run as root.
#
#   mesh-redirect.sh install     # add the rules (replacing ours if present)
#   mesh-redirect.sh remove      # take ours out again
#   mesh-redirect.sh show        # print them
#
# Settings (environment):
#   PROXY_PORT=4141        the transparent listener's port (required for install): the
#                          port of the [[outbound]] with `transparent = true`, never an
#                          explicit listener's, which would send every connection of the
#                          host to one service
#   PROXY_UID=mesh-proxy   the user mesh-proxy runs as: its own connections are never
#                          redirected (or they would loop). Or PROXY_GID=<group> instead.
#   ONLY="10.96.0.0/12"    redirect only these destinations (CIDRs, space separated);
#                          default: every destination
#   SKIP="127.0.0.0/8 169.254.169.254/32"
#                          never redirect these (default: loopback and the cloud metadata
#                          address), checked before ONLY
#   SKIP_PORTS="22"        never redirect connections to these destination ports
#   IPV6=1                 the same rules for IPv6 with ip6tables (SKIP then defaults to
#                          ::1/128)
#
# What it installs (table nat):
#   OUTPUT -p tcp -j MESH_OUTPUT
#   MESH_OUTPUT: proxy's own traffic -> RETURN; SKIP, SKIP_PORTS -> RETURN;
#                ONLY (or everything) -> REDIRECT --to-ports PROXY_PORT
#
# Only connections this host makes are redirected (OUTPUT); inbound traffic reaches the
# proxy's inbound listeners on their own ports. Rules do not survive a reboot: run this
# from a systemd unit ordered before mesh-proxy (ExecStartPre=) or save them with
# iptables-save.
set -eu

action=${1:-install}
port=${PROXY_PORT:-}
if [ "$action" = install ]; then
    case "$port" in
        ''|*[!0-9]*)
            echo "$0: set PROXY_PORT to the transparent listener's port (the [[outbound]] with transparent = true)" >&2
            exit 2
            ;;
    esac
fi
chain=MESH_OUTPUT

rules() {
    ipt=$1
    skip=$2
    if [ -n "${PROXY_GID:-}" ]; then
        $ipt -t nat -A $chain -m owner --gid-owner "$PROXY_GID" -j RETURN
    else
        $ipt -t nat -A $chain -m owner --uid-owner "${PROXY_UID:-mesh-proxy}" -j RETURN
    fi
    for cidr in $skip; do
        $ipt -t nat -A $chain -d "$cidr" -j RETURN
    done
    for p in ${SKIP_PORTS:-}; do
        $ipt -t nat -A $chain -p tcp --dport "$p" -j RETURN
    done
    if [ -n "${ONLY:-}" ]; then
        for cidr in $ONLY; do
            $ipt -t nat -A $chain -p tcp -d "$cidr" -j REDIRECT --to-ports "$port"
        done
    else
        $ipt -t nat -A $chain -p tcp -j REDIRECT --to-ports "$port"
    fi
}

remove() {
    ipt=$1
    while $ipt -t nat -D OUTPUT -p tcp -j $chain 2>/dev/null; do :; done
    $ipt -t nat -F $chain 2>/dev/null || true
    $ipt -t nat -X $chain 2>/dev/null || true
}

install() {
    ipt=$1
    skip=$2
    remove "$ipt"
    $ipt -t nat -N $chain
    rules "$ipt" "$skip"
    $ipt -t nat -A OUTPUT -p tcp -j $chain
}

for family in 4 6; do
    if [ "$family" = 4 ]; then
        ipt=iptables
        skip=${SKIP-127.0.0.0/8 169.254.169.254/32}
    else
        [ "${IPV6:-0}" = 1 ] || continue
        ipt=ip6tables
        skip=${SKIP-::1/128}
    fi
    case "$action" in
        install) install "$ipt" "$skip" ;;
        remove) remove "$ipt" ;;
        show) $ipt -t nat -S $chain 2>/dev/null || echo "no $chain chain ($ipt)" ;;
        *) echo "usage: $0 install|remove|show" >&2; exit 2 ;;
    esac
done
