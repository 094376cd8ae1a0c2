//! Running as a service: SIGTERM drains (real daemons, real transfers), systemd's readiness
//! protocol on a socket the test binds, `ferry config`, the install script and the unit file
//! (checked by `systemd-analyze`).

use ferry_engine::config::Config;
use ferry_engine::proto::{self, transfer_event::Event};
use ferry_tests::*;
use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

/// A seed holding a 256 MiB file (64 pieces of 4 MiB).
async fn seeded(root: &Path) -> (PathBuf, String, Daemon) {
    let source = root.join("file.bin");
    random_file(&source, 256 * MIB, 11);
    let seed = Daemon::start(root, "seed", DaemonOptions::default()).await;
    let task = seed.import(&source).await;
    assert_eq!(task.piece_count, 64);
    (source, task.task_id, seed)
}

fn drain_args(secs: u64, extra: &[&str]) -> DaemonOptions {
    let mut args = vec!["--drain-timeout".to_owned(), secs.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    DaemonOptions {
        extra_args: args,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_transfer_drains_and_a_restart_fetches_only_what_is_missing() {
    let root = scratch("drain");
    let (source, task_id, seed) = seeded(root.path()).await;
    let drain_timeout = 20;
    let mut receiver = Daemon::start(root.path(), "receiver", drain_args(drain_timeout, &[])).await;
    let output = root.path().join("out.bin");
    let mut request = pull_request(&task_id, &[&seed.data_address], &output);
    request.streams_per_source = 1;

    let mut reported = HashSet::new();
    let mut signalled_at = None;
    let first = transfer(&mut receiver.client().await, request, |piece| {
        reported.insert(piece.number);
        if reported.len() == 5 && signalled_at.is_none() {
            receiver.signal("TERM");
            signalled_at = Some(Instant::now());
        }
    })
    .await;
    let signalled_at = signalled_at.expect("five pieces arrived before the end");
    let status = first.expect_err("the drain stops the transfer before its end");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("draining"), "{status:?}");
    let exit = receiver
        .wait_exit(Duration::from_secs(drain_timeout + 15))
        .await
        .expect("the daemon exits within the drain bound");
    assert!(exit.success(), "a drained daemon exits 0: {exit:?}");
    let took = signalled_at.elapsed();
    assert!(
        took < Duration::from_secs(drain_timeout),
        "pieces in flight finish in moments, well inside the drain timeout: {took:?}"
    );
    assert!(
        !output.exists(),
        "an unfinished transfer places nothing at the output"
    );
    let log = receiver.log_text();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("drained"), "{log}");
    assert!(
        !log.contains("drain timeout passed"),
        "nothing was cancelled: {log}"
    );
    assert!(
        !receiver.control.exists(),
        "the control socket is removed on exit"
    );

    let data_dir = receiver.data_dir.clone();
    let receiver = Daemon::start(
        root.path(),
        "receiver",
        DaemonOptions {
            data_dir: Some(data_dir),
            ..Default::default()
        },
    )
    .await;
    let held: HashSet<u32> = receiver
        .stat(&task_id)
        .await
        .pieces
        .iter()
        .filter(|p| p.held)
        .map(|p| p.number)
        .collect();
    assert!(
        reported.is_subset(&held),
        "every piece reported before the exit is held after the restart: reported {reported:?}, held {held:?}"
    );
    assert!(
        held.len() < 64,
        "the drain stopped the transfer early ({} held)",
        held.len()
    );

    let second = pull(&receiver, &task_id, &[&seed.data_address], &output).await;
    let summary = second.summary.unwrap();
    assert_eq!(summary.pieces_reused as usize, held.len());
    assert_eq!(summary.pieces_fetched as usize, 64 - held.len());
    for piece in &second.pieces {
        assert!(
            !held.contains(&piece.number),
            "piece {} was held yet fetched again",
            piece.number
        );
    }
    assert!(same_contents(&source, &output));
}

/// A peer that accepts connections and never answers: a piece fetched from it stays in flight
/// until the I/O timeout. Each accepted connection is announced on the channel.
struct SilentPeer {
    address: String,
    connected: std::sync::mpsc::Receiver<()>,
}

fn silent_peer() -> SilentPeer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, connected) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            held.push(stream);
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    SilentPeer { address, connected }
}

