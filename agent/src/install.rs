//! Installed packages on the agent: every version lives in its own directory, a `current`
//! symlink is switched atomically between them, and the previous version is kept so a
//! failed update can be reverted.
//!
//! ```text
//! packages/<name>/<version>/...        the unpacked or copied artifact
//! packages/<name>/current -> <version> relative symlink, replaced by rename
//! packages/<name>/state.json           {"current": "1.2.0", "previous": "1.1.0" | null}
//! packages/.staging/                   0700, where downloads land
//! ```
//!
//! Unpacking re-reads the staged artifact once through a hashing reader, so a file swapped
//! after the download was verified is caught, and refuses any archive entry that could land
//! outside the version directory. A version is built in `<version>.new` and renamed into
//! place only when complete, so a crash leaves at most a `.new` directory, which the next
//! unpack of that version removes. The `current` link is the truth about what is installed;
//! `state.json` only remembers the previous version. All of this is blocking file I/O: call
//! it from `spawn_blocking`, one operation per package at a time.

use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tar::EntryType;

use herald_io::files::{io_error, sync_dir, FileError};

/// Directory under the packages root where downloads are staged.
pub const STAGING: &str = ".staging";

/// Most bytes a `.tar.gz` artifact may unpack to.
pub const MAX_UNPACKED_BYTES: u64 = 4 << 30;

/// Most entries a `.tar.gz` artifact may hold.
pub const MAX_ENTRIES: u64 = 100_000;

/// Longest package name.
pub const MAX_NAME_LEN: usize = 64;

/// The symlink naming the current version.
const CURRENT: &str = "current";
/// The symlink being prepared to replace [`CURRENT`].
const CURRENT_TMP: &str = "current.tmp";
/// Remembers the previous version.
const STATE: &str = "state.json";
/// Suffix of a version directory still being filled.
const NEW_SUFFIX: &str = ".new";

/// How an artifact is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// A gzip-compressed tar archive, unpacked into the version directory.
    TarGz,
    /// A single file, installed as `<version>/<name>` with mode 0755.
    File {
        /// The installed file's name: no `/`, not `.` or `..`.
        name: String,
    },
}

/// Why a package operation failed. Messages are shown to operators in job results.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The package name could escape the packages directory or is otherwise unusable.
    #[error(
        "invalid package name {0:?}: use at most {MAX_NAME_LEN} lowercase letters, digits, \
         '.', '_' or '-', starting with a letter or digit"
    )]
    BadName(String),
    /// The version is not a semantic version.
    #[error("invalid version {0:?}: it must be a semantic version such as 1.2.3")]
    BadVersion(String),
    /// The file name for a single-file artifact is unusable.
    #[error("invalid file name {0:?}: it must be one path component, not '.' or '..'")]
    BadFileName(String),
    /// The staged file does not have the length that was verified.
    #[error(
        "staged file {path} is not the {expected} bytes that were verified (read {got}); \
         nothing installed"
    )]
    WrongLength {
        /// The staged file.
        path: PathBuf,
        /// The verified length.
        expected: u64,
        /// Bytes read (one more than expected when the file is longer).
        got: u64,
    },
    /// The staged file changed after it was verified.
    #[error(
        "staged file {path} changed after it was verified (SHA-256 {got}, expected {expected}); \
         nothing installed"
    )]
    Tampered {
        /// The staged file.
        path: PathBuf,
        /// The verified hash (hex).
        expected: String,
        /// The hash of the bytes read (hex).
        got: String,
    },
    /// An archive entry could land outside the version directory, or is a special file.
    #[error("archive entry {entry:?} refused: {reason}; nothing installed")]
    UnsafeEntry {
        /// The entry's path as written in the archive.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The archive unpacks to more than [`MAX_UNPACKED_BYTES`].
    #[error("archive unpacks to more than {limit} bytes; nothing installed")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The archive has more than [`MAX_ENTRIES`] entries.
    #[error("archive has more than {limit} entries; nothing installed")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// The artifact is not a readable `.tar.gz`.
    #[error("artifact is not a valid .tar.gz ({detail}); nothing installed")]
    Archive {
        /// What the decoder said.
        detail: String,
    },
    /// The version was never unpacked (or has been pruned).
    #[error("{name} {version} is not installed")]
    NotInstalled {
        /// Package.
        name: String,
        /// Version.
        version: String,
    },
    /// Nothing has been switched to yet.
    #[error("{name} has no current version")]
    NoCurrent {
        /// Package.
        name: String,
    },
    /// There is no previous version to revert to.
    #[error("{name} has no previous version to revert to")]
    NoPrevious {
        /// Package.
        name: String,
    },
    /// The version is current (or kept for revert) and cannot be replaced or discarded.
    #[error("{name} {version} is in use (current or kept for revert)")]
    InUse {
        /// Package.
        name: String,
        /// Version.
        version: String,
    },
    /// The package's link or state file holds something this module never writes.
    #[error("package state at {path} is damaged: {detail}")]
    Damaged {
        /// The link or file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] FileError),
}

/// What `state.json` holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    current: Option<String>,
    previous: Option<String>,
}

