//! Debian roots for the package and installer tests: `debootstrap --variant=minbase`
//! (optionally with a few packages) made once and cached in [`CACHE_DIR`] (about a minute
//! cold, 206 MB), each test working on a copy with /proc mounted; and the packages built
//! by `scripts/package.sh --profile dev` (the real packaging path; the `dist` profile's
//! LTO would cost minutes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use crate::TempDir;

/// Where the minimal Debian roots are kept between runs (outside the clone).
pub const CACHE_DIR: &str = "/var/cache/herald-tests";
/// The Debian release of the test roots.
pub const SUITE: &str = "bookworm";
/// The packages' version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A cached Debian root: its name under [`CACHE_DIR`] and the packages added to
/// debootstrap's minbase.
#[derive(Debug, Clone, Copy)]
pub struct DebianRoot {
    /// Directory name under [`CACHE_DIR`].
    pub name: &'static str,
    /// `--include=` packages.
    pub include: &'static [&'static str],
}

/// debootstrap's minbase alone.
pub const MINBASE: DebianRoot = DebianRoot {
    name: "debootstrap-bookworm",
    include: &[],
};

/// minbase with curl and sudo, for the one-line install (`curl ... | sudo sh`).
pub const WITH_CURL: DebianRoot = DebianRoot {
    name: "debootstrap-bookworm-curl",
    include: &["curl", "ca-certificates", "sudo"],
};

/// The packages built once per test binary.
#[derive(Debug)]
pub struct Packages {
    /// herald-agent .deb.
    pub agent_deb: PathBuf,
    /// herald-server .deb.
    pub server_deb: PathBuf,
    /// herald-agent .rpm.
    pub agent_rpm: PathBuf,
    /// herald-server .rpm.
    pub server_rpm: PathBuf,
    /// herald-agent tarball.
    pub agent_tar: PathBuf,
}

/// The packages from `scripts/package.sh --profile dev`, built once per test binary.
pub fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Packages> = OnceLock::new();
    PACKAGES.get_or_init(|| {
        // target/debug/deps/<test> -> target
        let exe = std::env::current_exe().expect("test executable path");
        let target = exe
            .ancestors()
            .nth(3)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let out = target.join("packages-test");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut command = Command::new("bash");
        command
            .arg(workspace.join("scripts/package.sh"))
            .args(["--profile", "dev", "--out"])
            .arg(&out)
            .env("CARGO_TARGET_DIR", &target);
        // As in herald_tests::bin_dir: the runner's CARGO_* variables would rebuild.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_") && key != "CARGO_HOME" {
                command.env_remove(key.as_ref());
            }
        }
        command.env("CARGO_TARGET_DIR", &target);
        let output = command.output().expect("run scripts/package.sh");
        assert!(
            output.status.success(),
            "scripts/package.sh failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let made = String::from_utf8_lossy(&output.stdout);
        let find = |suffix: &str| {
            made.lines()
                .map(PathBuf::from)
                .find(|p| p.to_string_lossy().ends_with(suffix) && p.exists())
                .unwrap_or_else(|| panic!("package.sh made no *{suffix}:\n{made}"))
        };
        let deb_arch = String::from_utf8_lossy(
            &run_ok(Command::new("dpkg").arg("--print-architecture")).stdout,
        )
        .trim()
        .to_string();
        let rpm_arch = std::env::consts::ARCH;
        Packages {
            agent_deb: find(&format!("herald-agent_{VERSION}_{deb_arch}.deb")),
            server_deb: find(&format!("herald-server_{VERSION}_{deb_arch}.deb")),
            agent_rpm: find(&format!("herald-agent-{VERSION}-1.{rpm_arch}.rpm")),
            server_rpm: find(&format!("herald-server-{VERSION}-1.{rpm_arch}.rpm")),
            agent_tar: find(&format!("herald-agent-{VERSION}-{rpm_arch}.tar.gz")),
        }
    })
}

/// Runs `command`, panicking with its output when it fails.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Whether `name` is on the PATH.
pub fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Debian mirror apt is configured with (deb822 `URIs:` or one-line `deb URL`),
/// the first one whose path ends in `/debian`.
pub fn apt_mirror() -> Option<String> {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let name = path.to_string_lossy().into_owned();
            if name.ends_with(".sources") || name.ends_with(".list") {
                texts.push(std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    texts
        .iter()
        .flat_map(|text| text.lines())
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first() {
                Some(&"URIs:") => words[1..].to_vec(),
                Some(&"deb") => words[1..]
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with('['))
                    .take(1)
                    .collect(),
                _ => Vec::new(),
            }
        })
        .find(|url| url.starts_with("http") && url.trim_end_matches('/').ends_with("/debian"))
        .map(str::to_string)
}

