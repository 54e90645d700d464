//! The packages as an administrator meets them: the .deb installs into a minimal Debian
//! root, enrolls there against a server on this host's loopback and runs a job; remove
//! and purge leave what they promise; the .rpm carries the same files and equivalent
//! scripts; the systemd units pass `systemd-analyze verify`.
//!
//! The packages come from `scripts/package.sh --profile dev` (the real packaging path;
//! the `dist` profile's LTO would cost minutes). The Debian root is made by `debootstrap
//! --variant=minbase` once and cached in [`CACHE_DIR`] (about a minute cold, 206 MB);
//! each run works on a copy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use herald_tests::{is_root, wait_until, TempDir, TestServer, DEADLINE};

/// Where the minimal Debian roots are kept between runs (outside the clone).
const CACHE_DIR: &str = "/var/cache/herald-tests";
/// The Debian release of the test root.
const SUITE: &str = "bookworm";
/// The packages' version (the workspace's).
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The packages built once per test binary.
struct Packages {
    agent_deb: PathBuf,
    server_deb: PathBuf,
    agent_rpm: PathBuf,
    server_rpm: PathBuf,
}

fn packages() -> &'static Packages {
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
        }
    })
}

/// Runs `command`, panicking with its output when it fails.
fn run_ok(command: &mut Command) -> Output {
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

fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Debian mirror apt is configured with (deb822 `URIs:` or one-line `deb URL`),
/// the first one whose path ends in `/debian`.
fn apt_mirror() -> Option<String> {
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
fn apt_proxy() -> Option<String> {
    let output = Command::new("apt-config")
        .args(["shell", "PROXY", "Acquire::http::Proxy"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let value = text.trim().strip_prefix("PROXY=")?.trim_matches('\'');
    (!value.is_empty()).then(|| value.to_string())
}

/// The cached minimal Debian root, made when absent (into a scratch name, renamed when
/// complete, so an interrupted build is never taken for a root).
fn debootstrap_root() -> PathBuf {
    let cache = Path::new(CACHE_DIR).join(format!("debootstrap-{SUITE}"));
    if cache.join("usr/bin/dpkg").exists() {
        return cache;
    }
    std::fs::create_dir_all(CACHE_DIR).expect("create the debootstrap cache directory");
    let partial = Path::new(CACHE_DIR).join(format!(
        "debootstrap-{SUITE}.partial-{}",
        std::process::id()
    ));
    let started = std::time::Instant::now();
    let mut debootstrap = Command::new("debootstrap");
    debootstrap.args(["--variant=minbase", SUITE]).arg(&partial);
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
        "debootstrap {SUITE}: {} s (cached in {})",
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
struct Chroot {
    dir: TempDir,
    root: PathBuf,
    proc_mounted: bool,
    agent: Option<Child>,
}

impl Chroot {
    fn new(name: &str) -> Chroot {
        let base = debootstrap_root();
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
    fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// `chroot ROOT args...` with a clean environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("chroot");
        command
            .arg(&self.root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
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
fn exec_start(unit: &str) -> (Vec<(String, String)>, Vec<String>) {
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

#[test]
fn deb_installs_enrolls_and_runs_a_job() {
    if !is_root() {
        println!("skipped: needs root");
        return;
    }
    for tool in ["debootstrap", "chroot", "dpkg-deb", "mount"] {
        assert!(
            has_command(tool),
            "{tool} is missing: install debootstrap (scripts/test.sh does, as root)"
        );
    }
    let packages = packages();
    let server = TestServer::start("deb-install");
    let mut chroot = Chroot::new("deb-install");

    // The administrator's token, dropped before installing; a marker only this root has.
    std::fs::create_dir_all(chroot.path("/etc/herald")).unwrap();
    std::fs::write(chroot.path("/etc/herald/enroll.token"), server.token(&[])).unwrap();
    let marker = hex::encode(herald_io::random_bytes::<8>());
    std::fs::write(chroot.path("/etc/herald-test-marker"), &marker).unwrap();
    std::fs::copy(&packages.agent_deb, chroot.path("/tmp/herald-agent.deb")).unwrap();

    let install = chroot.run(&["dpkg", "-i", "/tmp/herald-agent.deb"]);
    let said = String::from_utf8_lossy(&install.stdout);
    assert!(
        said.contains("enrolled as "),
        "postinst did not enroll:\n{said}"
    );
    assert!(
        !chroot.path("/etc/herald/enroll.token").exists(),
        "the token file outlived enrollment"
    );
    let state = chroot.path("/var/lib/herald-agent");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "state directory mode");
    for file in ["identity.key", "identity.pem", "agent.toml"] {
        assert!(state.join(file).exists(), "{file} missing after enrollment");
    }
    let identity = std::fs::read(state.join("identity.key")).unwrap();

    // As systemd would start it (there is none in the root): the unit's ExecStart with
    // its Environment=, inside the root.
    let unit = std::fs::read_to_string(chroot.path("/usr/lib/systemd/system/herald-agent.service"))
        .expect("the unit is installed");
    let (env, exec) = exec_start(&unit);
    assert_eq!(exec, ["/usr/bin/herald-agent", "run"]);
    let log = chroot.dir.path().join("agent.log");
    let mut command = chroot.command(&exec.iter().map(String::as_str).collect::<Vec<_>>());
    command
        .envs(env)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap());
    command.stderr(std::fs::File::options().append(true).open(&log).unwrap());
    chroot.agent = Some(command.spawn().expect("start the installed agent"));

    let agent_id = {
        let text = std::fs::read_to_string(state.join("agent.toml")).unwrap();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("agent_id = "))
            .expect("agent_id in agent.toml")
            .trim_matches('"')
            .to_string();
        line
    };
    wait_until("the installed agent to come online", DEADLINE, || {
        let agents = server.json(&["agents", "list"]);
        agents
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["id"] == agent_id.as_str() && a["online"] == true)
            .then_some(())
    });
    let ids = server.run_job("all", &[], &["/bin/cat", "/etc/herald-test-marker"]);
    assert_eq!(ids.len(), 1, "one agent, one job");
    let job = server.wait_job_state(ids[0], "succeeded", DEADLINE);
    assert_eq!(
        job["stdout"],
        marker.as_str(),
        "the job ran inside the root"
    );

    // Stop it as systemd would (SIGTERM), then remove: identity, state and the edited
    // conffile stay.
    let mut agent = chroot.agent.take().expect("agent started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("the agent to stop on SIGTERM", DEADLINE, || {
        agent.try_wait().unwrap()
    });
    let conffile = chroot.path("/etc/herald/agent.toml");
    let mut edited = std::fs::read_to_string(&conffile).expect("conffile installed");
    edited.push_str("\n[policy]\nallow_install = false\n");
    std::fs::write(&conffile, &edited).unwrap();

    chroot.run(&["dpkg", "--remove", "herald-agent"]);
    assert!(
        !chroot.path("/usr/bin/herald-agent").exists(),
        "binary kept"
    );
    assert!(
        !chroot
            .path("/usr/lib/systemd/system/herald-agent.service")
            .exists(),
        "unit kept"
    );
    assert_eq!(
        std::fs::read(state.join("identity.key")).unwrap(),
        identity,
        "remove must keep the identity"
    );
    assert!(
        state.join("agent.toml").exists(),
        "remove must keep the state"
    );
    assert_eq!(
        std::fs::read_to_string(&conffile).unwrap(),
        edited,
        "remove must keep the edited conffile"
    );

    // Reinstalling is the same agent (no token: nothing to enroll), and the conffile
    // keeps the owner's edit.
    let again = chroot.run(&["dpkg", "-i", "/tmp/herald-agent.deb"]);
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("enrolled as "),
        "reinstall enrolled again"
    );
    assert_eq!(std::fs::read(state.join("identity.key")).unwrap(), identity);
    assert_eq!(std::fs::read_to_string(&conffile).unwrap(), edited);

    // Purge: identity, state and configuration go.
    chroot.run(&["dpkg", "--purge", "herald-agent"]);
    assert!(!state.exists(), "purge must remove the state directory");
    assert!(!conffile.exists(), "purge must remove the conffile");
    let status = chroot
        .command(&["dpkg", "-s", "herald-agent"])
        .output()
        .unwrap();
    assert!(!status.status.success(), "still known to dpkg after purge");
}

/// Files of a .deb (`dpkg-deb -c`), directories left out.
fn deb_files(deb: &Path) -> Vec<String> {
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    let mut files: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    files.sort();
    files
}

/// Files of an .rpm (`rpm -qlp`).
fn rpm_files(rpm: &Path) -> Vec<String> {
    let listing = run_ok(Command::new("rpm").arg("-qlp").arg(rpm));
    let mut files: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    files.sort();
    files
}

/// The lines of a script that act (commands, not comments, `echo`s or `case` syntax),
/// for comparing a deb maintainer script with its rpm twin.
fn actions(script: &str) -> Vec<String> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('#')
                && !l.starts_with("echo ")
                && (l.contains("herald")
                    || l.contains("systemctl")
                    || l.starts_with("rm ")
                    || l.starts_with("install "))
        })
        .map(str::to_string)
        .collect()
}

