//! The path check the agent applies to every entry of a package archive before writing it
//! (`herald_agent::install::contained_path`, used for entry paths and link targets). The
//! first byte picks what the rest is:
//!
//! - bit 0 clear: an entry path as raw bytes. An accepted path must be relative, made of
//!   normal components only, stay under the version directory when joined to it, and
//!   keep every byte of the archive's path but the `.` and empty segments; a refused one
//!   must have had a NUL, a leading `/` or a `..` segment;
//! - bit 0 set: a tar archive, read with the same `tar` crate the agent unpacks with
//!   (GNU long names and PAX paths included): every entry's path and link target go
//!   through the same check. Nothing may panic.

#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use herald_agent::install::contained_path;
use herald_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// Entries read from one archive at most (a fuzz input is small anyway).
const MAX_ENTRIES: usize = 256;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    if input.byte() & 1 == 0 {
        check(input.rest());
        return;
    }
    let mut archive = tar::Archive::new(input.rest());
    let Ok(entries) = archive.entries() else {
        return;
    };
    for entry in entries.take(MAX_ENTRIES) {
        let Ok(entry) = entry else {
            return;
        };
        check(&entry.path_bytes());
        if let Some(link) = entry.link_name_bytes() {
            check(&link);
        }
        let _ = (
            entry.header().entry_type(),
            entry.header().mode(),
            entry.size(),
        );
    }
});

fn check(raw: &[u8]) {
    let segments: Vec<&[u8]> = raw.split(|&b| b == b'/').collect();
    let dangerous = raw.contains(&0) || raw.starts_with(b"/") || segments.contains(&&b".."[..]);
    let path = match contained_path(raw) {
        Ok(path) => path,
        Err(reason) => {
            assert!(dangerous, "{raw:?} refused ({reason}) though harmless");
            return;
        }
    };
    assert!(!dangerous, "{raw:?} accepted as {path:?}");
    assert!(path.is_relative(), "{raw:?} became absolute {path:?}");
    assert!(
        path.components().all(|c| matches!(c, Component::Normal(_))),
        "{raw:?} became {path:?}, with a component that is not a plain name"
    );
    let dir = Path::new("/packages/acme-tool/1.0.0.new");
    let target = dir.join(&path);
    assert!(target.starts_with(dir), "{raw:?} lands at {target:?}");
    let kept: Vec<&[u8]> = segments
        .into_iter()
        .filter(|s| !s.is_empty() && *s != b".")
        .collect();
    assert_eq!(
        path.as_os_str(),
        OsStr::from_bytes(&kept.join(&b'/')),
        "{raw:?} lost or changed bytes"
    );
}
