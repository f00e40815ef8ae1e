//! The files a user owns: every output gradc writes goes through
//! [`write()`], and every command checks with [`refuse_overlaps`] that no
//! output is also one of its inputs.
//!
//! Writing a regular file is atomic: the bytes go to a temporary file
//! beside the target, are synced, get the existing file's permissions and
//! are renamed over it, so a killed run never leaves a half-written file.
//! A symlink is followed to its target (the link stays a link); a path
//! that is not a regular file (`/dev/null`, a FIFO, a terminal) is written
//! directly, never replaced. Temporary files that a killed save left
//! behind for the same target (`.NAME.PID.tmp` of a process that no longer
//! runs) are removed by the next save.
//!
//! Paths are compared by file identity (device and inode on Unix), not by
//! spelling: `m.grad`, `./m.grad` and a link to it are the same file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// How many symlinks [`write`] follows before it gives up (as the kernel's
/// `ELOOP`).
const MAX_LINKS: usize = 40;

/// Follows symlinks from `path` to the path that is finally written: the
/// target of the last link (which may not exist yet), or `path` itself.
pub(crate) fn resolve_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&current) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                let target = std::fs::read_link(&current)?;
                current = if target.is_absolute() {
                    target
                } else {
                    current
                        .parent()
                        .map_or_else(|| target.clone(), |parent| parent.join(&target))
                };
            }
            _ => return Ok(current),
        }
    }
    Err(std::io::Error::other(format!(
        "more than {MAX_LINKS} symbolic links to follow from {}",
        path.display()
    )))
}

/// Writes `bytes` to `path`: atomically for a regular (or new) file,
/// keeping an existing file's permissions; through symlinks to their
/// target; directly to a device, FIFO or other non-regular file.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = resolve_links(path)?;
    match std::fs::metadata(&target) {
        Ok(metadata) if metadata.is_dir() => Err(std::io::Error::other(format!(
            "{} is a directory",
            target.display()
        ))),
        Ok(metadata) if !metadata.is_file() => {
            // A device or a FIFO: write into it, never replace it.
            let mut file = std::fs::OpenOptions::new().write(true).open(&target)?;
            file.write_all(bytes)?;
            file.flush()
        }
        Ok(metadata) => replace(&target, bytes, Some(metadata.permissions())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => replace(&target, bytes, None),
        Err(error) => Err(error),
    }
}

/// The directory and file name of a target, for its temporary files.
fn split(target: &Path) -> (PathBuf, String) {
    let directory = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = target
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    (directory, file_name)
}

/// The temporary file of `file_name` for process `pid`.
fn temporary_name(file_name: &str, pid: u32) -> String {
    format!(".{file_name}.{pid}.tmp")
}

