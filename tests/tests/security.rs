//! Security: the control API over TCP only with TLS and client authentication, imports only
//! from the configured directories, and the data port's caps on connections and request time.
//! Real daemons, real TLS (certificates made here with rcgen), real sockets.

use ferry_engine::proto::{self, ferry_client::FerryClient};
use ferry_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tonic::Code;

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as
/// PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ferry test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["ferry-client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            path
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }
}

fn write_file(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_owned()
}

/// `ferry` with a clean environment (no FERRY_* from the caller).
fn ferry() -> Command {
    let mut command = Command::new(ferry_bin());
    for var in [
        "FERRY_CONTROL",
        "FERRY_TOKEN",
        "FERRY_TOKEN_FILE",
        "FERRY_TLS_CA",
        "FERRY_TLS_CERT",
        "FERRY_TLS_KEY",
        "FERRY_TLS_DOMAIN",
    ] {
        command.env_remove(var);
    }
    command
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_control_api_needs_tls_and_the_token() {
    let root = scratch("tls-token");
    let pki = Pki::new(&root.path().join("pki"));
    let token = "ferry-test-token-6b1f0c2e9a";
    let token_file = write_file(&root.path().join("token"), &format!("{token}\n"));
    let config = write_file(
        &root.path().join("ferry.toml"),
        &format!(
            "[control_tcp]\ntls_cert = {:?}\ntls_key = {:?}\ntoken_file = {:?}\n",
            pki.server_cert, pki.server_key, token_file
        ),
    );
    let control = format!("tcp://127.0.0.1:{}", free_port());
    let ca_pem = std::fs::read(&pki.ca).unwrap();
    let auth = ClientAuth {
        ca_pem: Some(ca_pem.clone()),
        token: Some(token.into()),
        ..Default::default()
    };
    let daemon = Daemon::start(
        root.path(),
        "daemon",
        DaemonOptions {
            control: Some(control.clone()),
            auth: auth.clone(),
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    )
    .await;
    assert!(daemon.log_text().contains("control API on TCP with TLS"));

    // The CLI with the CA and the token file imports and lists.
    let source = root.path().join("file.bin");
    random_file(&source, 5 * MIB, 1);
    let out = ferry()
        .args(["--control", &control, "--json", "--tls-ca"])
        .arg(&pki.ca)
        .arg("--token-file")
        .arg(&token_file)
        .arg("import")
        .arg(&source)
        .output()
        .unwrap();
    assert!(out.status.success(), "import over TLS: {}", stderr(&out));
    let imported: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let task_id = imported["task_id"].as_str().unwrap().to_owned();
    // The token from FERRY_TOKEN, the CA from FERRY_TLS_CA.
    let out = ferry()
        .args(["--control", &control, "--json", "stat", &task_id])
        .env("FERRY_TOKEN", token)
        .env("FERRY_TLS_CA", &pki.ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "stat over TLS: {}", stderr(&out));
    let stat: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stat["complete"], true);

    // A wrong token and no token: UNAUTHENTICATED, from the CLI and from a gRPC client.
    let wrong_file = write_file(&root.path().join("wrong-token"), "not-the-token");
    for token_args in [
        vec!["--token-file".to_owned(), wrong_file.display().to_string()],
        vec![],
    ] {
        let out = ferry()
            .args(["--control", &control, "tasks", "--tls-ca"])
            .arg(&pki.ca)
            .args(&token_args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("Unauthenticated"),
            "{token_args:?}: {}",
            stderr(&out)
        );
    }
    for (what, token) in [
        ("wrong token", Some("not-the-token".to_owned())),
        ("a prefix of the token", Some(token[..10].to_owned())),
        ("no token", None),
    ] {
        let auth = ClientAuth {
            token,
            ..auth.clone()
        };
        let mut client = ferry_engine::cli::connect_with(&control, &auth)
            .await
            .unwrap();
        let status = client
            .list_tasks(proto::ListTasksRequest {})
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    }
    // The health service is behind the token too.
    let channel = ferry_engine::cli::channel_with(
        &control,
        &ClientAuth {
            token: None,
            ..auth.clone()
        },
    )
    .await
    .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ferry.v1.Ferry".into(),
        })
        .await
        .expect_err("health without a token");
    assert_eq!(status.code(), Code::Unauthenticated);

    // Plain text gets nowhere: the listener speaks only TLS.
    let plain = match ferry_engine::cli::channel(&control).await {
        Err(_) => None,
        Ok(channel) => Some(
            FerryClient::new(channel)
                .list_tasks(proto::ListTasksRequest {})
                .await,
        ),
    };
    assert!(
        !matches!(plain, Some(Ok(_))),
        "a plain-text client was answered"
    );
    let out = ferry()
        .args(["--control", &control, "tasks"])
        .env("FERRY_TOKEN", token)
        .output()
        .unwrap();
    assert!(!out.status.success(), "plain-text CLI was answered");
    assert!(stderr(&out).contains("--tls-ca"), "{}", stderr(&out));
    // A certificate from another CA is not trusted.
    let other = Pki::new(&root.path().join("other-pki"));
    let untrusted = ClientAuth {
        ca_pem: Some(std::fs::read(&other.ca).unwrap()),
        ..auth.clone()
    };
    let reached = match ferry_engine::cli::connect_with(&control, &untrusted).await {
        Err(_) => false,
        Ok(mut client) => client.list_tasks(proto::ListTasksRequest {}).await.is_ok(),
    };
    assert!(!reached, "a client trusting another CA was answered");

    // After all that, the right client still works.
    let tasks = daemon
        .client()
        .await
        .list_tasks(proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_control_api_with_client_certificates() {
    let root = scratch("mtls");
    let pki = Pki::new(&root.path().join("pki"));
    let config = write_file(
        &root.path().join("ferry.toml"),
        &format!(
            "[control_tcp]\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
            pki.server_cert, pki.server_key, pki.ca
        ),
    );
    let control = format!("tcp://127.0.0.1:{}", free_port());
    let with_cert = ClientAuth {
        ca_pem: Some(std::fs::read(&pki.ca).unwrap()),
        identity_pem: Some((
            std::fs::read(&pki.client_cert).unwrap(),
            std::fs::read(&pki.client_key).unwrap(),
        )),
        // The server certificate names localhost too.
        domain: Some("localhost".into()),
        token: None,
    };
    let daemon = Daemon::start(
        root.path(),
        "daemon",
        DaemonOptions {
            control: Some(control.clone()),
            auth: with_cert.clone(),
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    )
    .await;
    daemon
        .client()
        .await
        .list_tasks(proto::ListTasksRequest {})
        .await
        .expect("a client certificate from the CA is accepted");
    let out = ferry()
        .args(["--control", &control, "--json", "devices", "--tls-ca"])
        .arg(&pki.ca)
        .arg("--tls-cert")
        .arg(&pki.client_cert)
        .arg("--tls-key")
        .arg(&pki.client_key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "CLI with a client certificate: {}",
        stderr(&out)
    );

    // Without a client certificate the handshake fails.
    let without = ClientAuth {
        identity_pem: None,
        ..with_cert.clone()
    };
    let reached = match ferry_engine::cli::connect_with(&control, &without).await {
        Err(_) => false,
        Ok(mut client) => client.list_tasks(proto::ListTasksRequest {}).await.is_ok(),
    };
    assert!(!reached, "a client without a certificate was answered");
    // A certificate from another CA neither.
    let other = Pki::new(&root.path().join("other-pki"));
    let foreign = ClientAuth {
        identity_pem: Some((
            std::fs::read(&other.client_cert).unwrap(),
            std::fs::read(&other.client_key).unwrap(),
        )),
        ..with_cert.clone()
    };
    let reached = match ferry_engine::cli::connect_with(&control, &foreign).await {
        Err(_) => false,
        Ok(mut client) => client.list_tasks(proto::ListTasksRequest {}).await.is_ok(),
    };
    assert!(
        !reached,
        "a client certificate from another CA was accepted"
    );
}

/// Runs `ferry serve` expecting it to refuse to start; returns its stderr.
fn serve_refused(root: &Path, control: &str, config: Option<&Path>) -> String {
    let mut command = ferry();
    command
        .args([
            "--control",
            control,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(root.join("data"));
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            let mut text = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut text).unwrap();
            return text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ferry serve --control {control} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tcp_control_without_tls_or_authentication_is_refused_at_start() {
    let root = scratch("tcp-refused");
    let pki = Pki::new(&root.path().join("pki"));
    let control = format!("tcp://127.0.0.1:{}", free_port());

    let err = serve_refused(root.path(), &control, None);
    assert!(err.contains("control_tcp.tls_cert"), "{err}");

    let no_auth = write_file(
        &root.path().join("no-auth.toml"),
        &format!(
            "[control_tcp]\ntls_cert = {:?}\ntls_key = {:?}\n",
            pki.server_cert, pki.server_key
        ),
    );
    let err = serve_refused(root.path(), &control, Some(&no_auth));
    assert!(err.contains("control_tcp.token_file"), "{err}");
    assert!(err.contains("control_tcp.tls_client_ca"), "{err}");

    let no_key = write_file(
        &root.path().join("no-key.toml"),
        &format!("[control_tcp]\ntls_cert = {:?}\n", pki.server_cert),
    );
    let err = serve_refused(root.path(), &control, Some(&no_key));
    assert!(err.contains("control_tcp.tls_key"), "{err}");

    let missing_token = write_file(
        &root.path().join("missing-token.toml"),
        &format!(
            "[control_tcp]\ntls_cert = {:?}\ntls_key = {:?}\ntoken_file = \"/nonexistent/token\"\n",
            pki.server_cert, pki.server_key
        ),
    );
    let err = serve_refused(root.path(), &control, Some(&missing_token));
    assert!(err.contains("control_tcp.token_file"), "{err}");

    let empty_token = write_file(&root.path().join("empty-token"), "\n");
    let empty = write_file(
        &root.path().join("empty-token.toml"),
        &format!(
            "[control_tcp]\ntls_cert = {:?}\ntls_key = {:?}\ntoken_file = {:?}\n",
            pki.server_cert, pki.server_key, empty_token
        ),
    );
    let err = serve_refused(root.path(), &control, Some(&empty));
    assert!(
        err.contains("control_tcp.token_file") && err.contains("empty"),
        "{err}"
    );

    let not_pem = write_file(&root.path().join("not.pem"), "not a certificate\n");
    let token = write_file(&root.path().join("token"), "a-token-for-the-test");
    let bad_cert = write_file(
        &root.path().join("bad-cert.toml"),
        &format!(
            "[control_tcp]\ntls_cert = {:?}\ntls_key = {:?}\ntoken_file = {:?}\n",
            not_pem, pki.server_key, token
        ),
    );
    let err = serve_refused(root.path(), &control, Some(&bad_cert));
    assert!(err.contains("control_tcp.tls_cert"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_only_from_the_import_dirs() {
    let root = scratch("import-dirs");
    let allowed = root.path().join("allowed");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let inside_file = allowed.join("model.bin");
    random_file(&inside_file, 5 * MIB, 7);
    let outside_file = outside.join("secret.bin");
    random_file(&outside_file, MIB, 8);
    let daemon = Daemon::start(
        root.path(),
        "daemon",
        DaemonOptions {
            import_dirs: Some(vec![allowed.clone()]),
            ..Default::default()
        },
    )
    .await;
    let mut client = daemon.client().await;
    let import = |path: &Path| proto::ImportTaskRequest {
        path: path.display().to_string(),
        ..Default::default()
    };

    let task = client
        .import_task(import(&inside_file))
        .await
        .expect("a file inside import_dirs")
        .into_inner();
    assert!(task.complete);
    // A symlink inside pointing to a file inside is fine: its real path is inside.
    let link_inside = allowed.join("alias.bin");
    std::os::unix::fs::symlink(&inside_file, &link_inside).unwrap();
    client
        .import_task(import(&link_inside))
        .await
        .expect("a symlink resolving inside");

    let denied = |what: &str, result: Result<tonic::Response<proto::Task>, tonic::Status>| {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert!(
            status
                .message()
                .contains("outside the allowed import directories"),
            "{what}: {status:?}"
        );
    };
    denied(
        "a file outside",
        client.import_task(import(&outside_file)).await,
    );
    denied(
        "/etc/passwd",
        client.import_task(import(Path::new("/etc/passwd"))).await,
    );
    denied(
        "a missing file outside (no probing what exists)",
        client
            .import_task(import(&outside.join("missing.bin")))
            .await,
    );
    let dotdot = allowed.join("../outside/secret.bin");
    let status = client
        .import_task(import(&dotdot))
        .await
        .expect_err("a .. path");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .import_task(import(&allowed.join("missing.bin")))
        .await
        .expect_err("a missing file inside");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let escape = allowed.join("escape.bin");
    std::os::unix::fs::symlink(&outside_file, &escape).unwrap();
    denied(
        "a symlink escaping",
        client.import_task(import(&escape)).await,
    );
    let escape_dir = allowed.join("escape-dir");
    std::os::unix::fs::symlink(&outside, &escape_dir).unwrap();
    denied(
        "a symlinked directory escaping",
        client
            .import_task(import(&escape_dir.join("secret.bin")))
            .await,
    );
    // A FIFO inside is refused, without hanging the request.
    let fifo = allowed.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(10), client.import_task(import(&fifo)))
        .await
        .expect("importing a FIFO hung")
        .expect_err("a FIFO");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Nothing outside was stored: one task (the file and its alias share the bytes, not the
    // id: the alias's url differs).
    let tasks = client
        .list_tasks(proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 2);

    // A daemon with no import_dirs imports nothing.
    let closed = Daemon::start(
        root.path(),
        "closed",
        DaemonOptions {
            import_dirs: Some(vec![]),
            ..Default::default()
        },
    )
    .await;
    let status = closed
        .client()
        .await
        .import_task(import(&inside_file))
        .await
        .expect_err("imports disabled");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("import_dirs"), "{status:?}");
}

/// A connection to `addr` from the loopback address `from` (127.0.0.0/8 all reach loopback).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Whether the server answers a Ferry StatTask (for an unknown task: an Error frame) on
/// this connection, i.e. it was accepted and is being served.
async fn is_served(stream: &mut TcpStream) -> bool {
    let mut frame = vec![1u8, 0xF0, 0, 0, 0, 64];
    frame.extend_from_slice(&[b'0'; 64]);
    if stream.write_all(&frame).await.is_err() {
        return false;
    }
    let mut header = [0u8; 6];
    match tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        _ => return false,
    }
    let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut value = vec![0u8; len];
    stream.read_exact(&mut value).await.is_ok() && header[1] == 255
}

/// Whether the server closed the connection without a word within two seconds.
async fn closed_at_once(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await {
        Ok(Ok(0)) => true,
        Ok(Err(err)) => err.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn data_port_caps_connections_per_peer_and_in_total() {
    let root = scratch("caps");
    let source = root.path().join("file.bin");
    random_file(&source, 9 * MIB, 4);
    let config = write_file(
        &root.path().join("ferry.toml"),
        "[server]\nmax_connections = 6\nmax_connections_per_peer = 4\n",
    );
    let seed = Daemon::start(
        root.path(),
        "seed",
        DaemonOptions {
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    )
    .await;
    let task = seed.import(&source).await;
    let addr: SocketAddr = seed.data_address.parse().unwrap();

    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = connect_from("127.0.0.1", addr).await;
        assert!(is_served(&mut stream).await);
        held.push(stream);
    }
    let mut fifth = connect_from("127.0.0.1", addr).await;
    assert!(
        closed_at_once(&mut fifth).await,
        "a fifth connection from one peer was kept"
    );
    // Another peer address still gets in, up to the total.
    for _ in 0..2 {
        let mut stream = connect_from("127.0.0.2", addr).await;
        assert!(is_served(&mut stream).await, "another peer was refused");
        held.push(stream);
    }
    let mut over_total = connect_from("127.0.0.3", addr).await;
    assert!(
        closed_at_once(&mut over_total).await,
        "a connection over max_connections was kept"
    );
    // A flood of refused connections logs a line a second at most (per reason).
    let flood_started = Instant::now();
    for _ in 0..200 {
        let mut stream = connect_from("127.0.0.1", addr).await;
        assert!(closed_at_once(&mut stream).await);
    }
    let flood_secs = flood_started.elapsed().as_secs();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = seed.log_text();
    assert!(
        log.contains("server.max_connections_per_peer reached"),
        "{log}"
    );
    assert!(log.contains("server.max_connections reached"), "{log}");
    let refusal_lines = log.matches("refusing data connection").count() as u64;
    assert!(
        refusal_lines <= 2 * (flood_secs + 2),
        "{refusal_lines} refusal lines in {flood_secs} s of flood:\n{log}"
    );

    // Once they close, an honest transfer gets through.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut probe = connect_from("127.0.0.1", addr).await;
        if is_served(&mut probe).await {
            break;
        }
        assert!(Instant::now() < deadline, "the seed never freed its slots");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let receiver = Daemon::start(
        root.path(),
        "receiver",
        DaemonOptions {
            extra_args: vec!["--streams-per-source".into(), "2".into()],
            ..Default::default()
        },
    )
    .await;
    let output = root.path().join("copy.bin");
    let result = pull(&receiver, &task.task_id, &[&seed.data_address], &output).await;
    assert_eq!(result.summary.unwrap().pieces_fetched, 3);
    assert!(same_contents(&source, &output));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_trickled_a_byte_at_a_time_is_cut_at_the_idle_timeout() {
    let root = scratch("slow-request");
    let config = write_file(
        &root.path().join("ferry.toml"),
        "[server]\nidle_timeout_secs = 2\n",
    );
    let seed = Daemon::start(
        root.path(),
        "seed",
        DaemonOptions {
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    )
    .await;
    let addr: SocketAddr = seed.data_address.parse().unwrap();
    let stream = connect_from("127.0.0.1", addr).await;
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    // A StatTask frame (70 bytes), one byte every 250 ms: each byte comes well within the
    // idle timeout, the whole request does not.
    let trickle = tokio::spawn(async move {
        let mut frame = vec![1u8, 0xF0, 0, 0, 0, 64];
        frame.extend_from_slice(&[b'0'; 64]);
        for byte in frame {
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut rest)).await;
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(closed.is_ok(), "the slow request was never cut");
    assert!(rest.is_empty(), "the slow request was answered");
    assert!(
        elapsed < Duration::from_millis(3500),
        "cut after {elapsed:?}, not at the 2 s idle timeout"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seed.log_text().contains("no complete request within"));
}

#[tokio::test(flavor = "multi_thread")]
async fn only_held_pieces_are_served() {
    let root = scratch("held-only");
    let source = root.path().join("file.bin");
    random_file(&source, 9 * MIB, 6);
    let seed = Daemon::start(root.path(), "seed", DaemonOptions::default()).await;
    let task = seed.import(&source).await;
    // The receiver fetches piece 0 only, and holds a partial task.
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let result = transfer(
        &mut receiver.client().await,
        proto::TransferPiecesRequest {
            task_id: task.task_id.clone(),
            sources: vec![seed.data_address.clone()],
            pieces: vec![0],
            ..Default::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(result.pieces.len(), 1);

    let mut connection = ferry_fallback_tcp::Connection::connect(
        receiver.data_address.parse().unwrap(),
        ferry_fallback_tcp::ClientConfig {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let piece = connection
        .fetch_piece(&task.task_id, 0, 4 * MIB, &mut [&mut buf[..]])
        .await
        .expect("piece 0 is held");
    assert_eq!(
        piece.crc32,
        crc32fast::hash(&std::fs::read(&source).unwrap()[..(4 * MIB) as usize])
    );
    for (task_id, number) in [
        (task.task_id.as_str(), 1),
        (task.task_id.as_str(), 2),
        (task.task_id.as_str(), 3),
        (&"1".repeat(64)[..], 0),
    ] {
        let err = connection
            .fetch_piece(task_id, number, 4 * MIB, &mut [&mut buf[..]])
            .await
            .expect_err("a piece not held");
        assert!(err.is_not_found(), "piece {number} of {task_id}: {err}");
    }
}