/// The installed packages under one root directory.
#[derive(Debug, Clone)]
pub struct Packages {
    root: PathBuf,
}

impl Packages {
    /// Opens the packages root, creating it (0755) and its staging directory (0700).
    pub fn open(root: &Path) -> Result<Packages, InstallError> {
        create_dir(root)?;
        let staging = root.join(STAGING);
        herald_io::files::create_private_dir(&staging)?;
        // An existing directory keeps its mode through create; downloads must stay private.
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))
            .map_err(io_error("cannot restrict", &staging))?;
        Ok(Packages {
            root: root.to_path_buf(),
        })
    }

    /// The private directory where artifacts are downloaded before they are unpacked.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(STAGING)
    }

    /// The version `current` points at, if any.
    pub fn current(&self, name: &str) -> Result<Option<String>, InstallError> {
        read_current(&self.package_dir(name)?)
    }

    /// The version kept for revert, if any.
    pub fn previous(&self, name: &str) -> Result<Option<String>, InstallError> {
        let dir = self.package_dir(name)?;
        let current = read_current(&dir)?;
        previous_of(&dir, current.as_deref())
    }

    /// Where `version` of `name` is (or would be) installed.
    pub fn version_dir(&self, name: &str, version: &str) -> Result<PathBuf, InstallError> {
        check_version(version)?;
        Ok(self.package_dir(name)?.join(version))
    }

    /// Copies ([`Format::File`]) or unpacks ([`Format::TarGz`]) the staged artifact into
    /// `<name>/<version>` and returns that directory.
    ///
    /// The staged file is read once, through a hash: if its bytes are not exactly the
    /// `length` bytes with SHA-256 `sha256` that the download verified, everything unpacked
    /// is removed and the install fails. The work happens in `<version>.new`, renamed into
    /// place only when complete. The current version cannot be unpacked over.
    pub fn unpack(
        &self,
        name: &str,
        version: &str,
        staged: &Path,
        sha256: [u8; 32],
        length: u64,
        format: &Format,
    ) -> Result<PathBuf, InstallError> {
        let dir = self.version_dir(name, version)?;
        if let Format::File { name } = format {
            check_file_name(name)?;
        }
        let package = self.package_dir(name)?;
        if read_current(&package)?.as_deref() == Some(version) {
            return Err(InstallError::InUse {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
        create_dir(&package)?;
        let new = package.join(format!("{version}{NEW_SUFFIX}"));
        remove_dir_if_present(&new)?;
        create_dir(&new)?;
        if let Err(e) = fill(&new, staged, sha256, length, format) {
            if let Err(cleanup) = fs::remove_dir_all(&new) {
                tracing::warn!(path = %new.display(), "cannot remove refused install: {cleanup}");
            }
            return Err(e);
        }
        sync_dir(&new);
        remove_dir_if_present(&dir)?;
        fs::rename(&new, &dir).map_err(io_error("cannot move into place", &dir))?;
        sync_dir(&package);
        Ok(dir)
    }

    /// Points `current` at `version` (atomically), remembers the old current as previous,
    /// and removes every other version directory of the package.
    pub fn switch(&self, name: &str, version: &str) -> Result<(), InstallError> {
        let package = self.package_dir(name)?;
        let dir = self.version_dir(name, version)?;
        if !dir.is_dir() {
            return Err(not_installed(name, version));
        }
        let old = read_current(&package)?;
        if old.as_deref() == Some(version) {
            return Ok(());
        }
        point_current(&package, version)?;
        write_state(
            &package,
            &State {
                current: Some(version.to_string()),
                previous: old.clone(),
            },
        )?;
        prune(&package, &[Some(version), old.as_deref()]);
        Ok(())
    }

    /// Removes an unpacked version that never became current (say, its install command
    /// failed). The current and previous versions are refused; an absent one is fine.
    pub fn discard(&self, name: &str, version: &str) -> Result<(), InstallError> {
        let dir = self.version_dir(name, version)?;
        let package = self.package_dir(name)?;
        let current = read_current(&package)?;
        let previous = previous_of(&package, current.as_deref())?;
        if current.as_deref() == Some(version) || previous.as_deref() == Some(version) {
            return Err(InstallError::InUse {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
        remove_dir_if_present(&package.join(format!("{version}{NEW_SUFFIX}")))?;
        remove_dir_if_present(&dir)
    }

    /// Switches `current` back to the previous version, which then becomes current while
    /// the version left becomes previous. Returns the version now current.
    pub fn revert(&self, name: &str) -> Result<String, InstallError> {
        let package = self.package_dir(name)?;
        let current = read_current(&package)?.ok_or_else(|| InstallError::NoCurrent {
            name: name.to_string(),
        })?;
        let previous =
            previous_of(&package, Some(&current))?.ok_or_else(|| InstallError::NoPrevious {
                name: name.to_string(),
            })?;
        if !package.join(&previous).is_dir() {
            return Err(not_installed(name, &previous));
        }
        point_current(&package, &previous)?;
        write_state(
            &package,
            &State {
                current: Some(previous.clone()),
                previous: Some(current),
            },
        )?;
        Ok(previous)
    }

    fn package_dir(&self, name: &str) -> Result<PathBuf, InstallError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }
}

// === validation ===

/// `[a-z0-9][a-z0-9._-]*`, at most [`MAX_NAME_LEN`]: a single path component that is never
/// `.`, `..` or the hidden staging directory.
fn check_name(name: &str) -> Result<(), InstallError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok && name.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(InstallError::BadName(name.to_string()))
    }
}

/// A semantic version (its characters are `[0-9A-Za-z.+-]`, so it is one path component).
/// One ending in `.new` could be taken for another version's unfinished directory.
fn check_version(version: &str) -> Result<(), InstallError> {
    if semver::Version::parse(version).is_ok() && !version.ends_with(NEW_SUFFIX) {
        Ok(())
    } else {
        Err(InstallError::BadVersion(version.to_string()))
    }
}

fn check_file_name(name: &str) -> Result<(), InstallError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        Err(InstallError::BadFileName(name.to_string()))
    } else {
        Ok(())
    }
}