/// The HTTP proxy apt is configured with, if any (`Acquire::http::Proxy`).
pub fn apt_proxy() -> Option<String> {
    let output = Command::new("apt-config")
        .args(["shell", "PROXY", "Acquire::http::Proxy"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let value = text.trim().strip_prefix("PROXY=")?.trim_matches('\'');
    (!value.is_empty()).then(|| value.to_string())
}

/// The cached Debian root, made when absent (into a scratch name, renamed when
/// complete, so an interrupted build is never taken for a root).
pub fn debootstrap_root(kind: DebianRoot) -> PathBuf {
    let cache = Path::new(CACHE_DIR).join(kind.name);
    if cache.join("usr/bin/dpkg").exists() {
        return cache;
    }
    std::fs::create_dir_all(CACHE_DIR).expect("create the debootstrap cache directory");
    let partial =
        Path::new(CACHE_DIR).join(format!("{}.partial-{}", kind.name, std::process::id()));
    let started = std::time::Instant::now();
    let mut debootstrap = Command::new("debootstrap");
    debootstrap.arg("--variant=minbase");
    if !kind.include.is_empty() {
        debootstrap.arg(format!("--include={}", kind.include.join(",")));
    }
    debootstrap.arg(SUITE).arg(&partial);
    // The mirror and proxy apt itself uses, so that the root comes from wherever this
    // machine gets its packages.
    if let Some(mirror) = apt_mirror() {
        debootstrap.arg(mirror);
    }
    if let Some(proxy) = apt_proxy() {
        debootstrap.env("http_proxy", proxy);
    }
    run_ok(&mut debootstrap);
    eprintln!(
        "debootstrap {SUITE} ({}): {} s (cached in {})",
        kind.name,
        started.elapsed().as_secs(),
        cache.display()
    );
    // Another run may have finished first; either root will do.
    if std::fs::rename(&partial, &cache).is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    cache
}

/// A copy of the Debian root with /proc mounted. On drop (also on panic) the agent it
/// started is killed, /proc unmounted and then, and only then, the copy removed (its
/// logs stay in `dir`, which a failing test keeps).
pub struct Chroot {
    /// The test's directory (logs).
    pub dir: TempDir,
    root: PathBuf,
    proc_mounted: bool,
    /// An agent started inside the root, killed on drop.
    pub agent: Option<Child>,
}

impl Chroot {
    /// A fresh copy of the cached root `kind`.
    pub fn new(name: &str, kind: DebianRoot) -> Chroot {
        let base = debootstrap_root(kind);
        let dir = TempDir::new(name);
        let root = std::env::temp_dir().join(format!(
            "herald-root-{name}-{}-{}",
            std::process::id(),
            hex::encode(herald_io::random_bytes::<4>())
        ));
        let mut chroot = Chroot {
            dir,
            root,
            proc_mounted: false,
            agent: None,
        };
        run_ok(Command::new("cp").arg("-a").arg(&base).arg(&chroot.root));
        run_ok(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(chroot.path("/proc")),
        );
        chroot.proc_mounted = true;
        chroot
    }

    /// A path inside the root.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// `chroot ROOT args...` with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("chroot");
        command
            .arg(&self.root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C");
        command
    }

    /// Starts what the unit at `unit` (a path inside the root) runs, as systemd would
    /// (there is none in the root): its `ExecStart=` with its `Environment=`, output to
    /// `agent.log` in the test's directory; killed on drop. Returns the command.
    pub fn start_unit(&mut self, unit: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.path(unit))
            .unwrap_or_else(|e| panic!("the unit {unit} is not installed: {e}"));
        let (env, exec) = exec_start(&text);
        let log = self.dir.path().join("agent.log");
        let mut command = self.command(&exec.iter().map(String::as_str).collect::<Vec<_>>());
        command
            .envs(env)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("create agent.log"));
        command.stderr(
            std::fs::File::options()
                .append(true)
                .open(&log)
                .expect("open agent.log"),
        );
        self.agent = Some(command.spawn().expect("start the installed agent"));
        exec
    }

    /// The id of the agent enrolled in the root (`/var/lib/herald-agent/agent.toml`).
    pub fn agent_id(&self) -> String {
        let text = std::fs::read_to_string(self.path("/var/lib/herald-agent/agent.toml"))
            .expect("the agent is enrolled");
        text.lines()
            .find_map(|l| l.strip_prefix("agent_id = "))
            .expect("agent_id in agent.toml")
            .trim_matches('"')
            .to_string()
    }

    /// [`Chroot::command`] that must succeed.
    pub fn run(&self, args: &[&str]) -> Output {
        run_ok(&mut self.command(args))
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if self.proc_mounted {
            let proc = self.path("/proc");
            let unmount = |lazy: bool| {
                let mut command = Command::new("umount");
                if lazy {
                    command.arg("-l");
                }
                command.arg(&proc).status().is_ok_and(|s| s.success())
            };
            if !unmount(false) && !unmount(true) {
                // Never walk into a live /proc to remove it.
                eprintln!("cannot unmount {}; root left in place", proc.display());
                return;
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `KEY=VALUE` environment and the command of the unit's `ExecStart=`.
pub fn exec_start(unit: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut env = Vec::new();
    let mut exec = Vec::new();
    for line in unit.lines() {
        if let Some(value) = line.strip_prefix("Environment=") {
            let (key, value) = value.split_once('=').expect("Environment=KEY=VALUE");
            env.push((key.to_string(), value.to_string()));
        } else if let Some(value) = line.strip_prefix("ExecStart=") {
            exec = value.split_whitespace().map(str::to_string).collect();
        }
    }
    assert!(!exec.is_empty(), "no ExecStart= in\n{unit}");
    (env, exec)
}
