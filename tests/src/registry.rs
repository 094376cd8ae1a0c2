//! A real OCI registry for the model tests: Debian's `docker-registry` (CNCF distribution
//! 2.8) on a loopback port with a temporary storage dir, optionally behind htpasswd basic
//! auth; and `tests/oci_push.py`, an independent pusher speaking the distribution API with
//! Python's standard library only.

use crate::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub storage: PathBuf,
    config: PathBuf,
}

impl Registry {
    /// Starts a registry under `dir` (storage `dir/storage`); with `basic_auth`, an
    /// htpasswd (bcrypt) file with that user and password.
    pub fn start(dir: &Path, basic_auth: Option<(&str, &str)>) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let storage = dir.join("storage");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, password)) = basic_auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils, installed by scripts/setup.sh)");
            assert!(out.status.success());
            let htpasswd = dir.join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: ferry-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut registry = Registry {
            child: None,
            port,
            dir: dir.to_owned(),
            storage,
            config: config_path,
        };
        registry.restart();
        registry
    }

    /// (Re)starts the process on the same port and storage, and waits until `/v2/` answers.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("registry.log"))
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (installed by scripts/setup.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not come up: {}",
                std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process (the storage stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `oci://127.0.0.1:PORT/<repo_tag>`
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("oci://{}/{repo_tag}", self.host())
    }

    /// The file the registry keeps a blob's bytes in.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `tests/oci_push.py` with a JSON spec (see the script); returns its stdout (the
/// manifest digest) or panics with its stderr.
pub fn python_push(
    registry: &str,
    repo_tag: &str,
    spec: &serde_json::Value,
    auth: Option<(&str, &str)>,
) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("oci_push.py");
    let mut command = Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()));
    command
        .arg(script)
        .arg(registry)
        .arg(repo_tag)
        .arg(spec.to_string());
    if let Some((user, password)) = auth {
        command.env("OCI_USER", user).env("OCI_PASSWORD", password);
    }
    let out = command.output().expect("python3");
    assert!(
        out.status.success(),
        "oci_push.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `tests/token_proxy.py`: the distribution spec's token flow (401 + `WWW-Authenticate:
/// Bearer realm=...`, a token endpoint taking Basic credentials) in front of a registry.
/// Killed when dropped.
pub struct TokenProxy {
    child: Child,
    pub port: u16,
}

impl TokenProxy {
    pub fn start(upstream: &Registry, user: &str, password: &str) -> TokenProxy {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("token_proxy.py");
        let mut child =
            Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()))
                .arg(script)
                .arg(upstream.port.to_string())
                .args([user, password])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("reading the proxy's port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the token proxy printed {line:?}"));
        TokenProxy { child, port }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `{"tokens", "unauthorized", "forwarded", "scopes"}`.
    pub async fn stats(&self) -> serde_json::Value {
        let (status, body) = crate::http_get(&self.host(), "/_stats").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for TokenProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
