//! The one-line install as a person meets it: the operator publishes the agent's
//! packages as operator-signed `herald-agent` releases (platforms `...-deb`, `-rpm`,
//! `-tar`), `token create --install-command` prints the command, and that exact command,
//! run in a Debian root with curl and sudo against a server on this host's loopback,
//! installs the .deb, enrolls and leaves an agent that runs a job; without dpkg it puts
//! the tarball under /usr/local instead. A package whose bytes changed on the server, a
//! wrong pin, or a token the server refuses leaves nothing installed. `/install.sh` and the
//! package list need no token, and the console's "Link a device" page shows the same
//! kind of command.
//!
//! The chroot tests need root (else they print "skipped: needs root"); the Debian root
//! with curl, ca-certificates and sudo is cached beside the minbase one
//! (herald_tests::chroot::WITH_CURL).

use std::path::Path;
use std::process::Output;

use herald_tests::browser::spki_sha256_base64;
use herald_tests::chroot::{has_command, packages, Chroot, VERSION, WITH_CURL};
use herald_tests::console_client::{between, Console};
use herald_tests::{https_client, is_root, wait_until, TestServer, DEADLINE};

/// The platform the packages are published for (this machine's, as the script finds it).
fn platform() -> String {
    format!("linux-{}", std::env::consts::ARCH)
}

/// Publishes `file` as the operator-signed `herald-agent` release for `format`; returns
/// its SHA-256.
fn publish(server: &TestServer, format: &str, file: &Path) -> String {
    let key = server.data_dir().join("operator.key");
    server.cli_ok(&[
        "package",
        "publish",
        "--quiet",
        "--vendor-key",
        &key.to_string_lossy(),
        "herald-agent",
        VERSION,
        &file.to_string_lossy(),
        "--platform",
        &format!("{}-{format}", platform()),
    ]);
    let releases = server.json(&["package", "list", "herald-agent"]);
    releases
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["platform"] == format!("{}-{format}", platform()).as_str())
        .and_then(|r| r["sha256"].as_str())
        .expect("the published release is listed")
        .to_string()
}

/// Publishes the .deb, .rpm and tarball; returns the .deb's and the tarball's SHA-256.
fn publish_packages(server: &TestServer) -> (String, String) {
    let packages = packages();
    let deb = publish(server, "deb", &packages.agent_deb);
    publish(server, "rpm", &packages.agent_rpm);
    let tar = publish(server, "tar", &packages.agent_tar);
    (deb, tar)
}

