//! Network namespaces for tests that move addresses or route between hosts: created with
//! `ip netns`, addressed only from 198.18.0.0/15 (the benchmarking range), joined by veth
//! pairs, and deleted on drop (also when an assertion failed). Needs root.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A command that runs `program` inside network namespace `ns`.
pub fn in_ns(ns: &str, program: &Path) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", ns])
        .arg(program)
        .stdin(Stdio::null());
    command
}

/// Writes `value` to a `/proc/sys/net` file as seen from namespace `ns` (best effort:
/// the file may not exist, e.g. without IPv6).
pub fn ns_sysctl(ns: &str, path: &str, value: &str) {
    let _ = in_ns(ns, Path::new("/bin/sh"))
        .args(["-c", "[ -e \"$0\" ] && echo \"$1\" > \"$0\"", path, value])
        .status();
}

/// Appends a child's output to a log file.
pub fn log_to(path: &Path) -> Stdio {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .expect("open log file")
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Moves the calling thread into namespace `ns`: sockets it opens afterwards live there.
/// Use it on a thread of its own.
pub fn enter(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("open the namespace");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Namespaces this test made; all deleted on drop (which removes their veth ends).
#[derive(Default)]
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Creates namespace `name` (made unique: the pid and a count of the namespaces this
    /// process made are appended, so tests running in parallel threads never share one)
    /// with its loopback up; returns its full name.
    pub fn add(&mut self, name: &str) -> String {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("{name}-{}-{n}", std::process::id());
        ip(&["netns", "add", &ns]);
        self.names.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A veth pair, `a_if` in `a` and `b_if` in `b`, IPv4 only, both up; `a_addr` and
    /// `b_addr` (CIDR) assigned when given. Deleting a primary address keeps the
    /// secondaries of its subnet (so an address can be moved by add-then-delete).
    pub fn veth(
        &self,
        (a, a_if, a_addr): (&str, &str, Option<&str>),
        (b, b_if, b_addr): (&str, &str, Option<&str>),
    ) {
        ip(&[
            "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        for (ns, iface, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            ns_sysctl(
                ns,
                &format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"),
                "1",
            );
            ns_sysctl(
                ns,
                &format!("/proc/sys/net/ipv4/conf/{iface}/promote_secondaries"),
                "1",
            );
            if let Some(addr) = addr {
                ip(&["-n", ns, "addr", "add", addr, "dev", iface]);
            }
            ip(&["-n", ns, "link", "set", iface, "up"]);
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.names.drain(..) {
            let status = Command::new("ip")
                .args(["netns", "del", &ns])
                .stdin(Stdio::null())
                .status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("could not delete network namespace {ns}");
            }
        }
    }
}
