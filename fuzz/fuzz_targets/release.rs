//! Release metadata (`herald_shared::release`): what an agent checks before downloading a
//! package. The first byte picks what the rest is:
//!
//! - `0`: a release envelope and an optional delegation envelope, as a bundle carries
//!   them, put through [`verify`] (the signatures will not verify; the decoding and the
//!   order of the checks before them is the point);
//! - `1`: flags, the agent's side of [`Release::check`] (platform, versions, time), then a
//!   [`Release`] and a [`Delegation`]: they are signed with test keys (operator, or vendor
//!   plus a grant) and must verify exactly when the metadata is valid and the grant covers
//!   it, and never for the agent's own package when vendor-signed; a verified release's
//!   verdict must agree with what it was checked against;
//! - `2`: a delegation pattern and a package name for the name and pattern checks.

#![no_main]

use std::sync::OnceLock;

use herald_fuzz::Input;
use herald_shared::codec::{self, DEFAULT_FRAME_LIMIT};
use herald_shared::envelope::Statement;
use herald_shared::envelope::{Envelope, OperatorKey, VendorKey, MAX_PAYLOAD};
use herald_shared::release::{
    check_package_name, check_pattern, check_platform, verify, Delegation, Installed, Release,
    Verdict, AGENT_PACKAGE, MAX_NAME_LEN,
};
use libfuzzer_sys::fuzz_target;

fn operator() -> &'static OperatorKey {
    static KEY: OnceLock<OperatorKey> = OnceLock::new();
    KEY.get_or_init(|| OperatorKey::from_seed([1; 32]))
}

fn vendor() -> &'static VendorKey {
    static KEY: OnceLock<VendorKey> = OnceLock::new();
    KEY.get_or_init(|| VendorKey::from_seed([2; 32]))
}

/// Flags of the signed mode.
const VENDOR_SIGNED: u8 = 1;
const GRANT_KEEPS_ITS_KEY: u8 = 2;
const ORDER_NAMES_OTHER_PACKAGE: u8 = 4;
const AGENT_ON_OTHER_PLATFORM: u8 = 8;
const ORDER_PINS_VERSION: u8 = 16;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.byte() % 3 {
        0 => envelopes(input.rest()),
        1 => signed(input),
        _ => names(input),
    }
});

fn envelopes(bytes: &[u8]) {
    let Ok((release, delegation)) =
        codec::from_bytes::<(Envelope, Option<Envelope>)>(bytes, DEFAULT_FRAME_LIMIT)
    else {
        return;
    };
    let _ = verify(&release, delegation.as_ref(), &[operator().public()]);
    let _ = verify(&release, delegation.as_ref(), &[release.signer]);
}

fn signed(mut input: Input<'_>) {
    let flags = input.byte();
    let other_package = input.text().into_owned();
    let other_platform = input.text().into_owned();
    let wanted = input.text().into_owned();
    let agent_version = input.text().into_owned();
    let highest_seen = semver::Version::parse(&input.text()).ok();
    let current = semver::Version::parse(&input.text()).ok();
    let now = input.i64();
    let Ok(release) = codec::from_bytes::<Release>(input.part(), MAX_PAYLOAD) else {
        return;
    };
    let grant = if flags & VENDOR_SIGNED == 0 {
        None
    } else {
        let Ok(mut grant) = codec::from_bytes::<Delegation>(input.rest(), MAX_PAYLOAD) else {
            return;
        };
        if flags & GRANT_KEEPS_ITS_KEY == 0 {
            grant.key = vendor().public();
        }
        Some(grant)
    };
    let signer = if grant.is_some() {
        vendor()
    } else {
        operator()
    };
    let Ok(signed) = signer.sign(&Statement::Release(release.clone())) else {
        return;
    };
    let grant_envelope = match &grant {
        Some(grant) => match operator().sign(&Statement::Delegation(grant.clone())) {
            Ok(envelope) => Some(envelope),
            Err(_) => return,
        },
        None => None,
    };

    let verified = verify(&signed, grant_envelope.as_ref(), &[operator().public()]);
    let valid = release.validate().is_ok();
    let expected = match &grant {
        None => valid,
        Some(grant) => valid && grant.key == vendor().public() && grant.covers(&release.package),
    };
    assert_eq!(
        verified.is_ok(),
        expected,
        "verify gave {verified:?} for {release:?} under {grant:?}"
    );
    let Ok(verified) = verified else {
        return;
    };
    assert_eq!(verified, release);
    if grant.is_some() {
        assert_ne!(verified.package, AGENT_PACKAGE, "a vendor signed the agent");
    }

    let package = if flags & ORDER_NAMES_OTHER_PACKAGE == 0 {
        &verified.package
    } else {
        &other_package
    };
    let platform = if flags & AGENT_ON_OTHER_PLATFORM == 0 {
        &verified.platform
    } else {
        &other_platform
    };
    let wanted = (flags & ORDER_PINS_VERSION != 0).then_some(wanted.as_str());
    let installed = Installed {
        highest_seen,
        current,
    };
    let verdict = verified.check(package, wanted, platform, &agent_version, &installed, now);
    let Ok(verdict) = verdict else {
        return;
    };
    let offered = verified
        .semver()
        .expect("a verified release has a valid version");
    assert_eq!(package, &verified.package);
    assert_eq!(platform, &verified.platform);
    if let Some(wanted) = wanted {
        assert_eq!(semver::Version::parse(wanted).ok(), Some(offered.clone()));
    }
    if let Some(highest) = &installed.highest_seen {
        assert!(&offered >= highest, "rollback from {highest} to {offered}");
    }
    match verdict {
        Verdict::AlreadyInstalled => assert_eq!(installed.current, Some(offered)),
        Verdict::Install => {
            assert!(now <= verified.expires_at, "expired metadata installs");
            if let Some(min) = &verified.min_agent_version {
                let min = semver::Version::parse(min).expect("validated");
                let ours = semver::Version::parse(&agent_version).expect("checked");
                assert!(ours >= min, "agent {ours} installs a release needing {min}");
            }
        }
    }
}

fn names(mut input: Input<'_>) {
    let pattern = input.text().into_owned();
    let name = input.text().into_owned();
    let grant = Delegation {
        vendor: "fuzz".into(),
        key: vendor().public(),
        packages: vec![pattern.clone()],
        issued_at: 0,
    };
    let covered = grant.covers(&name);
    if check_pattern(&pattern).is_ok() {
        assert!(!grant.covers(AGENT_PACKAGE));
    }
    if check_package_name(&name).is_ok() {
        assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
        assert!(!name.contains('/') && name != "." && name != "..");
    }
    if covered {
        assert_ne!(name, AGENT_PACKAGE);
    }
    let _ = check_platform(&name);
}