/// `token create --install-command`: the token and the command, as printed.
fn install_command(server: &TestServer) -> (String, String) {
    let out = server.cli_ok(&["token", "create", "--install-command"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "a token and a command:\n{out}");
    (lines[0].to_string(), lines[1].to_string())
}

/// Runs `command` with `sh -c` in the root, as a person pastes it into a shell.
fn run_in(chroot: &Chroot, command: &str) -> Output {
    chroot
        .command(&["sh", "-c", command])
        .output()
        .expect("run sh in the root")
}

/// The one-liner on the console's "Link a device" page, as the browser shows it.
fn console_command(page: &str) -> String {
    between(page, r#"<pre id="install-command">"#, "</pre>")
        .unwrap_or_else(|| panic!("no install command on the link page:\n{page}"))
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&#x2f;", "/")
        .replace("&#x3d;", "=")
        .replace("&#x2b;", "+")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Nothing of the agent is in the root: no package, binary, unit or identity.
fn assert_nothing_installed(chroot: &Chroot, said: &str) {
    let status = chroot
        .command(&["dpkg", "-s", "herald-agent"])
        .output()
        .expect("run dpkg -s");
    assert!(!status.status.success(), "dpkg knows herald-agent:\n{said}");
    for path in [
        "/usr/bin/herald-agent",
        "/usr/local/bin/herald-agent",
        "/usr/lib/systemd/system/herald-agent.service",
        "/var/lib/herald-agent/agent.toml",
    ] {
        assert!(!chroot.path(path).exists(), "{path} is there:\n{said}");
    }
}

/// Whether the chroot tests can run here; prints why not.
fn chroot_tests_run() -> bool {
    if !is_root() {
        println!("skipped: needs root");
        return false;
    }
    for tool in ["debootstrap", "chroot", "dpkg-deb", "mount"] {
        assert!(
            has_command(tool),
            "{tool} is missing: install debootstrap (scripts/test.sh does, as root)"
        );
    }
    true
}

#[test]
fn install_script_installs_enrolls_and_runs_a_job() {
    if !chroot_tests_run() {
        return;
    }
    let server = TestServer::start("install-script");
    let deb = publish_packages(&server).0;
    let (token, command) = install_command(&server);
    let pin = format!(
        "sha256//{}",
        spki_sha256_base64(&server.data_dir().join("server.pem"))
    );
    assert!(
        command.starts_with(&format!(
            "curl -fsSk --pinnedpubkey '{pin}' {}/install.sh | sudo sh -s -- {token} deb={deb} rpm=",
            server.https_url()
        )),
        "the command pins server.pem's key and carries the token and hashes: {command}"
    );

    let mut chroot = Chroot::new("install-script", WITH_CURL);
    let marker = hex::encode(herald_io::random_bytes::<8>());
    std::fs::write(chroot.path("/etc/herald-test-marker"), &marker).unwrap();
    let run = run_in(&chroot, &command);
    let said = format!("{}\n{}", text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "the one-liner failed:\n{said}");
    for line in [
        "herald-install: this machine takes the deb package",
        &format!("SHA-256 {deb} as expected"),
        "enrolled as ",
        &format!("herald-install: installed herald-agent {VERSION}"),
    ] {
        assert!(said.contains(line), "{line:?} not said:\n{said}");
    }
    chroot.run(&["dpkg", "-s", "herald-agent"]);

    let exec = chroot.start_unit("/usr/lib/systemd/system/herald-agent.service");
    assert_eq!(exec, ["/usr/bin/herald-agent", "run"]);
    let agent_id = chroot.agent_id();
    wait_until("the installed agent to come online", DEADLINE, || {
        server.agent_online(&agent_id).then_some(())
    });
    let ids = server.run_job("all", &[], &["/bin/cat", "/etc/herald-test-marker"]);
    assert_eq!(ids.len(), 1, "one agent, one job");
    let job = server.wait_job_state(ids[0], "succeeded", DEADLINE);
    assert_eq!(
        job["stdout"],
        marker.as_str(),
        "the job ran inside the root"
    );
}

#[test]
fn install_script_refuses_a_tampered_package() {
    if !chroot_tests_run() {
        return;
    }
    let server = TestServer::start("install-tampered");
    let deb = publish_packages(&server).0;
    let (_, command) = install_command(&server);
    // The server's copy changes after the operator vouched for it (same length).
    let artifact = server.data_dir().join("artifacts").join(&deb);
    let mut bytes = std::fs::read(&artifact).expect("the artifact is stored by hash");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();

    let chroot = Chroot::new("install-tampered", WITH_CURL);
    let run = run_in(&chroot, &command);
    let said = format!("{}\n{}", text(&run.stdout), text(&run.stderr));
    assert!(
        !run.status.success(),
        "a tampered package installed:\n{said}"
    );
    assert!(
        text(&run.stderr).contains(&format!("not {deb} as the command expects: refusing")),
        "no clear refusal:\n{said}"
    );
    assert_nothing_installed(&chroot, &said);
    let tokens = server.json(&["token", "list"]);
    assert_eq!(
        tokens[0]["uses_left"], 1,
        "the token is not spent: {tokens}"
    );
}

#[test]
fn install_script_refuses_a_wrong_pin() {
    if !chroot_tests_run() {
        return;
    }
    let server = TestServer::start("install-wrong-pin");
    publish_packages(&server);
    let (_, command) = install_command(&server);
    let pin = between(&command, "--pinnedpubkey '", "'").expect("a pin in the command");
    // Another key's pin: what a machine in the middle would present.
    let other = {
        use base64::Engine as _;
        let digest: [u8; 32] = herald_io::random_bytes::<32>();
        format!(
            "sha256//{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    let wrong = command.replace(&pin, &other);
    assert_ne!(wrong, command);

    let chroot = Chroot::new("install-wrong-pin", WITH_CURL);
    let run = run_in(&chroot, &wrong);
    let said = format!("{}\n{}", text(&run.stdout), text(&run.stderr));
    assert!(
        text(&run.stderr).contains("public key does not match pinned public key"),
        "curl did not refuse the key:\n{said}"
    );
    assert!(
        !text(&run.stdout).contains("herald-install:"),
        "the script ran:\n{said}"
    );
    assert_nothing_installed(&chroot, &said);
}

/// Also the path of the console's one-liner: the command a signed-in user copies from
/// "Link a device" is the one run here, and the device ends up theirs.
#[test]
fn install_script_installs_the_tarball_where_there_is_no_dpkg_or_rpm() {
    if !chroot_tests_run() {
        return;
    }
    let server = TestServer::start("install-tarball");
    let tar = publish_packages(&server).1;
    let console = Console::new(&server);
    console.register("tess", "tess@example.org", "+821012345679");
    let command = console_command(&console.submit("/devices", "/devices/link", &[]).body);
    let mut chroot = Chroot::new("install-tarball", WITH_CURL);
    // A machine without dpkg (and, like this root, without rpm).
    std::fs::rename(
        chroot.path("/usr/bin/dpkg"),
        chroot.path("/usr/bin/dpkg.hidden"),
    )
    .unwrap();
    let marker = hex::encode(herald_io::random_bytes::<8>());
    std::fs::write(chroot.path("/etc/herald-test-marker"), &marker).unwrap();

    let run = run_in(&chroot, &command);
    let said = format!("{}\n{}", text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "the one-liner failed:\n{said}");
    assert!(
        said.contains("this machine takes the tar package")
            && said.contains(&format!("SHA-256 {tar} as expected")),
        "{said}"
    );
    assert!(chroot.path("/usr/local/bin/herald-agent").exists());
    assert!(chroot.path("/etc/herald/agent.toml").exists());
    let exec = chroot.start_unit("/etc/systemd/system/herald-agent.service");
    assert_eq!(
        exec,
        ["/usr/local/bin/herald-agent", "run"],
        "the unit runs /usr/local"
    );
    let agent_id = chroot.agent_id();
    wait_until("the installed agent to come online", DEADLINE, || {
        server.agent_online(&agent_id).then_some(())
    });
    let ids = server.run_job("all", &[], &["/bin/cat", "/etc/herald-test-marker"]);
    let job = server.wait_job_state(ids[0], "succeeded", DEADLINE);
    assert_eq!(
        job["stdout"],
        marker.as_str(),
        "the job ran inside the root"
    );
    let detail = server.json(&["agents", "show", &agent_id]);
    let name = detail["name"].as_str().expect("the agent's name");
    let devices = console.get("/devices").body;
    assert!(
        devices.contains(name),
        "{name} is listed among tess's devices:\n{devices}"
    );
}

#[test]
fn install_script_undoes_the_install_when_the_token_is_refused() {
    if !chroot_tests_run() {
        return;
    }
    let server = TestServer::start("install-refused");
    publish_packages(&server);
    let (_, command) = install_command(&server);
    let tokens = server.json(&["token", "list"]);
    let id = tokens[0]["id"].as_str().expect("the token is listed");
    server.cli_ok(&["token", "revoke", id]);

    let chroot = Chroot::new("install-refused", WITH_CURL);
    let run = run_in(&chroot, &command);
    let said = format!("{}\n{}", text(&run.stdout), text(&run.stderr));
    assert!(!run.status.success(), "a revoked token installed:\n{said}");
    assert!(
        text(&run.stderr).contains("herald-install: dpkg -i failed")
            && said.contains("removed the deb package this run had installed"),
        "no clear sentence, or nothing undone:\n{said}"
    );
    assert_nothing_installed(&chroot, &said);
    assert!(
        !chroot.path("/var/lib/herald-agent").exists(),
        "the state directory is left:\n{said}"
    );
}

#[test]
fn install_list_and_script_need_no_token_and_the_console_shows_the_command() {
    let server = TestServer::start("install-public");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = https_client();
    let get = |path: &str| {
        runtime.block_on(async {
            let response = client
                .get(format!("{}{path}", server.https_url()))
                .send()
                .await
                .expect("GET");
            let status = response.status().as_u16();
            let kind = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (status, kind, response.text().await.unwrap())
        })
    };

    // /install.sh is the file, with this server's URL and pin filled in.
    let (status, kind, script) = get("/install.sh");
    assert_eq!(status, 200, "{script}");
    assert!(kind.starts_with("text/x-shellscript"), "{kind}");
    let pin = format!(
        "sha256//{}",
        spki_sha256_base64(&server.data_dir().join("server.pem"))
    );
    let file = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/install.sh"),
    )
    .unwrap();
    let expected = file
        .replacen(
            "baked_url=''",
            &format!("baked_url='{}'", server.https_url()),
            1,
        )
        .replacen("baked_pin=''", &format!("baked_pin='{pin}'"), 1);
    assert_eq!(
        script, expected,
        "/install.sh is installers/install.sh, baked"
    );

    // Nothing published: the list is empty and the CLI refuses, making no token.
    let (status, kind, list) = get("/api/v1/install/agent");
    assert_eq!(status, 200, "{list}");
    assert!(kind.starts_with("text/plain"), "{kind}");
    assert!(list.lines().all(|l| l.starts_with('#')), "{list}");
    let refused = server.cli(&["token", "create", "--install-command"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("no operator-signed herald-agent package"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(server.json(&["token", "list"]), serde_json::json!([]));

    // A published package is listed, without a token, by format and platform.
    let package = server.dir.path().join("herald-agent.deb");
    std::fs::write(&package, b"not really a deb").unwrap();
    let sha = publish(&server, "deb", &package);
    let (_, _, list) = get("/api/v1/install/agent");
    let line = list
        .lines()
        .find(|l| !l.starts_with('#'))
        .unwrap_or_else(|| panic!("nothing listed:\n{list}"));
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        fields[..5],
        ["deb", &platform(), VERSION, &sha, "16"],
        "{line}"
    );

    // The console's "Link a device" page shows the command for the user's own token.
    let console = Console::new(&server);
    let _agent = console.register_with_device(
        &server,
        "ann",
        "ann@example.org",
        "+821012345678",
        "anns-pc",
    );
    let link = console.submit("/devices", "/devices/link", &[]);
    let token = between(&link.body, r#"<code id="enroll-token">"#, "</code>").unwrap();
    let shown = console_command(&link.body);
    assert_eq!(
        shown,
        format!(
            "curl -fsSk --pinnedpubkey '{pin}' {}/install.sh | sudo sh -s -- {} deb={sha}",
            server.https_url(),
            token.trim()
        )
    );
}
