//! Writes the seed corpus, `fuzz/seeds/<target>/<name>`: a few real encoded values per
//! target, in the input layout each target reads (see its module doc and
//! `herald_fuzz::Input`). Deterministic: keys come from fixed seeds and signing is
//! deterministic, so running it again rewrites the same bytes.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::Path;

use herald_fuzz::{Kind, Sample, Seed};
use herald_shared::codec::{self, DEFAULT_FRAME_LIMIT, RESULT_FRAME_LIMIT};
use herald_shared::envelope::{
    Action, Audience, Envelope, InstallSpec, Membership, OpenSpec, OperatorKey, Order, Repeat,
    RunSpec, Statement, VendorKey,
};
use herald_shared::protocol::{
    close, Ack, AgentMsg, Bundle, Enroll, Facts, Hello, JobResult, Progress, ServerMsg, Signal,
    Status, Welcome, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
use herald_shared::release::{Delegation, Format, Release, AGENT_PACKAGE};
use herald_shared::token::{Token, SECRET_LEN};
use serde::Serialize;

/// 2026-03-29T00:30:00Z, half an hour before Central Europe springs forward.
const SPRING_2026: i64 = 1_774_744_200_000;
/// 2026-10-24T23:30:00Z, before Central Europe falls back.
const AUTUMN_2026: i64 = 1_792_884_600_000;
/// 2026-11-01T05:00:00Z, an hour before New York falls back.
const NEW_YORK_AUTUMN_2026: i64 = 1_793_509_200_000;
/// 2026-04-04T14:00:00Z, an hour before Lord Howe Island turns back half an hour.
const LORD_HOWE_AUTUMN_2026: i64 = 1_775_311_200_000;

/// Named inputs for one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let operator = OperatorKey::from_seed([1; 32]);
    let vendor = VendorKey::from_seed([2; 32]);
    let targets: [(&str, Seeds); 8] = [
        ("frame", frame()),
        ("agent_msg", agent_msg()),
        ("server_msg", server_msg(&operator, &vendor)),
        ("envelope", envelope(&operator)),
        ("token", token(&operator)),
        ("release", release(&operator, &vendor)),
        ("schedule", schedule()),
        ("archive_path", archive_path()),
    ];
    let mut total = 0;
    for (target, seeds) in targets {
        let dir = root.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            total += bytes.len();
            fs::write(dir.join(name), bytes)?;
        }
    }
    println!("wrote {total} bytes of seeds under {}", root.display());
    Ok(())
}

fn frame_of<T: Serialize>(value: &T, limit: usize) -> Vec<u8> {
    codec::encode_frame(value, limit).expect("seed values encode")
}

fn bytes_of<T: Serialize>(value: &T) -> Vec<u8> {
    codec::to_bytes(value).expect("seed values encode")
}

fn addresses() -> Vec<IpAddr> {
    vec![
        "192.168.1.20".parse().expect("literal"),
        "fe80::1".parse().expect("literal"),
    ]
}

fn facts() -> Facts {
    Facts {
        hostname: "web-1".into(),
        os: "Debian GNU/Linux 13".into(),
        kernel: "6.12.0".into(),
        arch: "x86_64".into(),
        cpus: 4,
        memory: 8 << 30,
        platform: "linux-x86_64".into(),
    }
}

fn run_order() -> Order {
    Order {
        id: [7; 16],
        audience: Audience::Group("web".into()),
        issued_at: SPRING_2026,
        not_before: SPRING_2026,
        not_after: SPRING_2026 + 3_600_000,
        repeat: Repeat::Once,
        action: Action::Run(RunSpec {
            program: "/usr/bin/uptime".into(),
            args: vec!["-p".into()],
            timeout_ms: 30_000,
            run_as: Some("nobody".into()),
        }),
    }
}

fn tool_release() -> Release {
    Release {
        package: "acme-tool".into(),
        version: "1.2.0".into(),
        platform: "linux-x86_64".into(),
        sha256: [0xab; 32],
        length: 4096,
        format: Format::TarGz,
        install_command: Some(vec!["{dir}/install.sh".into(), "{artifact}".into()]),
        min_agent_version: Some("0.1.0".into()),
        url: Some("https://cdn.example/acme-tool-1.2.0.tar.gz".into()),
        issued_at: SPRING_2026,
        expires_at: SPRING_2026 + 30 * 86_400_000,
    }
}

fn grant(vendor: &VendorKey) -> Delegation {
    Delegation {
        vendor: "acme".into(),
        key: vendor.public(),
        packages: vec!["acme-*".into(), "tools-?".into()],
        issued_at: SPRING_2026,
    }
}

