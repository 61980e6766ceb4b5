//! The guest's initramfs: busybox, `/init`, and the modules, as an uncompressed newc cpio
//! written here (the kernel unpacks newc; no `cpio` tool needed). It is cached by content:
//! the file name is a hash of every entry, so a changed module list or init script makes a new
//! one and an unchanged one is reused.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// One archive member.
#[derive(Hash)]
pub enum Entry {
    Dir(String),
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// A character device node (`/dev/console`, which the kernel opens before `/init` runs).
    CharDev {
        path: String,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// One newc header and name (`070701`, thirteen 8-digit hex fields: ino, mode, uid, gid,
/// nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check).
fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, rdev: (u32, u32), name: &str) {
    let fields = [
        ino,
        mode,
        0,
        0,
        if mode & S_IFDIR != 0 { 2 } else { 1 },
        0,
        size as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// The archive's bytes, members in the order given (directories before their contents).
pub fn cpio(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match entry {
            Entry::Dir(path) => header(&mut out, ino, S_IFDIR | 0o755, 0, (0, 0), path),
            Entry::File { path, mode, data } => {
                header(&mut out, ino, S_IFREG | mode, data.len(), (0, 0), path);
                out.extend_from_slice(data);
                pad4(&mut out);
            }
            Entry::CharDev { path, major, minor } => {
                header(&mut out, ino, S_IFCHR | 0o600, 0, (*major, *minor), path)
            }
        }
    }
    header(&mut out, 0, 0, 0, (0, 0), "TRAILER!!!");
    out
}

/// Every directory `path` needs, parents first, each once.
fn parents(path: &str, dirs: &mut Vec<String>) {
    let mut at = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(part);
        if !dirs.contains(&at) {
            dirs.push(at.clone());
        }
    }
}

/// Writes the initramfs for `init`, busybox and the modules (paths relative to `modules`, in
/// load order, listed in `/modules.order`) under `cache` unless one with the same content is
/// there; returns its path.
pub fn build(
    cache: &Path,
    init: &str,
    busybox: &Path,
    modules: &Path,
    order: &[PathBuf],
) -> anyhow::Result<PathBuf> {
    let mut files = vec![
        Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: init.as_bytes().to_vec(),
        },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: std::fs::read(busybox)
                .with_context(|| format!("reading {}", busybox.display()))?,
        },
    ];
    let mut listed = String::new();
    for rel in order {
        let rel_str = rel.to_string_lossy().to_string();
        listed.push_str(&rel_str);
        listed.push('\n');
        files.push(Entry::File {
            path: format!("lib/modules/{rel_str}"),
            mode: 0o644,
            data: std::fs::read(modules.join(rel))
                .with_context(|| format!("reading module {}", rel.display()))?,
        });
    }
    files.push(Entry::File {
        path: "modules.order".into(),
        mode: 0o644,
        data: listed.into_bytes(),
    });
    let mut dirs: Vec<String> = ["dev", "proc", "sys", "newroot", "bin"]
        .iter()
        .map(|d| d.to_string())
        .collect();
    for f in &files {
        if let Entry::File { path, .. } = f {
            parents(path, &mut dirs);
        }
    }
    let mut entries: Vec<Entry> = dirs.into_iter().map(Entry::Dir).collect();
    entries.push(Entry::CharDev {
        path: "dev/console".into(),
        major: 5,
        minor: 1,
    });
    entries.extend(files);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    entries.hash(&mut hasher);
    let path = cache.join(format!("initramfs-{:016x}.cpio", hasher.finish()));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(cache)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, cpio(&entries)).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_members_are_aligned_and_the_trailer_closes_the_archive() {
        let bytes = cpio(&[
            Entry::Dir("bin".into()),
            Entry::File {
                path: "bin/x".into(),
                mode: 0o755,
                data: b"hello".to_vec(),
            },
        ]);
        // A directory header: magic, ino 1, mode 040755, nlink 2, name "bin\0" padded.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001");
        assert_eq!(&bytes[14..22], b"000041ed");
        assert_eq!(&bytes[110..114], b"bin\0");
        // 110 + 4 = 114, padded to 116: the file's header starts there.
        assert_eq!(&bytes[116..122], b"070701");
        let file_name = 116 + 110;
        assert_eq!(&bytes[file_name..file_name + 6], b"bin/x\0");
        // 226 + 6 = 232 (aligned): the data, then padding to 240.
        assert_eq!(&bytes[232..237], b"hello");
        assert_eq!(&bytes[240..246], b"070701");
        // 110 + 11 = 121, padded to 124.
        assert!(bytes.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn parents_come_first_and_once() {
        let mut dirs = vec!["lib".to_string()];
        parents("lib/modules/kernel/net/x.ko", &mut dirs);
        assert_eq!(
            dirs,
            [
                "lib",
                "lib/modules",
                "lib/modules/kernel",
                "lib/modules/kernel/net"
            ]
        );
    }
}
