//! Placing outputs (issue 11): a pull without an output keeps the task in the store, `ferry
//! export` places it later, and placed files get the configured mode and owner whatever the
//! daemon's umask (the unit's is 0077).

use ferry_engine::proto;
use ferry_tests::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use tonic::Code;

fn ferry(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .arg("--control")
        .arg(&daemon.control)
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A seed holding a 9 MiB file (three 4 MiB pieces): the file, its task id, the daemon.
async fn seeded(root: &Path) -> (std::path::PathBuf, String, Daemon) {
    let source = root.join("model.src");
    random_file(&source, 9 * MIB, 11);
    let seed = Daemon::start(root, "seed", DaemonOptions::default()).await;
    let task_id = seed.import(&source).await.task_id;
    (source, task_id, seed)
}

fn as_the_unit(output_dirs: Vec<std::path::PathBuf>, extra_args: Vec<String>) -> DaemonOptions {
    DaemonOptions {
        output_dirs: Some(output_dirs),
        extra_args,
        umask: Some("0077".into()),
        ..Default::default()
    }
}

async fn export_code(daemon: &Daemon, task_id: &str, path: &str) -> (Code, String) {
    let status = daemon
        .client()
        .await
        .export_task(proto::ExportTaskRequest {
            task_id: task_id.into(),
            output_path: path.into(),
        })
        .await
        .expect_err("export refused");
    (status.code(), status.message().to_owned())
}

/// The installed service has no output_dirs: `ferry pull` used to need --output and so
/// always failed there. Now the pull fills the store and says how to place it; export
/// places it where output_dirs allow, with precise codes where it cannot.
#[tokio::test(flavor = "multi_thread")]
async fn pull_without_output_keeps_the_task_and_export_places_it() {
    let root = scratch("pull-export");
    let (source, task_id, seed) = seeded(root.path()).await;

    // As installed: scripts/install.sh's configuration (no output_dirs) under umask 0077;
    // the harness's flags only move the data dir, socket and port into the scratch dir.
    let staged = root.path().join("staged");
    let install = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("scripts/install.sh"),
    )
    .arg("--destdir")
    .arg(&staged)
    .arg("--binary")
    .arg(ferry_bin())
    .output()
    .unwrap();
    assert!(install.status.success(), "{}", text(&install.stderr));
    let installed_config = staged.join("etc/ferry/ferry.toml");
    let installed = Daemon::start(
        root.path(),
        "installed",
        as_the_unit(
            vec![],
            vec!["--config".into(), installed_config.display().to_string()],
        ),
    )
    .await;
    let pulled = ferry(
        &installed,
        &["pull", "--task", &task_id, "--from", &seed.data_address],
    );
    let said = text(&pulled.stdout);
    assert!(pulled.status.success(), "{said}{}", text(&pulled.stderr));
    assert!(
        said.contains(&format!("held in the store as task {task_id}"))
            && said.contains(&format!("ferry export {task_id} PATH"))
            && said.contains("into the store"),
        "{said}"
    );
    assert!(installed.stat(&task_id).await.complete);
    let refused = ferry(
        &installed,
        &["export", &task_id, "/tmp/ferry-never-placed.bin"],
    );
    let err = text(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("PermissionDenied") && err.contains("no output directories"),
        "{err}"
    );
    assert!(!Path::new("/tmp/ferry-never-placed.bin").exists());

    // With an output directory.
    let out = root.path().join("out");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let receiver = Daemon::start(
        root.path(),
        "receiver",
        as_the_unit(vec![out.clone()], vec![]),
    )
    .await;
    let mut client = receiver.client().await;
    let mut first_piece = pull_request(&task_id, &[&seed.data_address], &out.join("x"));
    first_piece.output_path.clear();
    first_piece.pieces = vec![0];
    transfer(&mut client, first_piece, |_| {}).await.unwrap();
    let placed = out.join("model.bin");
    let placed_str = placed.to_str().unwrap();
    let not_yet = [
        ("0".repeat(64), Code::NotFound, "not in the store"),
        (task_id.clone(), Code::FailedPrecondition, "not complete"),
    ];
    for (task, code, says) in not_yet {
        let (got, message) = export_code(&receiver, &task, placed_str).await;
        assert_eq!(got, code, "{task}: {message}");
        assert!(message.contains(says), "{task}: {message}");
    }
    let rest = ferry(
        &receiver,
        &["pull", "--task", &task_id, "--from", &seed.data_address],
    );
    assert!(rest.status.success(), "{}", text(&rest.stderr));
    let outside = elsewhere.join("m.bin").display().to_string();
    let bad_paths = [
        ("out/model.bin", Code::InvalidArgument, "relative"),
        (
            outside.as_str(),
            Code::PermissionDenied,
            "outside the allowed output directories",
        ),
    ];
    for (path, code, says) in bad_paths {
        let (got, message) = export_code(&receiver, &task_id, path).await;
        assert_eq!(got, code, "{path}: {message}");
        assert!(message.contains(says), "{path}: {message}");
    }
    assert!(names(&out).is_empty() && names(&elsewhere).is_empty());

    let exported = ferry(&receiver, &["--json", "export", &task_id, placed_str]);
    assert!(exported.status.success(), "{}", text(&exported.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&exported.stdout).unwrap();
    assert_eq!(answer["output"], placed_str);
    assert_eq!(answer["content_length"], 9 * MIB);
    // Same filesystem, default policy: a hard link, its mode 0644 despite the umask.
    assert_eq!(answer["placement"], "hard link", "{answer}");
    assert!(same_contents(&source, &placed));
    assert_eq!(std::fs::metadata(&placed).unwrap().mode() & 0o7777, 0o644);

    // Repeats onto the placed output (the same inode): nothing left beside it.
    let again = ferry(&receiver, &["--json", "export", &task_id, placed_str]);
    let answer: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(answer["placement"], "already placed", "{answer}");
    let repull = ferry(
        &receiver,
        &[
            "pull",
            "--task",
            &task_id,
            "--from",
            &seed.data_address,
            "--output",
            placed_str,
        ],
    );
    assert!(repull.status.success(), "{}", text(&repull.stderr));
    assert!(
        text(&repull.stdout).contains(&format!("to {placed_str} (already placed)")),
        "{}",
        text(&repull.stdout)
    );
    assert_eq!(names(&out), ["model.bin"], "no .model.bin.ferry-* left");
    assert!(same_contents(&source, &placed));
}

/// Under umask 0077 outputs used to be 0600 root:root, unreadable by a non-root job. With
/// `[output]` set they are the configured owner, group and mode (root only: chown).
#[tokio::test(flavor = "multi_thread")]
async fn outputs_get_the_configured_mode_owner_and_group() {
    if !nix_is_root() {
        eprintln!("not root: chown cannot be tested; skipped");
        return;
    }
    let root = scratch("output-owner");
    let (source, task_id, seed) = seeded(root.path()).await;
    let out = root.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let config = root.path().join("ferry.toml");
    std::fs::write(
        &config,
        "[output]\nmode = \"0640\"\nowner = \"4242\"\ngroup = \"4343\"\n",
    )
    .unwrap();
    let receiver = Daemon::start(
        root.path(),
        "receiver",
        as_the_unit(
            vec![out.clone()],
            vec!["--config".into(), config.display().to_string()],
        ),
    )
    .await;
    let placed = out.join("model.bin");
    let done = pull(&receiver, &task_id, &[&seed.data_address], &placed).await;
    let summary = done.summary.unwrap();
    // A hard link would hand the store's own file to uid 4242: a copy instead.
    assert_ne!(summary.placement, "hard link", "{summary:?}");
    let meta = std::fs::metadata(&placed).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (4242, 4343, 0o640)
    );
    assert!(same_contents(&source, &placed));
    let content = receiver
        .data_dir
        .join("tasks")
        .join(&task_id)
        .join("content");
    let store = std::fs::metadata(content).unwrap();
    assert_ne!(store.ino(), meta.ino());
    assert_eq!(
        (store.uid(), store.gid()),
        (0, 0),
        "the store's file stays root's"
    );

    let second = out.join("second.bin");
    let exported = ferry(&receiver, &["export", &task_id, second.to_str().unwrap()]);
    assert!(exported.status.success(), "{}", text(&exported.stderr));
    let meta = std::fs::metadata(&second).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (4242, 4343, 0o640)
    );
    assert_eq!(names(&out), ["model.bin", "second.bin"]);
}

