//! Small file helpers used by agent and server: atomic writes (temp file, fsync, rename)
//! so a crash never leaves a half-written key or config, and private (0600) files for
//! secrets. Errors name the path.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file operation that failed, with the path it concerned.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FileError {
    /// What was attempted ("cannot read", ...).
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    fn new(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The file does not exist.
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::NotFound
    }
}

/// A `map_err` adapter naming the operation and the path: `.map_err(io_error("cannot
/// open", &path))`.
pub fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError {
        action,
        path,
        source,
    }
}

/// Makes renames and creations in `dir` durable; failure only costs durability, so it is
/// ignored.
pub fn sync_dir(dir: &Path) {
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// Removes a file; one that is not there is fine.
pub fn remove_if_present(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FileError::new("cannot remove", path, e)),
    }
}

/// Reads a UTF-8 file.
pub fn read_string(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|e| FileError::new("cannot read", path, e))
}

/// Writes a file atomically with mode 0644.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_with_mode(path, contents, 0o644)
}

/// Writes a secret atomically with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_with_mode(path, contents, 0o600)
}

fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            // Make the rename durable.
            if let Ok(dir) = fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        FileError::new("cannot write", path, e)
    })
}

/// Creates a directory (and parents) with mode 0700.
pub fn create_private_dir(path: &Path) -> Result<(), FileError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(path)
        .map_err(|e| FileError::new("cannot create directory", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_file_is_0600_and_replaced_atomically() {
        let dir = std::env::temp_dir().join(format!("herald-files-{}", std::process::id()));
        create_private_dir(&dir).unwrap();
        let path = dir.join("secret");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(read_string(&path).unwrap(), "two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!path.with_extension("tmp").exists());
        let err = read_string(&dir.join("missing")).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("missing"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
