#!/bin/sh
# Installs flotilla-agent on a device (a Raspberry Pi with Raspberry Pi OS
# Lite, or any systemd Linux) and starts it: the steps of the README's
# "Installing the agent on a Raspberry Pi", in the order a new user needs them.
# The test suite runs this very script in a device container (systemd as
# PID 1) against a TLS nats-server with enrolled credentials and a signing
# control plane, so the README and the procedure cannot drift apart.
#
# Run as root on the device, from a directory holding what you copied over:
#
#   sudo sh install-agent.sh \
#     --id pi-01 \
#     --nats-url tls://nats.example:4222 \
#     --creds pi-01.creds \                 # from `flotilla agent enroll pi-01`
#     --tls-ca ca.pem \                     # the CA of the server's certificate
#     --trusted-key OB…56 characters… \     # `flotilla keys generate` printed it
#     --file-root /etc/kiosk                # repeat for every root
#
# Options:
#   --id ID                  this device's agent id (required)
#   --nats-url URL           the NATS server (required)
#   --creds FILE             the device's credentials (installed as /etc/flotilla/device.creds)
#   --tls-ca FILE            CA certificate (installed as /etc/flotilla/tls/ca.pem; TLS required)
#   --tls-cert FILE --tls-key FILE   client certificate for mutual TLS
#   --trusted-key KEY        the control plane's public signing key; repeat while rotating
#   --allow-unsigned         development fleets only, instead of --trusted-key
#   --file-root DIR          a directory File resources may be written under (created)
#   --label KEY=VALUE        a label the device reports about itself (a hint)
#   --binary FILE            the agent binary (default: ./flotilla-agent)
#   --unit FILE              the unit (default: ./flotilla-agent.service, else
#                            deploy/systemd/flotilla-agent.service beside this script)
#   --wait SECONDS           how long to wait for "connected to NATS" (default 60; 0: don't)
#
# Idempotent: running it again with new values rewrites the config and
# restarts the agent; the agent's state in /var/lib/flotilla is kept.
set -eu

die() { echo "install-agent: $*" >&2; exit 2; }
say() { echo "==> $*"; }

here=$(cd "$(dirname "$0")" && pwd)
id= nats_url= creds= tls_ca= tls_cert= tls_key= allow_unsigned=false wait=60
binary=./flotilla-agent
unit=./flotilla-agent.service
[ -f "$unit" ] || unit="$here/systemd/flotilla-agent.service"
keys= roots= labels=

while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || [ "$1" = --allow-unsigned ] || die "$1 needs a value"
    case "$1" in
        --id) id=$2 ;;
        --nats-url) nats_url=$2 ;;
        --creds) creds=$2 ;;
        --tls-ca) tls_ca=$2 ;;
        --tls-cert) tls_cert=$2 ;;
        --tls-key) tls_key=$2 ;;
        --trusted-key) keys="$keys \"$2\"," ;;
        --allow-unsigned) allow_unsigned=true; shift; continue ;;
        --file-root) roots="$roots \"$2\"," ;;
        --label) labels="$labels
${2%%=*} = \"${2#*=}\"" ;;
        --binary) binary=$2 ;;
        --unit) unit=$2 ;;
        --wait) wait=$2 ;;
        *) die "unknown option $1 (see the comment at the top of this script)" ;;
    esac
    shift 2
done

# Everything is checked before anything is installed.
[ "$(id -u)" = 0 ] || die "run as root (sudo sh $0 …)"
[ -n "$id" ] || die "--id is required"
[ -n "$nats_url" ] || die "--nats-url is required"
[ -f "$binary" ] || die "no agent binary at $binary (--binary)"
[ -f "$unit" ] || die "no unit file at $unit (--unit)"
command -v systemctl >/dev/null || die "systemctl not found: the agent runs as a systemd service"
for f in "$creds" "$tls_ca" "$tls_cert" "$tls_key"; do
    [ -z "$f" ] || [ -f "$f" ] || die "no such file: $f"