fn frame() -> Seeds {
    let full = Sample::Struct {
        flag: true,
        wide: u128::MAX - 1,
        signed: -5,
        letter: 'é',
        bytes: b"payload".to_vec(),
        maybe: Some("text".into()),
        fixed: [9; 16],
        pair: (500, Some(-70_000)),
        map: BTreeMap::from([("a".into(), 1), ("b".into(), 300)]),
        addresses: addresses(),
        kinds: vec![
            Kind::Plain,
            Kind::Text("x".into()),
            Kind::Numbers {
                small: 3,
                large: 1 << 40,
            },
        ],
    };
    let mut stream = frame_of(&full, DEFAULT_FRAME_LIMIT);
    stream.extend(frame_of(&Sample::Unit, DEFAULT_FRAME_LIMIT));
    stream.extend(frame_of(&Sample::Tuple(1, -2, 3, -4), DEFAULT_FRAME_LIMIT));
    vec![
        (
            "stream-default-limit",
            Seed::new().byte(0).rest(stream).into_bytes(),
        ),
        (
            "stream-64-byte-limit",
            Seed::new()
                .byte(2)
                .rest(frame_of(&Sample::Newtype("short".into()), 64))
                .into_bytes(),
        ),
        (
            "header-over-limit",
            Seed::new().byte(3).rest([0, 0, 1, 0, 1, 2, 3]).into_bytes(),
        ),
        (
            "encode-arbitrary",
            Seed::new()
                .byte(0x80)
                .rest((0u8..=255).step_by(3).collect::<Vec<_>>())
                .into_bytes(),
        ),
    ]
}

fn agent_msg() -> Seeds {
    let control = [
        AgentMsg::Hello(Hello {
            protocol: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
            agent_version: "0.1.0".into(),
            facts: facts(),
            addresses: addresses(),
        }),
        AgentMsg::Ack {
            job_id: 41,
            ack: Ack::Accepted,
        },
        AgentMsg::Ack {
            job_id: 42,
            ack: Ack::Refused("refused by local policy: run is disabled".into()),
        },
        AgentMsg::Ack {
            job_id: 43,
            ack: Ack::Duplicate,
        },
        AgentMsg::Started {
            job_id: 41,
            at: SPRING_2026,
        },
        AgentMsg::Addresses(addresses()),
        AgentMsg::Progress {
            job_id: 44,
            progress: Progress::Downloading { percent: 40 },
        },
        AgentMsg::Progress {
            job_id: 44,
            progress: Progress::Restarting,
        },
    ];
    let enroll = AgentMsg::Enroll(Enroll {
        protocol: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
        secret: vec![5; SECRET_LEN],
        name: "web-1".into(),
        facts: facts(),
    });
    let result = AgentMsg::Result(JobResult {
        job_id: 41,
        attempt: 1,
        status: Status::Failed,
        exit_code: Some(2),
        signal: None,
        stdout: b"up 3 days\n".to_vec(),
        stderr: b"warning\n".to_vec(),
        stdout_truncated: false,
        stderr_truncated: true,
        started_at: SPRING_2026,
        finished_at: SPRING_2026 + 1_500,
        error: None,
    });
    let stream: Vec<u8> = control
        .iter()
        .flat_map(|m| frame_of(m, DEFAULT_FRAME_LIMIT))
        .collect();
    vec![
        (
            "control-hello-then-all",
            Seed::new().byte(0).rest(stream).into_bytes(),
        ),
        (
            "control-enroll",
            Seed::new()
                .byte(0)
                .rest(frame_of(&enroll, DEFAULT_FRAME_LIMIT))
                .into_bytes(),
        ),
        (
            "result-stream",
            Seed::new()
                .byte(1)
                .rest(frame_of(&result, RESULT_FRAME_LIMIT))
                .into_bytes(),
        ),
    ]
}

