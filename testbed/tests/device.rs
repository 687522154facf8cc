//! The device container itself: systemd boots as PID 1, unit files written
//! from the host are loaded, the host reaches the system bus; and the shipped
//! `deploy/systemd/flotilla-agent.service` starts under its own hardening.
//! Needs the Docker Engine and the device image (scripts/test makes both).

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use testbed::device::{Device, UNITS_DIR_IN_DEVICE};
use testbed::workspace_root;

#[test]
fn host_writes_a_unit_and_reaches_the_bus() {
    let device = Device::start("smoke");
    assert!(
        device
            .exec(&["hostname"])
            .starts_with("flotilla-device-smoke-"),
        "the device has a hostname of its own, not the host's"
    );

    std::fs::write(
        device.units_dir().join("flotilla-smoke.service"),
        "[Service]\nExecStart=/bin/sleep 3600\n",
    )
    .unwrap();
    device.systemctl(&["daemon-reload"]);
    assert!(
        device
            .systemctl(&["cat", "flotilla-smoke.service"])
            .contains(UNITS_DIR_IN_DEVICE),
        "unit not loaded from the units dir"
    );
    device.systemctl(&["start", "flotilla-smoke.service"]);
    assert_eq!(
        device.exec_status(&["systemctl", "is-active", "flotilla-smoke.service"]),
        (0, "active".to_owned()),
        "{}",
        device.journal("flotilla-smoke.service")
    );

    // The host side of the bus: a socket that a D-Bus server answers on and
    // that accepts root (SASL EXTERNAL with uid "0", hex-encoded "30").
    let socket = device.bus_socket();
    assert!(
        std::fs::metadata(&socket).unwrap().file_type().is_socket(),
        "{} is not a socket",
        socket.display()
    );
    assert_eq!(
        device.bus_address(),
        format!("unix:path={}", socket.display())
    );
    let mut bus = UnixStream::connect(&socket).expect("connect to the device's system bus");
    bus.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bus.write_all(b"\0AUTH EXTERNAL 30\r\n").unwrap();
    let mut reply = [0u8; 64];
    let n = bus.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("OK "), "bus refused root: {reply:?}");
}

/// The shipped unit with a stand-in for the agent (the ExecStart swapped by a
/// drop-in): everything the agent does on a device still works under the
/// unit's sandbox, READY=1 and WATCHDOG=1 from the main process are
/// accepted, and setuid files are refused (RestrictSUIDSGID=yes). If an
/// option ever cannot work in this container, keep it in the shipped unit
/// and override it in deploy/systemd/testbed-overrides.conf.
#[test]
fn shipped_agent_unit_runs_under_its_hardening() {
    let device = Device::start("unit");
    let share = device.share_dir();
    write_exec(&share.join("probe.sh"), PROBE);
    write_exec(&share.join("agent-standin"), STANDIN);
    device.copy_in(
        &workspace_root().join("deploy/systemd/flotilla-agent.service"),
        "/etc/systemd/system/flotilla-agent.service",
    );
    let overrides = workspace_root().join("deploy/systemd/testbed-overrides.conf");
    device.exec(&[
        "mkdir",
        "-p",
        "/etc/systemd/system/flotilla-agent.service.d",
    ]);
    if overrides.exists() {
        device.copy_in(
            &overrides,
            "/etc/systemd/system/flotilla-agent.service.d/testbed-overrides.conf",
        );
    }
    std::fs::write(
        share.join("standin.conf"),
        "[Service]\nExecStart=\nExecStart=/flotilla/agent-standin\n",
    )
    .unwrap();
    device.exec(&[
        "cp",
        "/flotilla/standin.conf",
        "/etc/systemd/system/flotilla-agent.service.d/standin.conf",
    ]);
    device.systemctl(&["daemon-reload"]);
    // Type=notify: `start` returns once READY=1 came (or fails on 226 & co).
    let (code, _) = device.exec_status(&["systemctl", "start", "flotilla-agent.service"]);
    let journal = device.journal("flotilla-agent.service");
    assert_eq!(code, 0, "flotilla-agent.service did not start:\n{journal}");

    let results = std::fs::read_to_string(share.join("probe.out")).unwrap();
    for probe in [
        "state-dir",
        "unit-file",
        "bus-reload",
        "bus-start",
        "file-root",
        "private-tmp",
    ] {
        assert!(
            results.contains(&format!("ok {probe}\n")),
            "{probe} failed under the unit:\n{results}\n{journal}"
        );
    }
    let (code, _) = device.exec_status(&["test", "-e", "/tmp/flotilla-probe"]);
    assert_ne!(
        code, 0,
        "PrivateTmp did not apply: the agent's /tmp is the device's"
    );
    assert!(
        results.contains("refused setuid"),
        "RestrictSUIDSGID did not apply:\n{results}"
    );
    assert_eq!(
        device.exec_status(&["systemctl", "is-active", "flotilla-probe.service"]),
        (0, "active".to_owned()),
        "the unit the stand-in started over D-Bus is not active"
    );
    assert_eq!(
        device.systemctl(&[
            "show",
            "-p",
            "StatusText",
            "--value",
            "flotilla-agent.service"
        ]),
        "stand-in ready"
    );
}

fn write_exec(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What the agent does on a device, one line per probe into /flotilla/probe.out.
const PROBE: &str = r#"#!/bin/sh
out=/flotilla/probe.out
: > $out
p() { name=$1; shift; if err=$("$@" 2>&1); then echo "ok $name" >> $out; else echo "FAIL $name: $err" >> $out; fi; }
p state-dir sh -c 'echo x > "$STATE_DIRECTORY/probe" && test "$STATE_DIRECTORY" = /var/lib/flotilla'
p unit-file sh -c 'printf "[Service]\nExecStart=/bin/sleep 600\n" > /etc/systemd/system/flotilla-probe.service'
p bus-reload busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager Reload
p bus-start busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager StartUnit ss flotilla-probe.service replace
p file-root sh -c 'mkdir -p /opt/root && echo y > /opt/root/f && chown nobody:nogroup /opt/root/f && chmod 0640 /opt/root/f'
if chmod 4755 /opt/root/f 2>/dev/null; then echo "allowed setuid" >> $out; else echo "refused setuid" >> $out; fi
p private-tmp sh -c 'echo z > /tmp/flotilla-probe'
"#;

/// Stand-in for flotilla-agent: runs the probes, then, as the main process
/// (NotifyAccess=main), sends READY=1 and a WATCHDOG=1 every 5 s.
const STANDIN: &str = r#"#!/usr/bin/perl
use strict;
use warnings;
use IO::Socket::UNIX;
use Socket;
system('/bin/sh', '/flotilla/probe.sh');
my $path = $ENV{NOTIFY_SOCKET} or die "no NOTIFY_SOCKET\n";
$path =~ s/^@/\0/;
my $s = IO::Socket::UNIX->new(Type => SOCK_DGRAM, Peer => $path) or die "notify socket: $!\n";
$s->send("READY=1\nSTATUS=stand-in ready") or die "send: $!\n";
while (1) { sleep 5; $s->send("WATCHDOG=1"); }
"#;
