//! The guest kernel: Debian's newest `linux-image-6.1.0-NN-amd64` that apt knows, downloaded
//! once (`apt-get download`) and unpacked with `dpkg-deb -x` (never installed) into
//! `target/vm/kernel-<version>/`, and the load order of the modules the guest needs, resolved
//! from the modules' own `depends=` and `softdep=` fields (the package ships no modules.dep, and
//! busybox's insmod knows no dependencies).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{run, say};

pub struct Kernel {
    /// `6.1.0-57-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `…/lib/modules/<release>`.
    pub modules: PathBuf,
}

/// The newest `linux-image-6.1.0-NN-amd64` in apt's lists (signed or unsigned, same kernel).
fn newest_package() -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            "^linux-image-6\\.1\\.0-[0-9]+-amd64$",
        ])
        .output()
        .context("running apt-cache search")?;
    let text = String::from_utf8_lossy(&out.stdout);
    newest_of(&text).context("apt knows no linux-image-6.1.0-NN-amd64 (run apt-get update)")
}

/// The package with the highest ABI number `NN` among apt-cache search lines.
fn newest_of(search: &str) -> Option<String> {
    search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let abi = name
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-amd64")?;
            Some((abi.parse::<u32>().ok()?, name.to_string()))
        })
        .max()
        .map(|(_, name)| name)
}

/// A cached kernel under `cache` (any `kernel-6.1.0-*` directory that is complete), else the
/// newest one apt knows, downloaded and unpacked there.
pub fn fetch(cache: &Path) -> anyhow::Result<Kernel> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut cached: Vec<(u32, PathBuf)> = std::fs::read_dir(cache)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let abi = name.strip_prefix("kernel-6.1.0-")?.strip_suffix("-amd64")?;
            let path = e.path();
            path.join("complete")
                .is_file()
                .then_some((abi.parse().ok()?, path))
        })
        .collect();
    cached.sort();
    if let Some((_, dir)) = cached.pop() {
        return kernel_in(&dir);
    }
    let package = match newest_package() {
        Ok(p) => p,
        Err(_) => {
            say("apt-get update (to find a linux-image-6.1.0 package)");
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            newest_package()?
        }
    };
    let release = package
        .strip_prefix("linux-image-")
        .context("package name")?
        .to_string();
    let dir = cache.join(format!("kernel-{release}"));
    let scratch = cache.join(format!("download-{release}"));
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&scratch)?;
    say(&format!(
        "downloading {package} (apt-get download) into {}",
        scratch.display()
    ));
    run(Command::new("apt-get")
        .args(["download", "-qq", &package])
        .current_dir(&scratch))?;
    let deb = std::fs::read_dir(&scratch)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    std::fs::write(
        dir.join("complete"),
        deb.file_name().unwrap_or_default().as_encoded_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&scratch);
    kernel_in(&dir)
}

fn kernel_in(dir: &Path) -> anyhow::Result<Kernel> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("kernel directory name")?;
    let release = name.trim_start_matches("kernel-").to_string();
    let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
    let modules = dir.join(format!("lib/modules/{release}"));
    if !vmlinuz.is_file() || !modules.is_dir() {
        bail!(
            "{} is incomplete (no {} or {}); remove it to download again",
            dir.display(),
            vmlinuz.display(),
            modules.display()
        );
    }
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// A module's name as the kernel writes it (`-` and `_` are the same).
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The `.modinfo` fields `key=` of a module file (`depends`, `softdep`).
fn modinfo(file: &[u8], key: &str) -> Vec<String> {
    let needle = format!("{key}=");
    file.split(|b| *b == 0)
        .filter_map(|field| field.strip_prefix(needle.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).to_string())
        .collect()
}

/// Names a `softdep=` value wants loaded first: `pre: a b post: c` → `a b`.
fn soft_pre(value: &str) -> Vec<String> {
    let mut pre = false;
    let mut out = Vec::new();
    for word in value.split_whitespace() {
        match word {
            "pre:" => pre = true,
            "post:" => pre = false,
            w if pre => out.push(canonical(w)),
            _ => {}
        }
    }
    out
}

/// Soft dependencies that name an algorithm rather than a module, and the module providing it
/// here (resolving every alias would mean reading every module file).
const ALIASES: &[(&str, &str)] = &[("crc32c", "crc32c_generic")];

pub struct Resolved {
    /// Paths relative to the modules directory, each after everything it needs.
    pub order: Vec<PathBuf>,
    /// Wanted names that are neither a module file nor built in.
    pub absent: Vec<String>,
}

/// The load order for `wanted` and everything they depend on (hard and soft `pre:`
/// dependencies), leaving out what the kernel has built in.
pub fn resolve(modules: &Path, wanted: &[&str]) -> anyhow::Result<Resolved> {
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                let rel = path.strip_prefix(modules).unwrap_or(&path).to_path_buf();
                files.insert(canonical(stem), rel);
            }
        }
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
        .map(canonical)
        .collect();
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut absent = Vec::new();
    // Depth first, dependencies before the module; `visiting` breaks soft-dependency cycles.
    fn visit(
        name: &str,
        modules: &Path,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
        absent: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if !done.insert(name.to_string()) {
            return Ok(());
        }
        let Some(rel) = files.get(name) else {
            if !builtin.contains(name) {
                absent.push(name.to_string());
            }
            return Ok(());
        };
        let bytes = std::fs::read(modules.join(rel))
            .with_context(|| format!("reading {}", rel.display()))?;
        // A soft dependency may name an alias (libcrc32c's `pre: crc32c`); one that names
        // nothing loadable is only a wish, unlike a hard one.
        for soft in modinfo(&bytes, "softdep").iter().flat_map(|v| soft_pre(v)) {
            let soft = ALIASES
                .iter()
                .find(|(alias, _)| *alias == soft)
                .map_or(soft.clone(), |(_, module)| module.to_string());
            if files.contains_key(&soft) {
                visit(&soft, modules, files, builtin, done, order, absent)?;
            }
        }
        for deps in modinfo(&bytes, "depends") {
            for dep in deps.split(',').filter(|d| !d.is_empty()) {
                visit(
                    &canonical(dep),
                    modules,
                    files,
                    builtin,
                    done,
                    order,
                    absent,
                )?;
            }
        }
        order.push(rel.clone());
        Ok(())
    }
    for name in wanted {
        visit(
            &canonical(name),
            modules,
            &files,
            &builtin,
            &mut done,
            &mut order,
            &mut absent,
        )?;
    }
    Ok(Resolved { order, absent })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_abi_wins_by_number_not_text() {
        let search = "linux-image-6.1.0-9-amd64 - Linux 6.1\n\
                      linux-image-6.1.0-57-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                      linux-image-6.1.0-10-amd64 - Linux 6.1\n\
                      linux-image-6.1.0-57-amd64-dbg - debug\n";
        assert_eq!(
            newest_of(search).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(newest_of("nothing here\n"), None);
    }

    #[test]
    fn modinfo_fields_and_soft_predependencies() {
        let file = b"\x7fELF junk\0license=GPL\0softdep=pre: crc32c post: x\0depends=libcrc32c,nf_conntrack\0name=ip_vs\0";
        assert_eq!(
            modinfo(file, "depends"),
            vec!["libcrc32c,nf_conntrack".to_string()]
        );
        let soft = modinfo(file, "softdep");
        assert_eq!(soft_pre(&soft[0]), vec!["crc32c".to_string()]);
        assert!(modinfo(file, "alias").is_empty());
    }
}