// === unpacking ===

/// Reads through SHA-256, refusing to read more than one byte past the expected length.
struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    length: u64,
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read > self.length {
            return Err(io::Error::other("staged file is longer than verified"));
        }
        // One byte more than expected is enough to tell the file is too long.
        let room = (self.length + 1 - self.read).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Fills `new` from the staged file, then checks the bytes read were the verified ones.
fn fill(
    new: &Path,
    staged: &Path,
    sha256: [u8; 32],
    length: u64,
    format: &Format,
) -> Result<(), InstallError> {
    let file = fs::File::open(staged).map_err(io_error("cannot open", staged))?;
    let mut reader = Verifying {
        inner: io::BufReader::new(file),
        hasher: Sha256::new(),
        read: 0,
        length,
    };
    let filled = match format {
        Format::File { name } => copy_file(&mut reader, &new.join(name)),
        Format::TarGz => unpack_tar_gz(&mut reader, new),
    };
    // Hash whatever the unpacker left unread (bytes after the archive's end, or everything
    // after a refused entry) so the check covers the whole file. A changed file explains
    // any other failure best, so it is reported first.
    let drained = io::copy(&mut reader, &mut io::sink());
    if reader.read != length {
        return Err(InstallError::WrongLength {
            path: staged.to_path_buf(),
            expected: length,
            got: reader.read,
        });
    }
    let got: [u8; 32] = reader.hasher.finalize().into();
    if got != sha256 {
        return Err(InstallError::Tampered {
            path: staged.to_path_buf(),
            expected: hex::encode(sha256),
            got: hex::encode(got),
        });
    }
    filled?;
    drained.map_err(io_error("cannot read", staged))?;
    Ok(())
}

fn copy_file(reader: &mut impl Read, path: &Path) -> Result<(), InstallError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(path)
        .map_err(io_error("cannot create", path))?;
    io::copy(reader, &mut file).map_err(io_error("cannot write", path))?;
    finish_file(&file, path, 0o755)
}

/// Sets the final mode (regardless of umask) and makes the contents durable.
fn finish_file(file: &fs::File, path: &Path, mode: u32) -> Result<(), InstallError> {
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error("cannot set mode of", path))?;
    Ok(file.sync_all().map_err(io_error("cannot write", path))?)
}

fn unpack_tar_gz(reader: &mut impl Read, dir: &Path) -> Result<(), InstallError> {
    let archive_error = |e: io::Error| InstallError::Archive {
        detail: e.to_string(),
    };
    let mut archive = tar::Archive::new(GzDecoder::new(reader));
    let mut total = 0u64;
    let mut count = 0u64;
    for entry in archive.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(InstallError::TooManyEntries { limit: MAX_ENTRIES });
        }
        unpack_entry(&mut entry, dir, &mut total)?;
    }
    // Read the gzip stream to its end so its checksum is verified too.
    let mut gz = archive.into_inner();
    io::copy(&mut gz, &mut io::sink()).map_err(archive_error)?;
    Ok(())
}