done
if [ -n "$tls_cert$tls_key" ] && { [ -z "$tls_cert" ] || [ -z "$tls_key" ]; }; then
    die "--tls-cert and --tls-key go together"
fi
case "$nats_url" in
    tls://*) [ -n "$tls_ca" ] || die "a tls:// URL needs --tls-ca (the CA of the server's certificate)" ;;
esac
for k in $(echo "$keys" | tr -d '",'); do
    case "$k" in
        S*) die "--trusted-key wants the control plane's PUBLIC key (O…); this is a seed, a secret: run \`flotilla keys public\` on it and keep the seed off the device" ;;
        O*) [ ${#k} = 56 ] || die "--trusted-key $k is not a public nkey (O… and 56 characters)" ;;
        *) die "--trusted-key $k is not a public nkey (O… and 56 characters, as \`flotilla keys generate\` prints)" ;;
    esac
done
[ -n "$keys" ] || [ "$allow_unsigned" = true ] ||
    die "give --trusted-key (the control plane's public signing key), or --allow-unsigned for a development fleet"

say "installing the agent binary as /usr/local/bin/flotilla-agent"
install -m 0755 "$binary" /usr/local/bin/flotilla-agent.new
mv -f /usr/local/bin/flotilla-agent.new /usr/local/bin/flotilla-agent

say "installing credentials and certificates under /etc/flotilla"
install -d -m 0700 /etc/flotilla /etc/flotilla/tls
[ -z "$creds" ] || install -m 0600 "$creds" /etc/flotilla/device.creds
[ -z "$tls_ca" ] || install -m 0644 "$tls_ca" /etc/flotilla/tls/ca.pem
[ -z "$tls_cert" ] || install -m 0644 "$tls_cert" /etc/flotilla/tls/device.pem
[ -z "$tls_key" ] || install -m 0600 "$tls_key" /etc/flotilla/tls/device-key.pem

for r in $(echo "$roots" | tr -d '",'); do
    say "file root $r"
    install -d -m 0755 "$r"
done

say "writing /etc/flotilla/agent.toml"
umask 077
{
    echo "# Written by install-agent.sh; see deploy/systemd/agent.toml.example for every key."
    echo "id = \"$id\""
    echo "nats-url = \"$nats_url\""
    [ -z "$creds" ] || echo 'creds = "/etc/flotilla/device.creds"'
    [ -z "$tls_ca" ] || echo 'tls-ca = "/etc/flotilla/tls/ca.pem"'
    [ -z "$tls_cert" ] || echo 'tls-cert = "/etc/flotilla/tls/device.pem"'
    [ -z "$tls_key" ] || echo 'tls-key = "/etc/flotilla/tls/device-key.pem"'
    [ -z "$keys" ] || echo "trusted-keys = [${keys%,} ]"
    [ "$allow_unsigned" = false ] || echo "allow-unsigned = true"
    echo "file-roots = [${roots%,} ]"
    [ -z "$labels" ] || printf '[labels]%s\n' "$labels"
} >/etc/flotilla/agent.toml.new
mv -f /etc/flotilla/agent.toml.new /etc/flotilla/agent.toml

say "installing /etc/systemd/system/flotilla-agent.service"
install -m 0644 "$unit" /etc/systemd/system/flotilla-agent.service
systemctl daemon-reload
systemctl enable flotilla-agent.service
systemctl restart flotilla-agent.service

[ "$wait" -gt 0 ] || exit 0
say "waiting up to ${wait}s for the agent to reach NATS"
i=0
while [ "$i" -lt "$((wait * 2))" ]; do
    line=$(systemctl show -p StatusText --value flotilla-agent.service)
    case "$line" in
        "connected to NATS"*) echo "flotilla-agent: $line"; exit 0 ;;
    esac
    sleep 0.5
    i=$((i + 1))
done
echo "install-agent: the agent has not reached NATS after ${wait}s; its status: ${line:-none}" >&2
journalctl -u flotilla-agent.service -n 30 --no-pager >&2 || true
exit 1