/// `rpm -qp --scripts` split by scriptlet (`postinstall`, `preuninstall`, ...).
fn rpm_scriptlets(rpm: &Path) -> std::collections::HashMap<String, String> {
    let out = run_ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(rpm));
    let mut scripts = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line
            .strip_suffix(" scriptlet:")
            .or_else(|| line.split_once(" scriptlet (using ").map(|(name, _)| name))
        {
            current = Some(name.to_string());
            scripts.insert(name.to_string(), String::new());
        } else if let Some(name) = &current {
            let script = scripts.get_mut(name).expect("inserted above");
            script.push_str(line);
            script.push('\n');
        }
    }
    scripts
}

#[test]
fn rpm_has_the_same_files_and_scripts() {
    for tool in ["rpm", "dpkg-deb"] {
        if !has_command(tool) {
            println!("skipped: {tool} is not installed (scripts/test.sh installs it as root)");
            return;
        }
    }
    let packages = packages();
    // Debian's copyright file is its own; everything else matches.
    for (deb, rpm, name) in [
        (&packages.agent_deb, &packages.agent_rpm, "herald-agent"),
        (&packages.server_deb, &packages.server_rpm, "herald-server"),
    ] {
        let deb_list: Vec<String> = deb_files(deb)
            .into_iter()
            .filter(|f| *f != format!("/usr/share/doc/{name}/copyright"))
            .collect();
        assert_eq!(deb_list, rpm_files(rpm), "{name}: files differ");

        let control = TempDir::new(&format!("deb-control-{name}"));
        run_ok(
            Command::new("dpkg-deb")
                .arg("-e")
                .arg(deb)
                .arg(control.path().join("DEBIAN")),
        );
        let deb_script = |file: &str| {
            std::fs::read_to_string(control.path().join("DEBIAN").join(file))
                .unwrap_or_else(|e| panic!("{name}: no {file} in the .deb: {e}"))
        };
        let rpm_scripts = rpm_scriptlets(rpm);
        let rpm_script = |which: &str| {
            rpm_scripts
                .get(which)
                .unwrap_or_else(|| panic!("{name}: no {which} scriptlet in {rpm_scripts:?}"))
                .clone()
        };
        // Install: the same steps. Removal: both stop and disable the service.
        assert_eq!(
            actions(&deb_script("postinst")),
            actions(&rpm_script("postinstall")),
            "{name}: postinst and %post differ"
        );
        let stop = format!("systemctl stop {name}.service || true");
        assert!(
            actions(&deb_script("prerm")).contains(&stop),
            "{name}: prerm"
        );
        assert!(
            actions(&rpm_script("preuninstall")).contains(&stop),
            "{name}: %preun"
        );
        assert!(rpm_scripts.contains_key("postuninstall"), "{name}: %postun");

        // Configuration files: conffiles in the .deb, %config(noreplace) in the .rpm.
        let conffiles =
            std::fs::read_to_string(control.path().join("DEBIAN/conffiles")).unwrap_or_default();
        let mut conffiles: Vec<&str> = conffiles.lines().collect();
        conffiles.sort();
        let config = run_ok(Command::new("rpm").args(["-qp", "--configfiles"]).arg(rpm));
        let config = String::from_utf8_lossy(&config.stdout);
        let mut config: Vec<&str> = config.lines().collect();
        config.sort();
        assert_eq!(conffiles, config, "{name}: configuration files differ");
    }
    let agent_config = run_ok(
        Command::new("rpm")
            .args(["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"])
            .arg(&packages.agent_rpm),
    );
    let agent_config = String::from_utf8_lossy(&agent_config.stdout);
    assert!(
        agent_config
            .lines()
            .any(|l| l.starts_with("/etc/herald/agent.toml ")
                && l.contains('c')
                && l.contains('n')),
        "/etc/herald/agent.toml is not %config(noreplace):\n{agent_config}"
    );
    // Only the deb purges the agent's state (rpm has no purge).
    let control = TempDir::new("deb-control-agent-purge");
    run_ok(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&packages.agent_deb)
            .arg(control.path().join("DEBIAN")),
    );
    let postrm = std::fs::read_to_string(control.path().join("DEBIAN/postrm")).unwrap();
    assert!(
        actions(&postrm).contains(&"rm -rf /var/lib/herald-agent /run/herald-agent".to_string())
    );
}

