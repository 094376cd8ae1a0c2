//! Importing onto a filesystem with reflinks (issue 11): the task's content becomes a clone of
//! the file instead of a second copy of it. Run on a real XFS (reflink=1) made on a loop
//! device in the test's scratch dir; the scratch dir itself (ext4 here) is the filesystem
//! without reflinks.

use ferry_engine::proto;
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command; its stdout, or what went wrong.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An XFS with reflinks on a loop device, unmounted when dropped.
struct XfsMount {
    dir: PathBuf,
}

impl XfsMount {
    /// A 1 GiB sparse image under `root`, made XFS with reflinks and mounted at root/xfs.
    /// `None` (and why, on stderr) where this machine cannot (no root, no loop devices, no
    /// mkfs.xfs), unless in CI (`CI` set), where the test must run: there it panics.
    fn make(root: &Path) -> Option<XfsMount> {
        match XfsMount::try_make(root) {
            Ok(mount) => Some(mount),
            Err(why) if std::env::var_os("CI").is_some() => {
                panic!("CI is set, so this test must run, but no XFS could be mounted: {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED: no XFS with reflinks can be mounted here ({why}); scripts/setup.sh installs xfsprogs, and mounting needs root and /dev/loop-control");
                None
            }
        }
    }

    fn try_make(root: &Path) -> Result<XfsMount, String> {
        let image = root.join("xfs.img");
        let dir = root.join("xfs");
        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 30))
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        let image = image.to_str().expect("utf-8 path");
        run("mkfs.xfs", &["-q", "-m", "reflink=1", image])?;
        run(
            "mount",
            &["-o", "loop", image, dir.to_str().expect("utf-8")],
        )?;
        Ok(XfsMount { dir })
    }

    /// Bytes in use on the filesystem, after a syncfs (so delayed allocations are counted).
    fn used(&self) -> u64 {
        let dir = self.dir.to_str().unwrap();
        run("sync", &["-f", dir]).unwrap();
        let stat = run("stat", &["-f", "--format=%b %f %S", dir]).unwrap();
        let [blocks, free, size]: [u64; 3] = stat
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        (blocks - free) * size
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap();
        // The daemons are dropped (killed) first; a lazy unmount still detaches the
        // filesystem should something hold it, so no mount outlives the test.
        if let Err(why) = run("umount", &[dir]) {
            eprintln!("umount {dir}: {why}; unmounting lazily");
            let _ = run("umount", &["-l", dir]);
        }
    }
}

/// `ferry import` through the CLI, as a user would run it: the text and the --json answers.
fn cli_import(daemon: &Daemon, file: &Path) -> (String, serde_json::Value) {
    let control = daemon.control.to_str().unwrap();
    let file = file.to_str().unwrap();
    let text = run(
        ferry_bin().to_str().unwrap(),
        &["--control", control, "import", file],
    )
    .unwrap();
    let json = run(
        ferry_bin().to_str().unwrap(),
        &["--control", control, "--json", "import", file],
    )
    .unwrap();
    (text, serde_json::from_str(json.trim()).unwrap())
}

fn digests(task: &proto::Task) -> Vec<String> {
    task.pieces.iter().map(|p| p.digest.clone()).collect()
}

/// A 64 MiB file imported on XFS with reflinks is cloned: the answer says reflink, the data
/// dir grows by far less than the file, the content shares the file's extents, and the
/// digests are the copy path's for the same bytes (imported from ext4, which says copy). The
/// task's content is a snapshot: the file overwritten after the import leaves it as it was,
/// and a receiver pulls the bytes imported.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_on_xfs_with_reflinks_is_a_clone_and_from_ext4_a_copy() {
    const SIZE: u64 = 64 * MIB;
    let root = scratch("reflink");
    let Some(xfs) = XfsMount::make(root.path()) else {
        return;
    };
    let imports = xfs.dir.join("imports");
    std::fs::create_dir(&imports).unwrap();
    let on_xfs = imports.join("model.bin");
    let on_ext4 = root.path().join("model.bin");
    random_file(&on_xfs, SIZE, 7);
    random_file(&on_ext4, SIZE, 7);
    let seed = Daemon::start(
        root.path(),
        "seed",
        DaemonOptions {
            data_dir: Some(xfs.dir.join("seed-data")),
            import_dirs: Some(vec![imports.clone(), root.path().to_owned()]),
            ..DaemonOptions::default()
        },
    )
    .await;

    let before = xfs.used();
    let (text, json) = cli_import(&seed, &on_xfs);
    let after = xfs.used();
    eprintln!(
        "xfs used: {before} bytes before the import, {after} after (+{} for a {SIZE}-byte file)",
        after as i64 - before as i64
    );
    assert!(text.contains("imported by reflink"), "{text}");
    // The second (--json) import found the task held.
    assert_eq!(json["import_method"], "already held", "{json}");
    assert!(
        after < before + 4 * MIB,
        "the data dir grew by {} bytes for a {SIZE}-byte reflinked file",
        after - before
    );
    let task_id = json["task_id"].as_str().unwrap().to_owned();
    let content = xfs
        .dir
        .join("seed-data/tasks")
        .join(&task_id)
        .join("content");
    let extents = run("filefrag", &["-v", content.to_str().unwrap()]).unwrap();
    assert!(extents.contains("shared"), "no shared extents:\n{extents}");
    let cloned = seed.stat(&task_id).await;
    assert!(cloned.complete);
    assert_eq!(cloned.content_digest_state, "verified");

    // The same bytes from ext4 (another task: another url), into the same XFS data dir.
    let before_copy = xfs.used();
    let copied = seed.import(&on_ext4).await;
    let after_copy = xfs.used();
    eprintln!(
        "xfs used: {before_copy} bytes before the copy import, {after_copy} after (+{})",
        after_copy - before_copy
    );
    assert_eq!(copied.import_method, "copy");
    assert!(
        after_copy >= before_copy + SIZE,
        "a copy takes the file's size"
    );
    let (text, _) = cli_import(&seed, &on_ext4);
    assert!(text.contains("imported by already held"), "{text}");
    assert_ne!(copied.task_id, task_id);
    assert_eq!(digests(&copied), digests(&cloned), "piece CRCs");
    assert_eq!(copied.content_digest, cloned.content_digest, "SHA-256");
    let copy_content = xfs
        .dir
        .join("seed-data/tasks")
        .join(&copied.task_id)
        .join("content");
    let extents = run("filefrag", &["-v", copy_content.to_str().unwrap()]).unwrap();
    assert!(
        !extents.contains("shared"),
        "a copy shares extents:\n{extents}"
    );

    // The user's file changes after the import: copy-on-write keeps the task's bytes.
    std::fs::write(&on_xfs, vec![0xee; MIB as usize]).unwrap();
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("pulled.bin");
    let pulled = pull(&receiver, &task_id, &[&seed.data_address], &output).await;
    assert_eq!(pulled.summary.unwrap().bytes_fetched, SIZE);
    assert!(
        same_contents(&on_ext4, &output),
        "the pulled bytes are the imported file's"
    );
    assert_eq!(
        receiver.stat(&task_id).await.content_digest,
        cloned.content_digest
    );
    drop((seed, receiver));
}