/// Writes one entry under `dir`, refusing anything that could reach outside it.
///
/// Paths must be relative without `..`; link targets likewise, so following any chain of
/// links made here only ever descends inside `dir`.
fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dir: &Path,
    total: &mut u64,
) -> Result<(), InstallError> {
    let raw = entry.path_bytes().into_owned();
    let refuse = |reason| InstallError::UnsafeEntry {
        entry: String::from_utf8_lossy(&raw).into_owned(),
        reason,
    };
    let relative = contained_path(&raw).map_err(refuse)?;
    let kind = entry.header().entry_type();
    if relative.as_os_str().is_empty() {
        // The archive's own top directory (`./`) is the version directory.
        return if kind == EntryType::Directory {
            Ok(())
        } else {
            Err(refuse("empty path"))
        };
    }
    let target = dir.join(&relative);
    match kind {
        EntryType::Directory => create_dir(&target),
        EntryType::Regular | EntryType::Continuous => {
            let size = entry.size();
            *total = total.saturating_add(size);
            if *total > MAX_UNPACKED_BYTES {
                return Err(InstallError::TooLarge {
                    limit: MAX_UNPACKED_BYTES,
                });
            }
            let mode = entry
                .header()
                .mode()
                .map_err(|_| refuse("unreadable mode"))?;
            // Keep only whether it is executable: never setuid, setgid or world-writable.
            let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            prepare_place(&target)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&target)
                .map_err(io_error("cannot create", &target))?;
            let copied =
                io::copy(&mut entry.take(size), &mut file).map_err(|e| InstallError::Archive {
                    detail: e.to_string(),
                })?;
            if copied != size {
                return Err(InstallError::Archive {
                    detail: format!("entry {} is truncated", relative.display()),
                });
            }
            finish_file(&file, &target, mode)
        }
        EntryType::Symlink => {
            let link = link_target(entry).map_err(refuse)?;
            prepare_place(&target)?;
            Ok(std::os::unix::fs::symlink(&link, &target)
                .map_err(io_error("cannot link", &target))?)
        }
        EntryType::Link => {
            // A hard link's target is a path from the archive's root.
            let link = link_target(entry).map_err(refuse)?;
            prepare_place(&target)?;
            Ok(
                fs::hard_link(dir.join(&link), &target)
                    .map_err(io_error("cannot link", &target))?,
            )
        }
        EntryType::XGlobalHeader => Ok(()),
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            Err(refuse("devices and fifos are not installed"))
        }
        _ => Err(refuse("unsupported entry type")),
    }
}

/// A link's target, held to the same rule as entry paths.
fn link_target<R: Read>(entry: &tar::Entry<'_, R>) -> Result<PathBuf, &'static str> {
    let link = entry.link_name_bytes().ok_or("link without a target")?;
    let path = contained_path(&link)?;
    if path.as_os_str().is_empty() {
        return Err("link without a target");
    }
    Ok(path)
}

/// The path as relative normal components, or why it could leave the directory.
///
/// The check every archive entry's path and link target passes before anything is
/// written; public so that the fuzz target `archive_path` can reach it.
pub fn contained_path(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.contains(&0) {
        return Err("path contains NUL");
    }
    if raw.starts_with(b"/") {
        return Err("absolute path");
    }
    let mut path = PathBuf::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path contains '..'"),
            part => path.push(std::ffi::OsStr::from_bytes(part)),
        }
    }
    Ok(path)
}

/// Makes the parent directories of an entry and removes an earlier entry of the same
/// name, so a later entry replaces it rather than writing through it.
fn prepare_place(target: &Path) -> Result<(), InstallError> {
    if let Some(parent) = target.parent() {
        create_dir(parent)?;
    }
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            Ok(fs::remove_dir_all(target).map_err(io_error("cannot replace", target))?)
        }
        Ok(_) => Ok(fs::remove_file(target).map_err(io_error("cannot replace", target))?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot inspect", target)(e).into()),
    }
}

// === current link and state ===

fn read_current(package: &Path) -> Result<Option<String>, InstallError> {
    let link = package.join(CURRENT);
    let target = match fs::read_link(&link) {
        Ok(target) => target,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("cannot read link", &link)(e).into()),
    };
    let version = target.to_str().filter(|v| check_version(v).is_ok());
    match version {
        Some(version) => Ok(Some(version.to_string())),
        None => Err(InstallError::Damaged {
            path: link,
            detail: format!("points at {}, not a version", target.display()),
        }),
    }
}

/// The version kept for revert. The link is switched before `state.json` is written, so
/// if they disagree a switch or revert was interrupted between the two: the version the
/// state still calls current is the one that was left, hence the previous one.
fn previous_of(package: &Path, current: Option<&str>) -> Result<Option<String>, InstallError> {
    let Some(current) = current else {
        return Ok(None);
    };
    let state = read_state(package)?;
    let previous = if state.current.as_deref() == Some(current) {
        state.previous
    } else {
        state.current
    };
    Ok(previous.filter(|p| p != current && check_version(p).is_ok()))
}