#[test]
fn systemd_units_pass_verification() {
    if !has_command("systemd-analyze") {
        println!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = TempDir::new("units-verify");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/systemd");
    for name in ["herald-agent", "herald-server"] {
        let text = std::fs::read_to_string(units.join(format!("{name}.service"))).unwrap();
        for key in ["Type=notify", "WatchdogSec=30s", "Restart=always"] {
            assert!(text.lines().any(|l| l == key), "{name}.service lacks {key}");
        }
        // verify checks that ExecStart's program exists: point it at the built binary.
        let binary = herald_tests::bin(name);
        let text = text.replace(&format!("/usr/bin/{name}"), &binary.display().to_string());
        let unit = dir.path().join(format!("{name}.service"));
        std::fs::write(&unit, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("run systemd-analyze");
        let complaints = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && complaints.trim().is_empty(),
            "{name}.service: systemd-analyze verify: {}\n{complaints}",
            out.status
        );
    }
}

/// Reads `sd_notify` datagrams until one equals `want` (each may carry several lines).
fn await_notice(socket: &std::os::unix::net::UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < DEADLINE {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let hit = text.lines().any(|l| l == want);
                seen.push(text);
                if hit {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no {want} within {DEADLINE:?}; got {seen:?}");
}

/// What the unit's `Type=notify` and `WatchdogSec=` rely on: started as systemd starts
/// it (NOTIFY_SOCKET, WATCHDOG_USEC), the agent says READY=1, pings WATCHDOG=1 from its
/// reconnect loop while the server is down and from the connection's driver loop once
/// connected, and says STOPPING=1 on SIGTERM.
#[test]
fn agent_notifies_systemd_ready_watchdog_and_stopping() {
    let mut server = TestServer::start("sd-notify");
    let agent = herald_tests::TestAgent::enroll(&server, "notified", &[]);
    server.kill();
    let dir = TempDir::new("sd-notify-socket");
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let log = dir.path().join("agent.log");
    let mut child = herald_tests::spawn_copied_binary(
        Command::new(herald_tests::bin("herald-agent"))
            .arg("--state-dir")
            .arg(&agent.state_dir)
            .arg("run")
            .env("NOTIFY_SOCKET", &path)
            // A ping every 0.5 s.
            .env("WATCHDOG_USEC", "1500000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let mut seen = Vec::new();
    await_notice(&socket, "READY=1", &mut seen);
    // Offline: the reconnect loop pings.
    for _ in 0..3 {
        await_notice(&socket, "WATCHDOG=1", &mut seen);
    }
    assert!(
        agent.status()["connected"] == false,
        "no server, yet connected"
    );
    // Connected: the driver loop pings.
    server.spawn();
    agent.wait_online(&server);
    for _ in 0..3 {
        await_notice(&socket, "WATCHDOG=1", &mut seen);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    await_notice(&socket, "STOPPING=1", &mut seen);
    wait_until("the agent to exit", DEADLINE, || child.try_wait().unwrap());
}