fn server_msg(operator: &OperatorKey, vendor: &VendorKey) -> Seeds {
    let membership = operator
        .sign(&Statement::Membership(Membership {
            agent_id: "0123456789abcdef0123".into(),
            groups: vec!["web".into(), "eu".into()],
            issued_at: SPRING_2026,
        }))
        .expect("seed statements sign");
    let order = operator
        .sign(&Statement::Order(run_order()))
        .expect("seed statements sign");
    let install = operator
        .sign(&Statement::Order(Order {
            action: Action::Install(InstallSpec {
                package: "acme-tool".into(),
                version: None,
                timeout_ms: 600_000,
            }),
            ..run_order()
        }))
        .expect("seed statements sign");
    let messages = [
        ServerMsg::Welcome(Welcome {
            server_time: SPRING_2026,
            agent_id: "0123456789abcdef0123".into(),
            membership: Some(membership.clone()),
            address_check_ms: 60_000,
        }),
        ServerMsg::Signal(Signal {
            job_id: 41,
            envelope: order,
            bundle: None,
            ticket: Some("t-1".into()),
        }),
        ServerMsg::Signal(Signal {
            job_id: 42,
            envelope: install,
            bundle: Some(Bundle {
                release: vendor
                    .sign(&Statement::Release(tool_release()))
                    .expect("seed statements sign"),
                delegation: Some(
                    operator
                        .sign(&Statement::Delegation(grant(vendor)))
                        .expect("seed statements sign"),
                ),
                url: "https://herald.example:8443/artifacts/42".into(),
            }),
            ticket: None,
        }),
        ServerMsg::ResultStored {
            job_id: 41,
            attempt: 1,
        },
        ServerMsg::Membership(membership),
    ];
    let stream: Vec<u8> = messages
        .iter()
        .flat_map(|m| frame_of(m, DEFAULT_FRAME_LIMIT))
        .collect();
    let enrolled = [
        ServerMsg::Enrolled {
            agent_id: "0123456789abcdef0123".into(),
        },
        ServerMsg::Refused("protocol 2.0 is not supported by this server (1.0)".into()),
    ];
    let reason = close::shutdown_reason(
        std::time::Duration::from_millis(3_000)..std::time::Duration::from_millis(36_333),
    );
    vec![
        (
            "control-welcome-then-all",
            Seed::new().byte(0).rest(stream).into_bytes(),
        ),
        (
            "control-enrolled-refused",
            Seed::new()
                .byte(0)
                .rest(
                    enrolled
                        .iter()
                        .flat_map(|m| frame_of(m, DEFAULT_FRAME_LIMIT))
                        .collect::<Vec<_>>(),
                )
                .into_bytes(),
        ),
        (
            "close-reason",
            Seed::new().byte(1).rest(reason).into_bytes(),
        ),
    ]
}

/// Mode 1 of the envelope target: agent id, groups, now, history, statement.
fn order_seed(order: Order, now: i64, last_run: Option<i64>) -> Vec<u8> {
    let seed = Seed::new()
        .byte(1)
        .part("0123456789abcdef0123")
        .part("web,eu")
        .i64(now);
    let seed = match last_run {
        None => seed.byte(0),
        Some(last) => seed.byte(1).i64(last),
    };
    seed.rest(bytes_of(&Statement::Order(order))).into_bytes()
}

fn envelope(operator: &OperatorKey) -> Seeds {
    let signed = operator
        .sign(&Statement::Order(run_order()))
        .expect("seed statements sign");
    let membership = operator
        .sign(&Statement::Membership(Membership {
            agent_id: "0123456789abcdef0123".into(),
            groups: vec!["web".into()],
            issued_at: SPRING_2026,
        }))
        .expect("seed statements sign");
    let standing = Order {
        audience: Audience::All,
        repeat: Repeat::Standing {
            min_interval_ms: 600_000,
        },
        action: Action::Install(InstallSpec {
            package: "acme-tool".into(),
            version: Some("1.2.0".into()),
            timeout_ms: 600_000,
        }),
        ..run_order()
    };
    let open = Order {
        audience: Audience::Agent("0123456789abcdef0123".into()),
        action: Action::Open(OpenSpec {
            url: "https://herald.example/service/checkin?x=1".into(),
            timeout_ms: 300_000,
        }),
        ..run_order()
    };
    let revert = Order {
        action: Action::Revert {
            package: "acme-tool".into(),
        },
        ..run_order()
    };
    let text = |s: &str| Seed::new().byte(2).part(s).into_bytes();
    vec![
        (
            "envelope-order",
            Seed::new().byte(0).rest(bytes_of(&signed)).into_bytes(),
        ),
        (
            "envelope-membership",
            Seed::new().byte(0).rest(bytes_of(&membership)).into_bytes(),
        ),
        (
            "order-run-group",
            order_seed(run_order(), SPRING_2026 + 60_000, None),
        ),
        (
            "order-standing-install",
            order_seed(standing, SPRING_2026 + 60_000, Some(SPRING_2026)),
        ),
        ("order-open-agent", order_seed(open, SPRING_2026, None)),
        (
            "order-revert-replayed",
            order_seed(revert, SPRING_2026, Some(SPRING_2026 - 1)),
        ),
        ("target-agent", text("agent:web-1")),
        ("target-group", text("group:web")),
        ("public-key-hex", text(&operator.public().to_hex())),
        (
            "url-https",
            text("https://herald.example:8443/service/x?a=b#top"),
        ),
        (
            "url-http-loopback",
            text("http://127.0.0.1:8080/service/checkin"),
        ),
        ("url-http-ipv6-loopback", text("http://[::1]:9/x")),
    ]
}

