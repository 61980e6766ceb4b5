//! Compiles the BPF programs in `bpf/` with clang (`-target bpf -g -O2`) into `OUT_DIR`, and
//! records the C layout of every map struct for the mirror test. Without clang the build still
//! succeeds (so `cargo check` works): the objects are empty and loading them fails with an
//! error saying how to install clang.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["tc_lb", "sock_lb"];

fn clang() -> Option<String> {
    let candidates = [
        std::env::var("KPX_CLANG").ok(),
        Some("clang-19".into()),
        Some("clang".into()),
    ];
    candidates.into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Where the kernel's UAPI headers for this architecture live (`asm/types.h`).
fn arch_include() -> String {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    format!("/usr/include/{arch}-linux-gnu")
}

fn compile(clang: &str, source: &Path, object: &Path) -> Result<(), String> {
    let out = Command::new(clang)
        .args(["-target", "bpf", "-g", "-O2", "-Wall", "-Werror"])
        .arg(format!("-I{}", arch_include()))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(object)
        .output()
        .map_err(|e| format!("running {clang}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{clang} failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The probe's output: `struct field offset` and `struct SIZE size` lines.
fn layout(out_dir: &Path) -> Result<String, String> {
    let probe = out_dir.join("layout_probe");
    let built = Command::new("cc")
        .args(["-Ibpf", "bpf/layout_probe.c", "-o"])
        .arg(&probe)
        .output()
        .map_err(|e| format!("running cc: {e}"))?;
    if !built.status.success() {
        return Err(String::from_utf8_lossy(&built.stderr).to_string());
    }
    let run = Command::new(&probe)
        .output()
        .map_err(|e| format!("running the layout probe: {e}"))?;
    Ok(String::from_utf8_lossy(&run.stdout).to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=KPX_CLANG");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut missing = String::new();
    match clang() {
        Some(clang) => {
            for name in PROGRAMS {
                let object = out_dir.join(format!("{name}.bpf.o"));
                if let Err(e) = compile(&clang, Path::new(&format!("bpf/{name}.bpf.c")), &object) {
                    panic!("{e}");
                }
            }
        }
        None => {
            missing = "clang is not installed: the BPF programs were not built; install it with \
                       `apt-get install clang-19 libbpf-dev` (or run `cargo xtask deps`) and rebuild"
                .into();
            println!("cargo:warning={missing}");
            for name in PROGRAMS {
                std::fs::write(out_dir.join(format!("{name}.bpf.o")), b"")
                    .expect("writing a placeholder object");
            }
        }
    }
    println!("cargo:rustc-env=KPX_BPF_MISSING={missing}");
    let text = layout(&out_dir).unwrap_or_else(|e| panic!("layout probe: {e}"));
    std::fs::write(out_dir.join("c_layout.txt"), text).expect("writing c_layout.txt");
}
