//! The packages as an administrator meets them: the .deb installs into a minimal Debian
//! root, enrolls there against a server on this host's loopback and runs a job; remove
//! and purge leave what they promise; the .rpm carries the same files and equivalent
//! scripts; the systemd units pass `systemd-analyze verify`.
//!
//! The packages come from `scripts/package.sh --profile dev` and the Debian root from
//! `debootstrap --variant=minbase`, cached (herald_tests::chroot).

use std::path::Path;
use std::process::{Command, Stdio};

use herald_tests::chroot::{has_command, packages, run_ok, Chroot, MINBASE};
use herald_tests::{is_root, wait_until, TempDir, TestServer, DEADLINE};

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
    let mut chroot = Chroot::new("deb-install", MINBASE);

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

    // As systemd would start it (there is none in the root).
    let exec = chroot.start_unit("/usr/lib/systemd/system/herald-agent.service");
    assert_eq!(exec, ["/usr/bin/herald-agent", "run"]);
    let agent_id = chroot.agent_id();
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
