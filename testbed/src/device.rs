//! Device containers: real systemd as PID 1, for SystemdUnit tests.
//!
//! A [`Device`] boots [`DEVICE_IMAGE`] (Debian bookworm, systemd 252 and
//! dbus; built by `ensure_device_image` in scripts/lib.sh) in a container
//! with its own cgroup namespace. Never boot systemd with `unshare` or with
//! the host's /sys/fs/cgroup bind-mounted instead: its boot jobs then run
//! against the host (that wiped a host's /tmp once).
//!
//! Three host directories, in a temp dir the device owns, are mounted in it:
//!
//! | host side         | in the device                   | for                             |
//! |-------------------|---------------------------------|---------------------------------|
//! | `<dir>/dbus`      | `/run/dbus`                     | the system bus, [`Device::bus_address`] |
//! | [`units_dir`]     | `/usr/local/lib/systemd/system` | unit files written from the host |
//! | [`share_dir`]     | `/flotilla`                     | anything else (scripts, binaries) |
//!
//! So a test on the host can write a unit file into [`units_dir`] and drive
//! systemd over D-Bus (`Reload`, `StartUnit`, `EnableUnitFiles`, …) at
//! [`Device::bus_address`] as root, exactly as the agent does on a device;
//! or exec `systemctl` in the device to set things up and check results.
//!
//! The container uses the host network (a nats-server on 127.0.0.1 is
//! reachable from inside) and is removed (`docker rm -f`) on drop.
//!
//! [`units_dir`]: Device::units_dir
//! [`share_dir`]: Device::share_dir

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::docker::{docker, docker_ok, unique_agent};

/// The device image, imported from a debootstrap rootfs (no registry needed).
pub const DEVICE_IMAGE: &str = "flotilla-test/device:bookworm";
/// Label on every device container, to find ones a killed test run left.
pub const LABEL_DEVICE: &str = "io.flotilla.testbed.device";
/// Where [`Device::units_dir`] appears in the device: a directory on
/// systemd's unit search path, below /etc/systemd/system in priority.
pub const UNITS_DIR_IN_DEVICE: &str = "/usr/local/lib/systemd/system";
/// Where [`Device::share_dir`] appears in the device.
pub const SHARE_DIR_IN_DEVICE: &str = "/flotilla";

/// How long systemd may take to reach `running` (it takes ~0.3 s alone,
/// longer when parallel tests share two cores).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Panics with the fix when the Docker Engine or the device image is missing.
pub fn require_device_image() {
    assert!(
        docker_ok(&["image", "inspect", DEVICE_IMAGE]),
        "the Docker Engine or the image {DEVICE_IMAGE} is missing: run ./scripts/test \
         (or `source scripts/lib.sh && ensure_docker && ensure_device_image`)"
    );
}

/// A running device container with systemd as PID 1; removed on drop.
#[derive(Debug)]
pub struct Device {
    name: String,
    dir: tempfile::TempDir,
}

impl Device {
    /// Boots a device named `flotilla-device-<prefix>-<pid>-<n>` and waits
    /// until `systemctl is-system-running` says `running` (or `degraded`) and
    /// the system bus socket is there. Panics, with the container's logs and
    /// systemd's view, if it does not come up within a minute.
    pub fn start(name_prefix: &str) -> Self {
        Self::boot(name_prefix, &[])
    }

    /// Like [`Device::start`], with the host's Docker Engine socket at
    /// `/run/docker.sock` in the device (the agent's default Docker host), so
    /// an agent inside converges Container resources on the host's engine.
    pub fn start_with_docker(name_prefix: &str) -> Self {
        Self::boot(
            name_prefix,
            &["-v", "/var/run/docker.sock:/run/docker.sock"],
        )
    }

