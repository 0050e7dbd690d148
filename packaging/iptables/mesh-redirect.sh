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
#   EXEMPT_USERS="spire"   other users (names or uids, space separated) whose connections
#                          are never redirected
#   EXEMPT_GIDS="spire"    the same for groups (names or gids)
#   ONLY="10.96.0.0/12"    redirect only these IPv4 destinations (CIDRs, space
#                          separated); default: every destination
#   SKIP="127.0.0.0/8 169.254.169.254/32"
#                          never redirect these IPv4 destinations (default: loopback and
#                          the cloud metadata address), checked before ONLY
#   SKIP_PORTS="22"        never redirect connections to these destination ports
#   IPV6=1                 the same rules for IPv6 with ip6tables, with their own CIDRs:
#   ONLY6="fd00::/8"         IPv6 destinations to redirect only (required when ONLY is
#                            set: "::/0" for every one); default: every destination
#   SKIP6="::1/128"          IPv6 destinations never redirected (default: loopback)
#                          The kernel redirects IPv6 connections to [::1]:PROXY_PORT, so
#                          the proxy needs a second transparent listener there
#                          (`listen = "[::1]:4141"`) beside the IPv4 one on 127.0.0.1.
#
# A CIDR of the wrong family (an IPv6 one in ONLY or SKIP, an IPv4 one in ONLY6 or SKIP6)
# is refused (exit 2) before anything is installed. If a rule still fails to install (a
# user that does not exist, say), the MESH_OUTPUT chain and its OUTPUT jump are taken out
# of both families, so that neither is left half-built nor one without the other, and the
# script exits 1.
#
# SPIRE: mesh-proxy binds its listeners, the transparent one included, only once it holds
# its first SVID. Until then the port refuses connections, those of the SPIRE agent to its
# server included: if they are redirected too, the agent never gets the SVID and the proxy
# never starts. Exempt the agent's user (EXEMPT_USERS="spire", or its uid; the uid of a
# root agent exempts every root process), or its server's address (SKIP="... 10.0.0.5/32")
# or port (SKIP_PORTS="8081"). The Workload API socket is a Unix socket: not redirected.
#
# What it installs (table nat):
#   OUTPUT -p tcp -j MESH_OUTPUT
#   MESH_OUTPUT: proxy's own traffic -> RETURN; EXEMPT_USERS, EXEMPT_GIDS -> RETURN;
#                SKIP, SKIP_PORTS -> RETURN; ONLY (or everything) -> REDIRECT --to-ports
#                PROXY_PORT
#
# Only connections this host makes are redirected (OUTPUT); inbound traffic reaches the
# proxy's inbound listeners on their own ports. Rules do not survive a reboot: run this
# from mesh-proxy's unit (ExecStartPre=+ and ExecStopPost=+ in a drop-in, with
# Environment=PROXY_PORT=...; packaging/README.md has the recipe) or save them with
# iptables-save.
set -eu

action=${1:-install}
port=${PROXY_PORT:-}
chain=MESH_OUTPUT

fail() {
    echo "$0: $*" >&2
    exit 2
}

# Refuses (exit 2) a CIDR in $2, the setting named $3, that is not of family $1 (4 or 6),
# by whether it has a colon.
family_of() {
    for cidr in $2; do
        case "$1:$cidr" in
            4:*:*) fail "$3 holds $cidr, an IPv6 network: put it in ${3}6" ;;
            6:*:*) ;;
            6:*) fail "$3 holds $cidr, an IPv4 network: put it in ${3%6}" ;;
        esac
    done
}

if [ "$action" = install ]; then
    case "$port" in
        ''|*[!0-9]*)
            fail "set PROXY_PORT to the transparent listener's port (the [[outbound]] with transparent = true)"
            ;;
    esac
    family_of 4 "${ONLY:-}" ONLY
    family_of 4 "${SKIP:-}" SKIP
    if [ "${IPV6:-0}" = 1 ]; then
        family_of 6 "${ONLY6:-}" ONLY6
        family_of 6 "${SKIP6:-}" SKIP6
        if [ -n "${ONLY:-}" ] && [ -z "${ONLY6:-}" ]; then
            fail "ONLY covers IPv4 destinations only: set ONLY6 too (IPv6 CIDRs, \"::/0\" for every destination)"
        fi
    fi
fi

# Runs one iptables command; says which one failed.
run() {
    if ! "$@"; then
        echo "$0: failed: $*" >&2
        return 1
    fi
}

rules() {
    ipt=$1
    skip=$2
    only=$3
    if [ -n "${PROXY_GID:-}" ]; then
        run $ipt -t nat -A $chain -m owner --gid-owner "$PROXY_GID" -j RETURN || return 1
    else
        run $ipt -t nat -A $chain -m owner --uid-owner "${PROXY_UID:-mesh-proxy}" -j RETURN || return 1
    fi
    for user in ${EXEMPT_USERS:-}; do
        run $ipt -t nat -A $chain -m owner --uid-owner "$user" -j RETURN || return 1
    done
    for group in ${EXEMPT_GIDS:-}; do
        run $ipt -t nat -A $chain -m owner --gid-owner "$group" -j RETURN || return 1
    done
    for cidr in $skip; do
        run $ipt -t nat -A $chain -d "$cidr" -j RETURN || return 1
    done
    for p in ${SKIP_PORTS:-}; do
        run $ipt -t nat -A $chain -p tcp --dport "$p" -j RETURN || return 1
    done
    if [ -n "$only" ]; then
        for cidr in $only; do
            run $ipt -t nat -A $chain -p tcp -d "$cidr" -j REDIRECT --to-ports "$port" || return 1
        done
    else
        run $ipt -t nat -A $chain -p tcp -j REDIRECT --to-ports "$port" || return 1
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
    remove "$ipt"
    run $ipt -t nat -N $chain || return 1
    rules "$@" || return 1
    run $ipt -t nat -A OUTPUT -p tcp -j $chain
}

families=4
[ "${IPV6:-0}" = 1 ] && families="4 6"
# An IPv6 chain left by an earlier install with IPV6=1 goes with a remove, and with an
# install for IPv4 alone: otherwise the host's IPv6 connections would still be sent to a
# proxy that is gone, or that no longer listens on [::1].
if [ "$families" = 4 ] && { [ "$action" = remove ] || [ "$action" = install ]; } \
    && command -v ip6tables >/dev/null 2>&1; then
    remove ip6tables
fi
for family in $families; do
    if [ "$family" = 4 ]; then
        ipt=iptables
        skip=${SKIP-127.0.0.0/8 169.254.169.254/32}
        only=${ONLY:-}
    else
        ipt=ip6tables
        skip=${SKIP6-::1/128}
        only=${ONLY6:-}
    fi
    case "$action" in
        install)
            if ! install "$ipt" "$skip" "$only"; then
                # All or nothing: no family left half-built, nor one without the other.
                for undo in $families; do
                    if [ "$undo" = 4 ]; then remove iptables; else remove ip6tables; fi
                done
                echo "$0: none of its $chain rules are left (iptables, ip6tables)" >&2
                exit 1
            fi
            ;;
        remove) remove "$ipt" ;;
        show) $ipt -t nat -S $chain 2>/dev/null || echo "no $chain chain ($ipt)" ;;
        *) echo "usage: $0 install|remove|show" >&2; exit 2 ;;
    esac
done