fn read_state(package: &Path) -> Result<State, InstallError> {
    let path = package.join(STATE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(io_error("cannot read", &path)(e).into()),
    };
    serde_json::from_slice(&text).map_err(|e| InstallError::Damaged {
        path,
        detail: e.to_string(),
    })
}

fn write_state(package: &Path, state: &State) -> Result<(), InstallError> {
    let path = package.join(STATE);
    // Serializing two optional strings cannot fail.
    let text = serde_json::to_vec_pretty(state).expect("state serializes");
    Ok(herald_io::files::write_atomic(&path, &text)?)
}

/// Replaces the `current` link in one rename, so it always names a whole version.
fn point_current(package: &Path, version: &str) -> Result<(), InstallError> {
    let tmp = package.join(CURRENT_TMP);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("cannot remove", &tmp)(e).into()),
    }
    std::os::unix::fs::symlink(version, &tmp).map_err(io_error("cannot link", &tmp))?;
    let link = package.join(CURRENT);
    fs::rename(&tmp, &link).map_err(io_error("cannot replace", &link))?;
    sync_dir(package);
    Ok(())
}

/// Removes version directories (finished or not) other than `keep`. Failures are only
/// logged: the switch they follow has already happened.
fn prune(package: &Path, keep: &[Option<&str>]) {
    let entries = match fs::read_dir(package) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(path = %package.display(), "cannot list package to prune: {e}");
            return;
        }
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let version = name.strip_suffix(NEW_SUFFIX).unwrap_or(name);
        let kept = name == version && keep.contains(&Some(name));
        if kept || semver::Version::parse(version).is_err() {
            continue;
        }
        let path = entry.path();
        if let Err(e) = fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), "cannot prune old version: {e}");
        }
    }
}

// === file helpers ===

fn create_dir(path: &Path) -> Result<(), InstallError> {
    Ok(fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(io_error("cannot create directory", path))?)
}

fn remove_dir_if_present(path: &Path) -> Result<(), InstallError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove", path)(e).into()),
    }
}