/// Writes a temporary file beside `target`, syncs it, gives it
/// `permissions` and renames it over `target`; on failure the temporary
/// file is removed.
fn replace(
    target: &Path,
    bytes: &[u8],
    permissions: Option<std::fs::Permissions>,
) -> std::io::Result<()> {
    let (directory, file_name) = split(target);
    remove_stale_temporaries(&directory, &file_name);
    let temporary = directory.join(temporary_name(&file_name, std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        if let Some(permissions) = permissions {
            file.set_permissions(permissions)?;
        }
        file.sync_all()?;
        std::fs::rename(&temporary, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Whether a process runs. Without `/proc` to ask, every process counts as
/// running, so nothing is removed that might still be written.
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// Removes `.NAME.PID.tmp` files of `file_name` left by processes that no
/// longer run (a save killed half-way).
fn remove_stale_temporaries(directory: &Path, file_name: &str) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    let prefix = format!(".{file_name}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && !process_runs(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A file's identity: the same for every spelling of its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity(u64, u64);

fn identity(path: &Path) -> Option<Identity> {
    let metadata = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some(Identity(metadata.dev(), metadata.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = metadata;
        let canonical = std::fs::canonicalize(path).ok()?;
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for byte in canonical.to_string_lossy().bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
        Some(Identity(0, hash))
    }
}

/// A path a command reads or writes, with what it is for (`--save`, `the
/// model source`).
pub type Role<'a> = (&'a str, &'a Path);

/// Where a path leads once links and `.`/`..` are resolved, also for a
/// file that does not exist yet (its directory resolved, its name kept).
fn location(path: &Path) -> Option<PathBuf> {
    let target = resolve_links(path).ok()?;
    if let Ok(canonical) = std::fs::canonicalize(&target) {
        return Some(canonical);
    }
    let (directory, file_name) = split(&target);
    Some(std::fs::canonicalize(directory).ok()?.join(file_name))
}

/// Whether two paths name the same file: the same identity (hard links
/// too) or the same location (files not written yet).
fn same_file(a: &Path, b: &Path) -> bool {
    if let (Some(x), Some(y)) = (identity(a), identity(b)) {
        return x == y;
    }
    location(a).is_some_and(|x| Some(x) == location(b))
}

/// Refuses a command whose output is one of its inputs or another of its
/// outputs (compared as files, not as spellings): writing it would
/// destroy the input, or one output would overwrite the other.
/// Non-regular files (`/dev/null`) may appear several times.
pub(crate) fn refuse_overlaps(inputs: &[Role<'_>], outputs: &[Role<'_>]) -> Result<(), String> {
    for (index, (output_role, output)) in outputs.iter().enumerate() {
        if std::fs::metadata(output).is_ok_and(|m| !m.is_file()) {
            continue;
        }
        let clash = inputs
            .iter()
            .chain(&outputs[..index])
            .find(|(_, path)| same_file(path, output));
        if let Some((role, path)) = clash {
            let same = if path == output {
                String::new()
            } else {
                format!(" (as {})", path.display())
            };
            return Err(format!(
                "{output_role} {} is the same file as {role}{same}: writing it would destroy it; choose another path",
                output.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gradc-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    #[test]
    fn writes_new_and_existing_files_atomically() {
        let dir = scratch("plain");
        let path = dir.join("out.txt");
        write(&path, b"one").expect("new file");
        write(&path, b"two").expect("replaced");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn keeps_the_mode_follows_links_and_writes_devices_directly() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("unix");
        let path = dir.join("private.bin");
        std::fs::write(&path, b"old").expect("seed");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        write(&path, b"new").expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let link = dir.join("link.bin");
        std::os::unix::fs::symlink("private.bin", &link).expect("symlink");
        write(&link, b"through").expect("write through");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("lstat")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"through");

        write(Path::new("/dev/null"), b"gone").expect("device");
        let null = std::fs::metadata("/dev/null").expect("stat");
        assert!(!null.is_file(), "/dev/null stays a device");
    }

    #[test]
    fn removes_temporaries_of_dead_processes_only() {
        let dir = scratch("stale");
        let dead = dir.join(temporary_name("ck.safetensors", u32::MAX - 1));
        let other = dir.join(temporary_name("other.safetensors", u32::MAX - 1));
        std::fs::write(&dead, b"half").expect("seed");
        std::fs::write(&other, b"half").expect("seed");
        write(&dir.join("ck.safetensors"), b"whole").expect("write");
        assert!(!dead.exists(), "a killed save's temporary file is removed");
        assert!(other.exists(), "another target's is left alone");
    }

    #[test]
    fn an_output_that_is_an_input_is_refused() {
        let dir = scratch("overlap");
        let model = dir.join("m.grad");
        std::fs::write(&model, b"model m {}").expect("seed");
        let spelled = dir.join(".").join("m.grad");
        let error =
            refuse_overlaps(&[("the model source", &model)], &[("--save", &spelled)]).unwrap_err();
        assert!(error.contains("--save"), "{error}");
        assert!(error.contains("the model source"), "{error}");
        let fresh = dir.join("new.safetensors");
        refuse_overlaps(&[("the model source", &model)], &[("--save", &fresh)])
            .expect("a new file is no input");
        let twice = refuse_overlaps(
            &[],
            &[
                ("--save", &fresh),
                ("--metrics", &dir.join(".").join("new.safetensors")),
            ],
        )
        .unwrap_err();
        assert!(
            twice.contains("--metrics") && twice.contains("--save"),
            "{twice}"
        );
        refuse_overlaps(
            &[("the model source", &model)],
            &[
                ("--save", Path::new("/dev/null")),
                ("--metrics", Path::new("/dev/null")),
            ],
        )
        .expect("devices may repeat");
    }
}
