//! Helpers shared by the API tests: an in-process server, the real binary as a process, and
//! waiting for a condition instead of sleeping.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kpx_control::apiserver::{self, ApiServer, Options};
use kpx_control::client::{Client, ClientConfig};
use kpx_control::store::{EmbeddedStore, EmbeddedStoreOptions, Store};

/// How long `eventually` waits; `KPX_TEST_PATIENCE_SECONDS` stretches it on slow machines.
pub fn patience() -> Duration {
    let seconds = std::env::var("KPX_TEST_PATIENCE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds)
}

/// Polls `check` until it returns Some, or panics with `what` after the patience runs out.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// kpx-control served in this process on a loopback port, on a store in a temp dir.
pub struct TestServer {
    pub address: SocketAddr,
    pub store: Arc<dyn Store>,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(EmbeddedStoreOptions::default(), Options::default()).await
    }

    pub async fn start_with(store_options: EmbeddedStoreOptions, mut options: Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open(&dir.path().join("db"), store_options).expect("open store"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        options.advertise_address = Some(address);
        let server = ApiServer::new(store.clone(), options)
            .await
            .expect("server");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(apiserver::serve(listener, server, async move {
            let _ = rx.await;
        }));
        Self {
            address,
            store,
            dir,
            shutdown: Some(tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn client(&self) -> Client {
        Client::new(&ClientConfig::from_url(&self.url())).expect("client")
    }

    /// A client presenting `token` (for servers started with an authenticator).
    pub fn client_with_token(&self, token: &str) -> Client {
        let mut config = ClientConfig::from_url(&self.url());
        config.token = Some(token.to_string());
        Client::new(&config).expect("client")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The real `kpx-control` binary, started on a free port; killed on drop. It requires a bearer
/// token; `client()` and `kubeconfig()` use the admin token it generated in its data directory.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl ServerProcess {
    /// Starts on `port` (0: any free one).
    pub fn start(data_dir: &Path, port: u16, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kpx-control"))
            .args(["--port", &port.to_string(), "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kpx-control");
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .expect("read the listening line");
        let url = first
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("https://"))
            .unwrap_or_else(|| panic!("unexpected first line from kpx-control: {first:?}"))
            .to_string();
        Self {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The admin token kpx-control generated (`<data-dir>/tokens.csv`, user kpx-admin).
    pub fn token(&self) -> String {
        let text =
            std::fs::read_to_string(self.data_dir.join("tokens.csv")).expect("read tokens.csv");
        text.lines()
            .find_map(|l| {
                let mut f = l.split(',');
                let token = f.next()?;
                (f.next()? == "kpx-admin").then(|| token.to_string())
            })
            .expect("an admin token in tokens.csv")
    }

    /// The generated admin kubeconfig (server, the generated CA, the admin token).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.data_dir.join("admin.kubeconfig")
    }

    pub fn client(&self) -> Client {
        let config = ClientConfig::from_kubeconfig(&self.admin_kubeconfig(), None)
            .expect("admin kubeconfig");
        assert_eq!(config.server, self.url);
        Client::new(&config).expect("client")
    }

    /// A plain HTTPS client that trusts the server's generated CA and presents no token.
    pub fn anonymous_http(&self) -> reqwest::Client {
        let ca = std::fs::read(self.data_dir.join("ca.crt")).expect("ca.crt");
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
            .build()
            .expect("http client")
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A copy of the admin kubeconfig in `dir` (for kubectl and the Python client).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::copy(self.admin_kubeconfig(), &path).expect("copy the admin kubeconfig");
        path
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test that needs an external client either finds it, or says why it is skipped — and
/// fails instead when `KPX_REQUIRE_CLIENTS=1` (as `cargo xtask test` and CI set), so a missing
/// install can never pass silently.
pub fn require_tool(name: &str, found: Option<PathBuf>, how: &str) -> Option<PathBuf> {
    if let Some(path) = found {
        return Some(path);
    }
    let required = std::env::var("KPX_REQUIRE_CLIENTS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{name} is required (KPX_REQUIRE_CLIENTS=1) but was not found: {how}"
    );
    eprintln!("SKIPPED: {name} not found ({how}); run `cargo xtask test` to install it");
    None
}

/// The kubectl to test with: `KPX_KUBECTL`, else Debian's kubernetes-client as `cargo xtask
/// deps` unpacks it under target/tools.
pub fn kubectl() -> Option<PathBuf> {
    let candidates = [
        std::env::var("KPX_KUBECTL").ok().map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/kubectl")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    require_tool(
        "kubectl",
        found,
        "set KPX_KUBECTL or run `cargo xtask deps`",
    )
}