/// Makes renames and new entries in a directory durable. A failure only risks redoing
/// work after a crash, so it is ignored.
fn not_installed(name: &str, version: &str) -> InstallError {
    InstallError::NotInstalled {
        name: name.to_string(),
        version: version.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const NAME: &str = "tool";

    /// A directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "herald-install-{}-{test}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        /// Packages under `<scratch>/root/packages`, so `..` twice still lands in scratch.
        fn packages(&self) -> Packages {
            Packages::open(&self.0.join("root/packages")).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// Writes `bytes` into the staging dir and returns its path.
    fn stage(packages: &Packages, bytes: &[u8]) -> PathBuf {
        let path = packages.staging_dir().join("artifact");
        fs::write(&path, bytes).unwrap();
        path
    }

    /// Stages `bytes` and unpacks them as `version`, with their true hash and length.
    fn install(
        packages: &Packages,
        version: &str,
        bytes: &[u8],
        format: &Format,
    ) -> Result<PathBuf, InstallError> {
        let staged = stage(packages, bytes);
        packages.unpack(
            NAME,
            version,
            &staged,
            sha256(bytes),
            bytes.len() as u64,
            format,
        )
    }

    fn file(name: &str) -> Format {
        Format::File {
            name: name.to_string(),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Version directories (finished or not) of the test package.
    fn versions(packages: &Packages) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(packages.root.join(NAME))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
            .collect();
        names.sort();
        names
    }

    /// One archive entry for [`tar_gz`].
    enum Item<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        Fifo(&'a str),
        CharDevice(&'a str),
    }

    /// A `.tar.gz` with headers written byte by byte, so entries a careful writer would
    /// refuse (`..`, absolute paths) can be made.
    fn tar_gz(items: &[Item<'_>]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        let mut builder = tar::Builder::new(gz);
        for item in items {
            let (path, kind, data, mode, link): (&str, EntryType, &[u8], u32, &str) = match *item {
                Item::File(path, data, mode) => (path, EntryType::Regular, data, mode, ""),
                Item::Dir(path) => (path, EntryType::Directory, b"", 0o755, ""),
                Item::Symlink(path, to) => (path, EntryType::Symlink, b"", 0o777, to),
                Item::Hardlink(path, to) => (path, EntryType::Link, b"", 0o644, to),
                Item::Fifo(path) => (path, EntryType::Fifo, b"", 0o644, ""),
                Item::CharDevice(path) => (path, EntryType::Char, b"", 0o644, ""),
            };
            let mut header = tar::Header::new_gnu();
            let old = header.as_old_mut();
            assert!(path.len() < old.name.len() && link.len() < old.linkname.len());
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        let mut gz = builder.into_inner().unwrap();
        gz.flush().unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn single_file_installs_and_switches() {
        let scratch = Scratch::new("file");
        let packages = scratch.packages();
        assert_eq!(mode(&packages.staging_dir()), 0o700);
        let dir = install(&packages, "1.0.0", b"#!/bin/sh\necho hi\n", &file("run.sh")).unwrap();
        assert_eq!(dir, packages.root.join("tool/1.0.0"));
        assert_eq!(
            fs::read(dir.join("run.sh")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(mode(&dir.join("run.sh")), 0o755);
        assert_eq!(packages.current(NAME).unwrap(), None);

        packages.switch(NAME, "1.0.0").unwrap();
        let link = packages.root.join("tool/current");
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("1.0.0"));
        assert_eq!(
            fs::read(link.join("run.sh")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(packages.current(NAME).unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(packages.previous(NAME).unwrap(), None);
        assert!(!packages.root.join("tool/current.tmp").exists());
        let state: serde_json::Value =
            serde_json::from_slice(&fs::read(packages.root.join("tool/state.json")).unwrap())
                .unwrap();
        assert_eq!(
            state,
            serde_json::json!({"current": "1.0.0", "previous": null})
        );
    }

    #[test]
    fn archive_installs_nested_dirs_modes_and_links() {
        let scratch = Scratch::new("targz");
        let packages = scratch.packages();
        let archive = tar_gz(&[
            Item::Dir("./"),
            Item::Dir("bin/"),
            Item::File("bin/tool", b"binary", 0o755),
            Item::File("bin/suid", b"setuid", 0o4775),
            Item::Symlink("bin/alias", "tool"),
            Item::File("share/doc/readme", b"read me", 0o666),
            Item::Hardlink("share/copy", "share/doc/readme"),
        ]);
        let dir = install(&packages, "2.0.0-rc.1", &archive, &Format::TarGz).unwrap();

        assert_eq!(fs::read(dir.join("bin/tool")).unwrap(), b"binary");
        assert_eq!(mode(&dir.join("bin/tool")), 0o755);
        assert_eq!(mode(&dir.join("bin/suid")), 0o755);
        assert_eq!(mode(&dir.join("share/doc/readme")), 0o644);
        assert_eq!(
            fs::read_link(dir.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(fs::read(dir.join("bin/alias")).unwrap(), b"binary");
        assert_eq!(fs::read(dir.join("share/copy")).unwrap(), b"read me");
        assert!(!packages.root.join("tool/2.0.0-rc.1.new").exists());
    }

    #[test]
    fn escaping_or_special_entries_refuse_the_whole_archive() {
        let scratch = Scratch::new("traversal");
        let packages = scratch.packages();
        let outside = scratch.0.join("outside");
        let outside_str = outside.to_str().unwrap().to_string();
        let cases: Vec<(&str, Vec<Item<'_>>)> = vec![
            ("dot-dot", vec![Item::File("../evil", b"x", 0o644)]),
            (
                "deep dot-dot",
                vec![Item::File("a/../../../evil", b"x", 0o644)],
            ),
            ("absolute", vec![Item::File(&outside_str, b"x", 0o644)]),
            (
                "symlink absolute",
                vec![Item::Symlink("passwd", "/etc/passwd")],
            ),
            ("symlink up", vec![Item::Symlink("x", "../../x")]),
            (
                "symlink up then through",
                vec![
                    Item::Symlink("up", ".."),
                    Item::File("up/evil", b"x", 0o644),
                ],
            ),
            ("hardlink absolute", vec![Item::Hardlink("h", &outside_str)]),
            ("hardlink up", vec![Item::Hardlink("h", "../evil")]),
            ("fifo", vec![Item::Fifo("pipe")]),
            ("device", vec![Item::CharDevice("null")]),
        ];
        for (case, mut items) in cases {
            // Good entries first: they must be removed with the rest.
            items.insert(0, Item::File("bin/ok", b"fine", 0o755));
            let archive = tar_gz(&items);
            let err = install(&packages, "1.0.0", &archive, &Format::TarGz).unwrap_err();
            assert!(
                matches!(err, InstallError::UnsafeEntry { .. }),
                "{case}: {err:?}"
            );
            assert!(
                err.to_string().contains("nothing installed"),
                "{case}: {err}"
            );
            assert!(!packages.root.join("tool/1.0.0").exists(), "{case}");
            assert!(!packages.root.join("tool/1.0.0.new").exists(), "{case}");
            for escaped in [
                packages.root.join("tool/evil"),
                packages.root.join("evil"),
                scratch.0.join("root/evil"),
                outside.clone(),
            ] {
                assert!(!escaped.exists(), "{case}: {}", escaped.display());
            }
        }
    }

    #[test]
    fn staged_file_replaced_after_verification_is_refused() {
        let scratch = Scratch::new("replaced");
        let packages = scratch.packages();
        for format in [file("tool"), Format::TarGz] {
            let verified = tar_gz(&[Item::File("bin/tool", b"good", 0o755)]);
            // Same length (stored, not compressed), valid archive, other contents.
            let swapped = tar_gz(&[Item::File("bin/tool", b"evil", 0o755)]);
            assert_eq!(verified.len(), swapped.len());
            let staged = stage(&packages, &swapped);
            let err = packages
                .unpack(
                    NAME,
                    "1.0.0",
                    &staged,
                    sha256(&verified),
                    verified.len() as u64,
                    &format,
                )
                .unwrap_err();
            assert!(
                matches!(err, InstallError::Tampered { .. }),
                "{format:?}: {err:?}"
            );
            assert!(!packages.root.join("tool/1.0.0").exists());
            assert!(!packages.root.join("tool/1.0.0.new").exists());
        }
    }

    #[test]
    fn wrong_length_is_refused() {
        let scratch = Scratch::new("length");
        let packages = scratch.packages();
        let bytes = tar_gz(&[Item::File("bin/tool", b"good", 0o755)]);
        let staged = stage(&packages, &bytes);
        for (format, declared) in [
            (file("tool"), bytes.len() as u64 + 1),
            (file("tool"), bytes.len() as u64 - 1),
            (Format::TarGz, bytes.len() as u64 + 1),
            (Format::TarGz, bytes.len() as u64 - 1),
        ] {
            let err = packages
                .unpack(NAME, "1.0.0", &staged, sha256(&bytes), declared, &format)
                .unwrap_err();
            assert!(
                matches!(err, InstallError::WrongLength { expected, .. } if expected == declared),
                "{format:?} {declared}: {err:?}"
            );
            assert!(!packages.root.join("tool/1.0.0").exists());
            assert!(!packages.root.join("tool/1.0.0.new").exists());
        }
    }

    #[test]
    fn garbage_archive_is_refused() {
        let scratch = Scratch::new("garbage");
        let packages = scratch.packages();
        let err = install(&packages, "1.0.0", b"not gzip at all", &Format::TarGz).unwrap_err();
        assert!(matches!(err, InstallError::Archive { .. }), "{err:?}");
        assert!(!packages.root.join("tool/1.0.0.new").exists());
    }

    #[test]
    fn switch_keeps_exactly_current_and_previous() {
        let scratch = Scratch::new("prune");
        let packages = scratch.packages();
        for version in ["1.0.0", "1.1.0", "1.2.0"] {
            install(&packages, version, version.as_bytes(), &file("v")).unwrap();
            packages.switch(NAME, version).unwrap();
        }
        // An unfinished leftover is pruned as well.
        fs::create_dir(packages.root.join("tool/0.9.0.new")).unwrap();
        install(&packages, "1.3.0", b"1.3.0", &file("v")).unwrap();
        packages.switch(NAME, "1.3.0").unwrap();
        assert_eq!(versions(&packages), ["1.2.0", "1.3.0"]);
        assert_eq!(packages.current(NAME).unwrap().as_deref(), Some("1.3.0"));
        assert_eq!(packages.previous(NAME).unwrap().as_deref(), Some("1.2.0"));
        // Switching to the current version changes nothing.
        packages.switch(NAME, "1.3.0").unwrap();
        assert_eq!(packages.previous(NAME).unwrap().as_deref(), Some("1.2.0"));
        let err = packages.switch(NAME, "9.9.9").unwrap_err();
        assert!(matches!(err, InstallError::NotInstalled { .. }), "{err:?}");
    }

    #[test]
    fn revert_swaps_current_and_previous() {
        let scratch = Scratch::new("revert");
        let packages = scratch.packages();
        for version in ["1.0.0", "1.1.0"] {
            install(&packages, version, version.as_bytes(), &file("v")).unwrap();
            packages.switch(NAME, version).unwrap();
        }
        assert_eq!(packages.revert(NAME).unwrap(), "1.0.0");
        assert_eq!(packages.current(NAME).unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(packages.previous(NAME).unwrap().as_deref(), Some("1.1.0"));
        let link = packages.root.join("tool/current");
        assert_eq!(fs::read(link.join("v")).unwrap(), b"1.0.0");
        assert_eq!(packages.revert(NAME).unwrap(), "1.1.0");
        assert_eq!(fs::read(link.join("v")).unwrap(), b"1.1.0");
        assert_eq!(versions(&packages), ["1.0.0", "1.1.0"]);
    }

    #[test]
    fn revert_needs_a_previous_version() {
        let scratch = Scratch::new("no-previous");
        let packages = scratch.packages();
        let err = packages.revert(NAME).unwrap_err();
        assert!(matches!(err, InstallError::NoCurrent { .. }), "{err:?}");
        install(&packages, "1.0.0", b"one", &file("v")).unwrap();
        packages.switch(NAME, "1.0.0").unwrap();
        let err = packages.revert(NAME).unwrap_err();
        assert!(matches!(err, InstallError::NoPrevious { .. }), "{err:?}");
        assert_eq!(packages.current(NAME).unwrap().as_deref(), Some("1.0.0"));
    }

    #[test]
    fn interrupted_switch_still_knows_the_previous_version() {
        let scratch = Scratch::new("interrupted");
        let packages = scratch.packages();
        for version in ["1.0.0", "1.1.0"] {
            install(&packages, version, version.as_bytes(), &file("v")).unwrap();
            packages.switch(NAME, version).unwrap();
        }
        install(&packages, "1.2.0", b"1.2.0", &file("v")).unwrap();
        // A crash after the link moved to 1.2.0 but before state.json was written.
        point_current(&packages.root.join(NAME), "1.2.0").unwrap();
        assert_eq!(packages.previous(NAME).unwrap().as_deref(), Some("1.1.0"));
        assert_eq!(packages.revert(NAME).unwrap(), "1.1.0");
        assert_eq!(packages.previous(NAME).unwrap().as_deref(), Some("1.2.0"));
    }

    #[test]
    fn discard_removes_only_the_new_version() {
        let scratch = Scratch::new("discard");
        let packages = scratch.packages();
        install(&packages, "1.0.0", b"one", &file("v")).unwrap();
        packages.switch(NAME, "1.0.0").unwrap();
        install(&packages, "1.1.0", b"two", &file("v")).unwrap();
        packages.discard(NAME, "1.1.0").unwrap();
        assert_eq!(versions(&packages), ["1.0.0"]);
        assert_eq!(packages.current(NAME).unwrap().as_deref(), Some("1.0.0"));
        // Discarding twice is fine; the current version is refused.
        packages.discard(NAME, "1.1.0").unwrap();
        let err = packages.discard(NAME, "1.0.0").unwrap_err();
        assert!(matches!(err, InstallError::InUse { .. }), "{err:?}");
        let err = install(&packages, "1.0.0", b"again", &file("v")).unwrap_err();
        assert!(matches!(err, InstallError::InUse { .. }), "{err:?}");
        assert_eq!(
            fs::read(packages.root.join("tool/1.0.0/v")).unwrap(),
            b"one"
        );
    }

    #[test]
    fn leftover_unfinished_dir_is_replaced() {
        let scratch = Scratch::new("leftover");
        let packages = scratch.packages();
        let leftover = packages.root.join("tool/1.0.0.new");
        fs::create_dir_all(&leftover).unwrap();
        fs::write(leftover.join("junk"), b"half").unwrap();
        let dir = install(&packages, "1.0.0", b"whole", &file("v")).unwrap();
        assert!(!dir.join("junk").exists());
        assert!(!leftover.exists());
        assert_eq!(fs::read(dir.join("v")).unwrap(), b"whole");
    }

    #[test]
    fn names_versions_and_file_names_cannot_escape() {
        let scratch = Scratch::new("names");
        let packages = scratch.packages();
        let staged = stage(&packages, b"x");
        let hash = sha256(b"x");
        for name in [
            "",
            "..",
            ".staging",
            "../x",
            "a/b",
            "Tool",
            "-x",
            &"a".repeat(65),
        ] {
            let err = packages
                .unpack(name, "1.0.0", &staged, hash, 1, &file("v"))
                .unwrap_err();
            assert!(matches!(err, InstallError::BadName(_)), "{name:?}: {err:?}");
        }
        for version in [
            "",
            "1.0",
            "v1.0.0",
            "../1.0.0",
            "1.0.0/x",
            "1.0.0+b.new",
            "current",
        ] {
            let err = packages
                .unpack(NAME, version, &staged, hash, 1, &file("v"))
                .unwrap_err();
            assert!(
                matches!(err, InstallError::BadVersion(_)),
                "{version:?}: {err:?}"
            );
        }
        for file_name in ["", ".", "..", "a/b", "/abs", "nul\0"] {
            let err = packages
                .unpack(NAME, "1.0.0", &staged, hash, 1, &file(file_name))
                .unwrap_err();
            assert!(
                matches!(err, InstallError::BadFileName(_)),
                "{file_name:?}: {err:?}"
            );
        }
        assert!(check_name("a0.b_c-d").is_ok());
        assert!(check_name(&"a".repeat(64)).is_ok());
        assert!(!packages.root.join(NAME).exists());
    }

    #[test]
    fn contained_paths() {
        assert_eq!(contained_path(b"./a//b/./c").unwrap(), Path::new("a/b/c"));
        assert_eq!(contained_path(b"./").unwrap(), Path::new(""));
        assert!(contained_path(b"/etc").is_err());
        assert!(contained_path(b"a/..").is_err());
        assert!(contained_path(b"..").is_err());
        assert!(contained_path(b"a\0b").is_err());
    }
}