fn token(operator: &OperatorKey) -> Seeds {
    let token = Token {
        server: "herald.example:4433".into(),
        ca_fingerprint: [3; 32],
        operator_keys: vec![operator.public()],
        groups: vec!["web".into(), "eu".into()],
        secret: [5; SECRET_LEN],
    };
    let text = token.encode();
    vec![
        ("pasted", Seed::new().byte(0).rest(&text).into_bytes()),
        (
            "pasted-with-newline",
            Seed::new().byte(0).rest(format!("  {text}\n")).into_bytes(),
        ),
        (
            "decoded-body",
            Seed::new().byte(1).rest(bytes_of(&token)).into_bytes(),
        ),
    ]
}

/// Mode 1 of the release target: flags, the agent's side, release, delegation.
fn signed_release_seed(flags: u8, release: &Release, grant: &Delegation) -> Vec<u8> {
    Seed::new()
        .byte(1)
        .byte(flags)
        .part("acme-other")
        .part("linux-aarch64")
        .part("1.2.0")
        .part("0.2.0")
        .part("1.1.0")
        .part("1.1.0")
        .i64(SPRING_2026 + 86_400_000)
        .part(bytes_of(release))
        .rest(bytes_of(grant))
        .into_bytes()
}

fn release(operator: &OperatorKey, vendor: &VendorKey) -> Seeds {
    let signed = vendor
        .sign(&Statement::Release(tool_release()))
        .expect("seed statements sign");
    let delegation = operator
        .sign(&Statement::Delegation(grant(vendor)))
        .expect("seed statements sign");
    let pair: (Envelope, Option<Envelope>) = (signed, Some(delegation));
    let agent = Release {
        package: AGENT_PACKAGE.into(),
        version: "0.2.0".into(),
        format: Format::File {
            name: "herald-agent".into(),
        },
        install_command: None,
        min_agent_version: None,
        url: None,
        ..tool_release()
    };
    vec![
        (
            "bundle-vendor",
            Seed::new().byte(0).rest(bytes_of(&pair)).into_bytes(),
        ),
        (
            "signed-by-operator",
            signed_release_seed(0, &tool_release(), &grant(vendor)),
        ),
        (
            "signed-by-vendor",
            signed_release_seed(1, &tool_release(), &grant(vendor)),
        ),
        (
            "signed-by-vendor-pinned-version",
            signed_release_seed(1 | 16, &tool_release(), &grant(vendor)),
        ),
        (
            "agent-by-operator",
            signed_release_seed(0, &agent, &grant(vendor)),
        ),
        (
            "agent-by-vendor",
            signed_release_seed(1, &agent, &grant(vendor)),
        ),
        (
            "names",
            Seed::new()
                .byte(2)
                .part("acme-*")
                .part("acme-tool")
                .into_bytes(),
        ),
    ]
}

/// The schedule target's layout: flags, expression, zone index, free zone, from, now,
/// grace.
fn schedule_seed(expr: &str, zone: u8, from: i64, now: i64) -> Vec<u8> {
    Seed::new()
        .byte(0)
        .part(expr)
        .byte(zone)
        .part("")
        .i64(from)
        .i64(now)
        .i64(60_000)
        .into_bytes()
}