    fn boot(name_prefix: &str, extra: &[&str]) -> Self {
        require_device_image();
        let name = unique_agent(&format!("flotilla-device-{name_prefix}"));
        let dir = tempfile::Builder::new()
            .prefix("flotilla-device-")
            .tempdir()
            .expect("temp dir for a device");
        for sub in ["dbus", "units", "share"] {
            std::fs::create_dir(dir.path().join(sub)).expect("device host dir");
        }
        let device = Self { name, dir };
        let socket = device.bus_socket();
        assert!(
            socket.as_os_str().len() < 108,
            "bus socket path {} is too long for a unix socket; set TMPDIR to a shorter path",
            socket.display()
        );
        // A killed earlier run (same pid, same counter) may have left one.
        let _ = docker_ok(&["rm", "-f", &device.name]);
        let mount = |host: PathBuf, inside: &str| format!("{}:{inside}", host.display());
        let hostname = hostname_for(&device.name);
        docker(
            &[
                "run",
                "-d",
                "--name",
                &device.name,
                "--label",
                &format!("{LABEL_DEVICE}={name_prefix}"),
                "--hostname",
                &hostname,
                // systemd needs its own cgroup tree and mounts; never share the host's.
                "--cgroupns=private",
                "--cap-add",
                "SYS_ADMIN",
                "--security-opt",
                "seccomp=unconfined",
                "--security-opt",
                "apparmor=unconfined",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                "-e",
                "container=docker",
                "--network",
                "host",
                // Mounted over the /run tmpfs (docker mounts parents first), so the
                // host sees dbus-daemon's socket.
                "-v",
                &mount(device.dir.path().join("dbus"), "/run/dbus"),
                "-v",
                &mount(device.units_dir(), UNITS_DIR_IN_DEVICE),
                "-v",
                &mount(device.share_dir(), SHARE_DIR_IN_DEVICE),
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .chain([DEVICE_IMAGE, "/lib/systemd/systemd"])
            .collect::<Vec<_>>(),
        );
        device.wait_booted();
        device
    }

    fn wait_booted(&self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut last = String::new();
        loop {
            // Exits non-zero until `running`; prints nothing (and fails)
            // until systemd's private socket exists.
            let (_, state) = self.exec_status(&["systemctl", "is-system-running"]);
            if matches!(state.as_str(), "running" | "degraded") && self.bus_socket().exists() {
                return;
            }
            if state == "maintenance" {
                panic!(
                    "device {} booted into emergency mode:\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            if !state.is_empty() {
                last = state;
            }
            let running = docker_ok(&["exec", &self.name, "true"]);
            if !running || Instant::now() > deadline {
                panic!(
                    "device {} did not boot ({}; last state {last:?}, bus socket {}):\n{}",
                    self.name,
                    if running {
                        "timed out"
                    } else {
                        "container exited"
                    },
                    if self.bus_socket().exists() {
                        "present"
                    } else {
                        "missing"
                    },
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The container name (also its hostname, cut to 63 characters).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `args` in the device (as root); returns stdout, trimmed. Panics
    /// with stdout and stderr if it exits non-zero.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = self.exec_output(args);
        assert!(
            out.status.success(),
            "in device {}: {args:?} failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `args` in the device; returns its exit code (-1 if killed by a
    /// signal) and stdout, trimmed. For commands whose failure is an answer,
    /// e.g. `systemctl is-active`.
    pub fn exec_status(&self, args: &[&str]) -> (i32, String) {
        let out = self.exec_output(args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }

    fn exec_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .args(["exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run docker exec {args:?}: {e}"))
    }

    /// `systemctl args…` in the device, like [`Self::exec`] (panics when it
    /// exits non-zero; use [`Self::exec_status`] for `is-active` and friends).
    pub fn systemctl(&self, args: &[&str]) -> String {
        let mut argv = vec!["systemctl"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// The journal of `unit` in the device (for assertion messages).
    pub fn journal(&self, unit: &str) -> String {
        self.exec_status(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-u",
            unit,
        ])
        .1
    }

    /// The device's system bus for a client on the host:
    /// `unix:path=<dir>/dbus/system_bus_socket`. Connect as root (uid 0 is
    /// root in the device too; there is no user namespace).
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_socket().display())
    }

    /// The host side of the bus socket [`Self::bus_address`] names.
    pub fn bus_socket(&self) -> PathBuf {
        self.dir.path().join("dbus").join("system_bus_socket")
    }

    /// Host directory that is [`UNITS_DIR_IN_DEVICE`] in the device; run
    /// `daemon-reload` (or D-Bus `Reload`) after changing it.
    pub fn units_dir(&self) -> PathBuf {
        self.dir.path().join("units")
    }

    /// Host directory that is [`SHARE_DIR_IN_DEVICE`] (`/flotilla`) in the device.
    pub fn share_dir(&self) -> PathBuf {
        self.dir.path().join("share")
    }

    /// `docker cp <host_path> <device>:<container_path>` (a file or a directory).
    pub fn copy_in(&self, host_path: &Path, container_path: &str) {
        let host = host_path.to_str().expect("UTF-8 host path");
        docker(&["cp", host, &format!("{}:{container_path}", self.name)]);
    }

    /// `docker logs`, the failed units and the tail of the journal.
    pub fn diagnostics(&self) -> String {
        let logs = Command::new("docker")
            .args(["logs", "--tail", "50", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| e.to_string());
        let failed = self
            .exec_status(&["systemctl", "--failed", "--no-pager", "--no-legend"])
            .1;
        let journal = self
            .exec_status(&["journalctl", "--no-pager", "-b", "-n", "30"])
            .1;
        format!(
            "--- docker logs {}:\n{logs}\n--- failed units:\n{failed}\n--- journal:\n{journal}",
            self.name
        )
    }
}

/// A valid hostname (the container name, cut to 63 characters); with
/// `--network host` the device would otherwise take the host's.
fn hostname_for(name: &str) -> String {
    let mut h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    while h.ends_with('-') {
        h.pop();
    }
    h
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = docker_ok(&["rm", "-f", &self.name]);
        // The temp dir goes next; dbus-daemon's files in it belong to root
        // or messagebus, both removable by root.
    }
}

#[cfg(test)]
mod tests {
    use super::hostname_for;

    #[test]
    fn hostnames_are_valid() {
        assert_eq!(
            hostname_for("flotilla-device-a_b-12-0"),
            "flotilla-device-a-b-12-0"
        );
        let long = hostname_for(&format!("flotilla-device-{}-1-0", "x".repeat(70)));
        assert_eq!(long.len(), 63);
        assert_eq!(
            hostname_for(&format!("{}--", "y".repeat(62))),
            "y".repeat(62)
        );
    }
}
