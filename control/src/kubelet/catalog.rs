//! The image catalog: kpx-kubelet pulls no images. An image name maps to a built-in workload
//! (run by the `kpx-workload` binary) or to the host's own commands, so the Kubernetes
//! documentation's YAML runs unchanged. Pure: it decides the argv, the runtime starts it.

use std::path::{Path, PathBuf};

/// What a container runs: the program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub argv: Vec<String>,
}

/// Why a container cannot be started; `reason` is the waiting reason kubelet reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchError {
    pub reason: &'static str,
    pub message: String,
}

/// The images the catalog knows, for error messages and the README.
pub const KNOWN_IMAGES: &[&str] = &[
    "nginx",
    "registry.k8s.io/e2e-test-images/agnhost",
    "registry.k8s.io/serve_hostname",
    "registry.k8s.io/pause",
    "busybox",
    "alpine",
    "debian",
    "ubuntu",
    "kpx/workload",
];

/// Built-in images whose entrypoint is a host shell when a `command` is given or the
/// image's default is a shell.
const HOST_IMAGES: &[&str] = &["busybox", "alpine", "debian", "ubuntu"];

/// `docker.io/library/nginx:1.14.2` → (`nginx`, `1.14.2`); digests dropped.
pub fn split_image(image: &str) -> (String, String) {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A colon after the last slash is a tag; before it, a registry port.
    let (name, tag) = match without_digest.rfind(':') {
        Some(i) if !without_digest[i..].contains('/') => {
            (&without_digest[..i], &without_digest[i + 1..])
        }
        _ => (without_digest, "latest"),
    };
    let name = name
        .strip_prefix("docker.io/")
        .or_else(|| name.strip_prefix("index.docker.io/"))
        .unwrap_or(name);
    let name = name.strip_prefix("library/").unwrap_or(name);
    // The old registry names of the e2e images are the same images.
    let name = name.replace("k8s.gcr.io/", "registry.k8s.io/").replace(
        "gcr.io/kubernetes-e2e-test-images/",
        "registry.k8s.io/e2e-test-images/",
    );
    (name, tag.to_string())
}

/// A container's image, command and args, as the catalog runs them. `workload` is the
/// `kpx-workload` binary; `path` the `PATH` host commands are looked up in.
pub fn resolve(
    image: &str,
    command: &[String],
    args: &[String],
    workload: &Path,
    path: &str,
) -> Result<Launch, LaunchError> {
    let (name, tag) = split_image(image);
    let builtin = |mut argv: Vec<String>| {
        argv.insert(0, workload.display().to_string());
        Ok(Launch { argv })
    };
    // An explicit command replaces any image's entrypoint: it runs on the host.
    if !command.is_empty() && is_known(&name) {
        return host(command.iter().chain(args).cloned().collect(), path);
    }
    match name.as_str() {
        "nginx" => {
            // nginx's own arguments (`-g 'daemon off;'`) have no meaning for the stand-in.
            builtin(strings(&["--serve", "nginx", "--version-label", &tag]))
        }
        "registry.k8s.io/e2e-test-images/agnhost" => agnhost(args).and_then(builtin),
        "registry.k8s.io/serve_hostname" => builtin(strings(&["--serve", "serve-hostname"])),
        "registry.k8s.io/pause" => builtin(strings(&["--serve", "pause"])),
        "kpx/workload" => builtin(args.to_vec()),
        n if HOST_IMAGES.contains(&n) => {
            let argv: Vec<String> = if args.is_empty() {
                vec!["sh".into()]
            } else {
                // The images' entrypoint is empty: args alone are the command.
                args.to_vec()
            };
            host(argv, path)
        }
        _ => Err(LaunchError {
            reason: "ErrImagePull",
            message: format!(
                "image {image:?} is not in kpx-kubelet's image catalog (kpx pulls no images); \
                 known images: {}",
                KNOWN_IMAGES.join(", ")
            ),
        }),
    }
}