fn schedule() -> Seeds {
    // Zone indexes into the target's ZONES list.
    const UTC: u8 = 0;
    const BERLIN: u8 = 1;
    const NEW_YORK: u8 = 2;
    const LORD_HOWE: u8 = 3;
    let day = 86_400_000;
    vec![
        (
            "cron-weekdays-berlin",
            schedule_seed("0 9 * * 1-5", BERLIN, SPRING_2026, SPRING_2026 + 3 * day),
        ),
        (
            "cron-fixed-spring-gap",
            schedule_seed("30 2 * * *", BERLIN, SPRING_2026, SPRING_2026 + day),
        ),
        (
            "cron-fixed-autumn-overlap",
            schedule_seed("30 2 * * *", BERLIN, AUTUMN_2026, AUTUMN_2026 + day),
        ),
        (
            "cron-wildcard-new-york",
            schedule_seed(
                "*/15 * * * *",
                NEW_YORK,
                NEW_YORK_AUTUMN_2026,
                NEW_YORK_AUTUMN_2026,
            ),
        ),
        (
            "cron-half-hour-dst",
            schedule_seed(
                "*/30 * * * *",
                LORD_HOWE,
                LORD_HOWE_AUTUMN_2026,
                LORD_HOWE_AUTUMN_2026,
            ),
        ),
        (
            "cron-seconds-field",
            schedule_seed("30 0 1 * * *", UTC, SPRING_2026, SPRING_2026),
        ),
        (
            "cron-names-and-specials",
            schedule_seed("0 0 L * MON#2,FRI", BERLIN, SPRING_2026, SPRING_2026),
        ),
        (
            "cron-hourly",
            schedule_seed("@hourly", BERLIN, AUTUMN_2026, AUTUMN_2026),
        ),
        (
            "cron-leap-day",
            schedule_seed("0 0 29 2 *", UTC, SPRING_2026, SPRING_2026),
        ),
        (
            "cron-never-fires",
            schedule_seed("0 0 30 2 *", UTC, SPRING_2026, SPRING_2026),
        ),
        (
            "every-10m",
            schedule_seed("10m", UTC, SPRING_2026, SPRING_2026 + day),
        ),
        (
            "every-1h30m",
            schedule_seed("1h30m", BERLIN, SPRING_2026, SPRING_2026),
        ),
        (
            "duration-all-units",
            schedule_seed("1w2d3h4m5s6ms", UTC, 0, 0),
        ),
        ("duration-ms", schedule_seed("500ms", UTC, 0, 0)),
        (
            "at-rfc3339",
            schedule_seed("2026-11-23T10:00:00+01:00", UTC, SPRING_2026, SPRING_2026),
        ),
        (
            "at-local-in-gap",
            schedule_seed("2026-03-29 02:30", BERLIN, SPRING_2026, SPRING_2026),
        ),
        (
            "at-local-in-overlap",
            schedule_seed("2026-10-25T02:30:00.250", BERLIN, AUTUMN_2026, AUTUMN_2026),
        ),
        (
            "at-relative",
            schedule_seed("+10m", UTC, SPRING_2026, SPRING_2026),
        ),
        (
            "free-zone",
            Seed::new()
                .byte(1)
                .part("0 3 * * *")
                .byte(0)
                .part("Europe/London")
                .i64(AUTUMN_2026)
                .i64(AUTUMN_2026)
                .i64(0)
                .into_bytes(),
        ),
    ]
}

/// Path, kind, link target and contents of one archive entry, as raw bytes.
type TarEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn tar_of(entries: &[TarEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_mode(0o755);
        header.set_size(data.len() as u64);
        // Raw names: `set_path` would refuse the `..` seeds.
        let old = header.as_old_mut();
        old.name[..path.len()].copy_from_slice(path);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        builder.append(&header, *data).expect("in-memory tar");
    }
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(1);
    header.set_mode(0o644);
    // A name longer than the 100-byte field goes in a GNU long-name entry.
    let long = format!("share/{}/README", "d".repeat(120));
    builder
        .append_data(&mut header, long, &b"x"[..])
        .expect("in-memory tar");
    builder.into_inner().expect("in-memory tar")
}

fn archive_path() -> Seeds {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let path = |p: &str| Seed::new().byte(0).rest(p).into_bytes();
    let package = tar_of(&[
        (b"./", Directory, b"", b""),
        (b"bin/", Directory, b"", b""),
        (b"bin/tool", Regular, b"", b"#!/bin/sh\necho hi\n"),
        (b"bin/tool-link", Symlink, b"tool", b""),
        (b"bin/tool-hard", Link, b"bin/tool", b""),
    ]);
    let hostile = tar_of(&[
        (b"../escape", Regular, b"", b"x"),
        (b"link", Symlink, b"../../etc/passwd", b""),
        (b"/etc/cron.d/x", Regular, b"", b"x"),
    ]);
    vec![
        ("path-plain", path("bin/tool")),
        ("path-dots", path("./share/./doc//README")),
        ("path-parent", path("lib/../../etc/passwd")),
        ("path-absolute", path("/etc/passwd")),
        (
            "tar-package",
            Seed::new().byte(1).rest(package).into_bytes(),
        ),
        (
            "tar-hostile",
            Seed::new().byte(1).rest(hostile).into_bytes(),
        ),
    ]
}