fn nix_is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    text(&out.stdout).trim() == "0"
}

/// An owner or group that does not exist is a start-up error naming the key, before the
/// daemon creates anything; `ferry config` says the same.
#[test]
fn an_unknown_output_owner_is_refused_at_start_up() {
    let root = scratch("output-unknown-owner");
    let config = root.path().join("ferry.toml");
    std::fs::write(&config, "[output]\nowner = \"no-such-user-ferry\"\n").unwrap();
    let data_dir = root.path().join("data");
    let serve = Command::new(ferry_bin())
        .arg("--control")
        .arg(root.path().join("control.sock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap();
    let err = text(&serve.stderr);
    assert!(!serve.status.success(), "{err}");
    assert!(
        err.contains("output.owner") && err.contains("no such user"),
        "{err}"
    );
    assert!(!data_dir.exists(), "nothing created for a refused config");
    let checked = Command::new(ferry_bin())
        .args(["config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!checked.status.success());
    assert!(text(&checked.stderr).contains("output.owner"));
    std::fs::write(&config, "[output]\nmode = \"0666\"\n").unwrap();
    let checked = Command::new(ferry_bin())
        .args(["config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!checked.status.success());
    let err = text(&checked.stderr);
    assert!(
        err.contains("output.mode") && err.contains("others"),
        "{err}"
    );
}