fn is_known(name: &str) -> bool {
    KNOWN_IMAGES.contains(&name)
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// agnhost's subcommands that are built in, with their flags mapped onto kpx-workload's.
fn agnhost(args: &[String]) -> Result<Vec<String>, LaunchError> {
    let (sub, flags) = match args.split_first() {
        Some((sub, flags)) => (sub.as_str(), flags),
        None => ("netexec", &[][..]),
    };
    let flag = |name: &str| {
        flags.iter().enumerate().find_map(|(i, f)| {
            let f = f.trim_start_matches('-');
            if let Some(v) = f.strip_prefix(&format!("{name}=")) {
                Some(v.to_string())
            } else if f == name {
                flags.get(i + 1).cloned()
            } else {
                None
            }
        })
    };
    match sub {
        "netexec" => {
            let mut argv = strings(&["--serve", "netexec"]);
            argv.extend([
                "--http-port".into(),
                flag("http-port").unwrap_or("8080".into()),
            ]);
            argv.extend(["--port".into(), flag("udp-port").unwrap_or("8081".into())]);
            Ok(argv)
        }
        "serve-hostname" => {
            let mut argv = strings(&["--serve", "serve-hostname"]);
            if let Some(port) = flag("port") {
                argv.extend(["--port".into(), port]);
            }
            Ok(argv)
        }
        "pause" => Ok(strings(&["--serve", "pause"])),
        other => Err(LaunchError {
            reason: "CreateContainerError",
            message: format!(
                "agnhost subcommand {other:?} is not built into kpx; allowed values: netexec, \
                 serve-hostname, pause"
            ),
        }),
    }
}

/// A host command, found on `path` (or given as a path) before anything starts.
fn host(argv: Vec<String>, path: &str) -> Result<Launch, LaunchError> {
    let program = argv.first().cloned().unwrap_or_default();
    if find_program(&program, path).is_none() {
        return Err(LaunchError {
            reason: "CreateContainerError",
            message: format!(
                "failed to create containerd task: exec: {program:?}: executable file not found \
                 in $PATH"
            ),
        });
    }
    Ok(Launch { argv })
}

/// Where `program` would be executed from.
pub fn find_program(program: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    path.split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/usr/bin:/bin";

    fn run(image: &str, command: &[&str], args: &[&str]) -> Result<Vec<String>, LaunchError> {
        resolve(
            image,
            &strings(command),
            &strings(args),
            Path::new("/w"),
            PATH,
        )
        .map(|l| l.argv)
    }

    #[test]
    fn image_names_are_normalised() {
        assert_eq!(split_image("nginx"), ("nginx".into(), "latest".into()));
        assert_eq!(
            split_image("docker.io/library/nginx:1.14.2"),
            ("nginx".into(), "1.14.2".into())
        );
        assert_eq!(
            split_image("localhost:5000/app"),
            ("localhost:5000/app".into(), "latest".into())
        );
        assert_eq!(
            split_image("k8s.gcr.io/serve_hostname@sha256:abc").0,
            "registry.k8s.io/serve_hostname"
        );
    }

    #[test]
    fn built_in_workloads() {
        assert_eq!(
            run("nginx:1.14.2", &[], &[]).expect("nginx"),
            ["/w", "--serve", "nginx", "--version-label", "1.14.2"]
        );
        assert_eq!(
            run(
                "registry.k8s.io/e2e-test-images/agnhost:2.39",
                &[],
                &["netexec", "--http-port=8080", "--udp-port", "8081"]
            )
            .expect("agnhost"),
            [
                "/w",
                "--serve",
                "netexec",
                "--http-port",
                "8080",
                "--port",
                "8081"
            ]
        );
        assert_eq!(
            run("registry.k8s.io/pause:3.9", &[], &[]).expect("pause"),
            ["/w", "--serve", "pause"]
        );
    }

    #[test]
    fn commands_run_on_the_host() {
        assert_eq!(
            run("busybox:1.28", &["sh", "-c", "echo hi"], &[]).expect("sh"),
            ["sh", "-c", "echo hi"]
        );
        assert_eq!(
            run("busybox", &[], &["sleep", "3600"]).expect("args"),
            ["sleep", "3600"]
        );
        // A command replaces a built-in image's entrypoint too.
        assert_eq!(
            run("nginx", &["sleep"], &["5"]).expect("override"),
            ["sleep", "5"]
        );
    }

    #[test]
    fn what_cannot_run_is_said_clearly() {
        let e = run("example.com/app:v1", &[], &[]).expect_err("unknown image");
        assert_eq!(e.reason, "ErrImagePull");
        assert!(
            e.message.contains("not in kpx-kubelet's image catalog"),
            "{}",
            e.message
        );
        assert!(e.message.contains("nginx"), "{}", e.message);
        let e = run("busybox", &["no-such-command-kpx"], &[]).expect_err("missing command");
        assert_eq!(e.reason, "CreateContainerError");
        assert!(e
            .message
            .contains("\"no-such-command-kpx\": executable file not found"));
        let e = run(
            "registry.k8s.io/e2e-test-images/agnhost:2.39",
            &[],
            &["dns-server"],
        )
        .expect_err("unknown subcommand");
        assert!(
            e.message.contains("allowed values: netexec"),
            "{}",
            e.message
        );
    }
}