/// Starts a transfer of an 8 MiB task from a silent peer and returns its event stream once a
/// piece is in flight (the daemon connected to the peer).
async fn transfer_stuck_on(
    daemon: &Daemon,
    peer: &SilentPeer,
    task_id: &str,
) -> tonic::Streaming<proto::TransferEvent> {
    let request = proto::TransferPiecesRequest {
        task_id: task_id.into(),
        content_length: 8 * MIB,
        piece_length: 4 * MIB,
        sources: vec![peer.address.clone()],
        streams_per_source: 1,
        ..Default::default()
    };
    let mut stream = daemon
        .client()
        .await
        .transfer_pieces(request)
        .await
        .expect("transfer accepted")
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Started(_))), "{first:?}");
    peer.connected
        .recv_timeout(Duration::from_secs(10))
        .expect("the daemon connects to the peer for its first piece");
    stream
}

/// Waits until the daemon's health service says NOT_SERVING: the drain has begun.
async fn wait_until_draining(daemon: &Daemon) {
    let mut health = HealthClient::new(
        ferry_engine::cli::channel(daemon.control.to_str().unwrap())
            .await
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "ferry.v1.Ferry".into(),
            })
            .await
            .expect("the control API keeps answering while draining")
            .into_inner()
            .status;
        if status == ServingStatus::NotServing as i32 {
            return;
        }
        assert!(Instant::now() < deadline, "the drain never began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const STUCK_TASK: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_refuses_new_work_waits_for_pieces_in_flight_then_cancels_at_its_timeout() {
    let root = scratch("drain-timeout");
    let file = root.path().join("small.bin");
    random_file(&file, 5 * MIB, 2);
    let drain_timeout = 3;
    let mut daemon = Daemon::start(
        root.path(),
        "daemon",
        drain_args(drain_timeout, &["--io-timeout", "120"]),
    )
    .await;
    let peer = silent_peer();
    let mut stuck = transfer_stuck_on(&daemon, &peer, STUCK_TASK).await;

    daemon.signal("TERM");
    let signalled_at = Instant::now();
    wait_until_draining(&daemon).await;
    let mut client = daemon.client().await;
    // New transfers and imports are refused, precisely; reading still works.
    let refused = client
        .transfer_pieces(pull_request(
            STUCK_TASK,
            &[&peer.address],
            &root.path().join("x"),
        ))
        .await
        .expect_err("no new transfer while draining");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("draining") && refused.message().contains("transfers"),
        "{refused:?}"
    );
    let refused = client
        .import_task(proto::ImportTaskRequest {
            path: file.display().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("no new import while draining");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("draining") && refused.message().contains("imports"),
        "{refused:?}"
    );
    let tasks = client
        .list_tasks(proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(
        tasks
            .iter()
            .any(|t| t.task_id == STUCK_TASK && t.transferring),
        "{tasks:?}"
    );

    // The piece in flight never arrives: at the drain timeout the transfer is cancelled.
    let ended = loop {
        match stuck.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stuck transfer ended without a status"),
            Err(status) => break status,
        }
    };
    let waited = signalled_at.elapsed();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("drain"), "{ended:?}");
    assert!(
        waited >= Duration::from_secs(drain_timeout) - Duration::from_millis(500),
        "the drain waited for the piece in flight: {waited:?}"
    );
    let exit = daemon
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the daemon exits soon after its drain timeout");
    assert!(exit.success(), "{exit:?}");
    assert!(
        signalled_at.elapsed() < Duration::from_secs(drain_timeout + 8),
        "exit bounded by the drain timeout and a short grace: {:?}",
        signalled_at.elapsed()
    );
    let log = daemon.log_text();
    assert!(log.contains("drain timeout passed"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_cuts_the_drain_short() {
    let root = scratch("drain-second-signal");
    let mut daemon = Daemon::start(
        root.path(),
        "daemon",
        drain_args(600, &["--io-timeout", "120"]),
    )
    .await;
    let peer = silent_peer();
    let mut stuck = transfer_stuck_on(&daemon, &peer, STUCK_TASK).await;
    daemon.signal("TERM");
    wait_until_draining(&daemon).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(daemon.is_running(), "still waiting for the piece in flight");
    let second_at = Instant::now();
    daemon.signal("INT");
    let ended = loop {
        match stuck.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stuck transfer ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let exit = daemon
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the second signal ends the drain");
    assert!(exit.success(), "{exit:?}");
    assert!(
        second_at.elapsed() < Duration::from_secs(10),
        "{:?}",
        second_at.elapsed()
    );
    assert!(daemon.log_text().contains("second signal"));
}

/// A `ferry serve` started directly (not through the harness, which waits for the control
/// socket itself), killed when dropped.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_once_the_listeners_are_bound_and_stopping_on_sigterm() {
    let root = scratch("notify");
    let dir = root.path();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let control = dir.join("control.sock");
    let log = dir.join("daemon.log");
    let mut daemon = Spawned(
        Command::new(ferry_bin())
            .arg("--control")
            .arg(&control)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0", "--pool-mib", "128"])
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let ready = tokio::task::block_in_place(|| receive(&notify));
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "the first notification is READY: {ready:?}"
    );
    // Connected at once, no retry: both listeners were bound before READY was sent.
    let caps = ferry_engine::cli::connect(control.to_str().unwrap())
        .await
        .expect("control socket bound before READY")
        .get_capabilities(proto::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    std::net::TcpStream::connect(&caps.data_address).expect("data port bound before READY");
    assert!(
        ready.contains(&format!("STATUS=serving: data plane {}", caps.data_address)),
        "{ready:?}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopping = tokio::task::block_in_place(|| receive(&notify));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = daemon.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        exit.success(),
        "{exit:?}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}

fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .env_remove("FERRY_CONTROL")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/ferry.example.toml")
}

#[test]
fn ferry_config_prints_defaults_then_the_file_then_the_flags() {
    let root = scratch("config");
    let file = root.path().join("ferry.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:5000\"\ndrain_timeout_secs = 12\n[transfer]\nstreams_per_source = 8\nio_timeout_secs = 7\n",
    )
    .unwrap();
    let out = ferry(&[
        "--control",
        "/run/ferry-elsewhere/control.sock",
        "config",
        "--config",
        file.to_str().unwrap(),
        "--streams-per-source",
        "2",
        "--data-dir",
        "/srv/ferry",
        "--metrics",
        "127.0.0.1:9100",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: Config = toml::from_str(&text(&out.stdout)).expect("the output is a config");
    assert_eq!(config.listen, "127.0.0.1:5000", "from the file");
    assert_eq!(config.drain_timeout_secs, 12, "from the file");
    assert_eq!(config.transfer.io_timeout_secs, 7, "from the file");
    assert_eq!(config.transfer.streams_per_source, 2, "the flag wins");
    assert_eq!(config.data_dir, Path::new("/srv/ferry"), "from a flag");
    assert_eq!(
        config.control, "/run/ferry-elsewhere/control.sock",
        "from --control"
    );
    // A relative control socket is made absolute: the daemon and its clients may run from
    // different directories.
    let relative = Command::new(ferry_bin())
        .current_dir(root.path())
        .args(["--control", "ctl.sock", "config"])
        .output()
        .unwrap();
    assert!(relative.status.success(), "{}", text(&relative.stderr));
    let from_relative: Config = toml::from_str(&text(&relative.stdout)).unwrap();
    assert_eq!(
        Path::new(&from_relative.control),
        root.path().join("ctl.sock"),
        "relative to where ferry ran"
    );
    assert_eq!(config.metrics.listen, "127.0.0.1:9100", "from a flag");
    assert_eq!(config.pool.size_mib, 0, "a default (sized from the NICs)");
    assert_eq!(config.transfer.max_attempts, 4, "a default");

    let json = ferry(&["--json", "config", "--config", file.to_str().unwrap()]);
    assert!(json.status.success(), "{}", text(&json.stderr));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["transfer"]["streams_per_source"], 8);

    // The documented example is exactly the defaults.
    let defaults = ferry(&["config"]);
    let example = ferry(&["config", "--config", example_config().to_str().unwrap()]);
    assert!(defaults.status.success() && example.status.success());
    assert_eq!(text(&defaults.stdout), text(&example.stdout));
}

#[test]
fn a_bad_value_is_refused_naming_the_key_and_what_is_allowed() {
    let root = scratch("bad-config");
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("[pool]\nslot_mib = 0\n", &[], &["pool.slot_mib", "1 to 64"]),
        (
            "",
            &["--drain-timeout", "4000"],
            &["drain_timeout_secs", "0 to 3600"],
        ),
        (
            "",
            &["--streams-per-source", "129"],
            &[
                "transfer.streams_per_source",
                "0 (follow the rails) or 1 to 128",
            ],
        ),
        (
            "control = \"relative.sock\"\n",
            &[],
            &["control", "absolute unix socket path"],
        ),
        (
            "advertise = \"10.0.0.5\"\n",
            &[],
            &["advertise", "host:port"],
        ),
        ("[rdma]\nport = 0\n", &[], &["rdma.port", "1 to 255"]),
        ("bogus = 1\n", &[], &["bogus"]),
        (
            "[io]\nthreads = \"two\"\n",
            &[],
            &["threads", "expected usize"],
        ),
    ];
    for (i, (contents, flags, expected)) in cases.iter().enumerate() {
        let file = root.path().join(format!("bad-{i}.toml"));
        std::fs::write(&file, contents).unwrap();
        let mut args = vec!["config", "--config", file.to_str().unwrap()];
        args.extend_from_slice(flags);
        let out = ferry(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{contents:?} {flags:?} was accepted");
        assert!(out.stdout.is_empty(), "nothing printed as if valid");
        for word in *expected {
            assert!(
                stderr.contains(word),
                "{contents:?} {flags:?}: {stderr:?} lacks {word:?}"
            );
        }
    }

    // `ferry serve` refuses it at start-up the same way, before touching anything.
    let file = root.path().join("bad-0.toml");
    let data_dir = root.path().join("data");
    let started = Instant::now();
    let out = ferry(&[
        "--control",
        root.path().join("c.sock").to_str().unwrap(),
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid config value pool.slot_mib = 0: 1 to 64"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!data_dir.exists(), "nothing created for a refused config");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn install(destdir: &Path, extra: &[&str]) -> Output {
    let out = Command::new(repo_root().join("scripts/install.sh"))
        .arg("--destdir")
        .arg(destdir)
        .arg("--binary")
        .arg(ferry_bin())
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// `systemd-analyze`, or None where it is missing (a failure on CI, where setup.sh installs it).
fn systemd_analyze() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("systemd-analyze"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing (scripts/setup.sh installs the systemd package)"
        );
        eprintln!("systemd-analyze is missing: the unit file was not verified");
    }
    found
}

#[test]
fn install_script_stages_binary_unit_and_config_and_the_unit_verifies() {
    let root = scratch("install");
    let dest = root.path().join("root");
    let out = install(&dest, &[]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("systemctl enable --now ferry"), "{stdout}");
    assert!(stdout.contains("nothing on this system was changed"));
    let binary = dest.join("usr/local/bin/ferry");
    let unit = dest.join("etc/systemd/system/ferry.service");
    let config = dest.join("etc/ferry/ferry.toml");
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert!(version.status.success());
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(unit_text
        .lines()
        .any(|l| l == "ExecStart=/usr/local/bin/ferry serve --config /etc/ferry/ferry.toml"));
    // The installed config is the documented example for /var/lib/ferry, and valid.
    let shown = Command::new(&binary)
        .args(["config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let installed: Config = toml::from_str(&text(&shown.stdout)).unwrap();
    assert_eq!(installed.data_dir, Path::new("/var/lib/ferry"));
    assert_eq!(installed.control, "/run/ferry/control.sock");
    assert_eq!(text(&shown.stdout), text(&ferry(&["config"]).stdout));

    // A second install keeps a changed config; another prefix moves the binary and ExecStart.
    std::fs::write(&config, "drain_timeout_secs = 5\n").unwrap();
    let again = install(&dest, &["--prefix", "/opt/ferry"]);
    assert!(text(&again.stdout).contains("kept the existing"));
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "drain_timeout_secs = 5\n"
    );
    assert!(dest.join("opt/ferry/bin/ferry").is_file());
    let moved = std::fs::read_to_string(&unit).unwrap();
    assert!(
        moved.contains("\nExecStart=/opt/ferry/bin/ferry serve --config /etc/ferry/ferry.toml\n")
    );

    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // `verify` checks that ExecStart's binary exists; without a running systemd (or root),
    // point it at the staged binary. Everything else is the installed unit, byte for byte.
    let checked = root.path().join("ferry-under-test.service");
    std::fs::write(
        &checked,
        unit_text.replace(
            "ExecStart=/usr/local/bin/ferry ",
            &format!("ExecStart={} ", binary.display()),
        ),
    )
    .unwrap();
    let verify = Command::new(&analyze)
        .arg("verify")
        .arg(&checked)
        .output()
        .unwrap();
    let said = format!("{}{}", text(&verify.stdout), text(&verify.stderr));
    assert!(verify.status.success(), "systemd-analyze verify: {said}");
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("ferry-under-test.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify warns: {complaints:#?}"
    );

    // The sandboxing holds up: systemd's own exposure score (0 safest, 10 unsandboxed).
    let security = Command::new(&analyze)
        .args(["security", "--offline=true"])
        .arg(&checked)
        .output()
        .unwrap();
    let report = text(&security.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for ferry-under-test.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score: {report}{}", text(&security.stderr)));
    assert!(score <= 3.0, "exposure {score}:\n{report}");
}
