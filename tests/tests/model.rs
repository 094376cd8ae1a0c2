//! Whole models from a real OCI registry (Debian's docker-registry, CNCF distribution 2.8,
//! on loopback): `ferry push` of a generated model directory, an artifact pushed by an
//! independent client (tests/oci_push.py), pulls into directories through real daemons,
//! a second daemon pulling from the first over TCP, and the failure cases: a corrupted blob,
//! a hostile tar, a registry that goes away mid-pull, auth.

use ferry_engine::proto::{self, model_event::Event};
use ferry_tests::registry::{python_push, Registry};
use ferry_tests::{ferry_bin, random_file, scratch, ControlClient, Daemon, DaemonOptions, MIB};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::Code;

const WEIGHT_RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
const CODE_TAR: &str = "application/vnd.cncf.model.code.v1.tar";
const ARTIFACT: &str = "application/vnd.cncf.model.manifest.v1+json";

/// A model directory: shards of random bytes, config.json, a tokenizer, a README, and a
/// code/ tree (pushed as one tar layer) with a nested dir and a relative symlink.
fn model_dir(root: &Path, shards: &[u64]) -> PathBuf {
    let dir = root.join("src-model");
    std::fs::create_dir_all(dir.join("code/utils")).unwrap();
    for (i, size) in shards.iter().enumerate() {
        random_file(
            &dir.join(format!(
                "model-{:05}-of-{:05}.safetensors",
                i + 1,
                shards.len()
            )),
            *size,
            i as u64 + 7,
        );
    }
    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"torch_dtype":"bfloat16"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        br#"{"version":"1.0","model":{}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("README.md"), b"# test model\n").unwrap();
    std::fs::write(
        dir.join("code/modeling.py"),
        b"def forward(x):\n    return x\n",
    )
    .unwrap();
    std::fs::write(dir.join("code/utils/tok.py"), b"VOCAB = 3\n").unwrap();
    std::os::unix::fs::symlink("modeling.py", dir.join("code/model.py")).unwrap();
    dir
}

/// Every file (bytes), directory and symlink (target) under `dir`, without `.modelpack`.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap().display().to_string();
            if rel == ".modelpack" {
                continue;
            }
            let ft = entry.file_type().unwrap();
            if ft.is_symlink() {
                out.insert(
                    rel,
                    format!("-> {}", std::fs::read_link(&path).unwrap().display()),
                );
            } else if ft.is_dir() {
                out.insert(rel.clone(), "dir".into());
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                use sha2::Digest;
                out.insert(rel, hex(&sha2::Sha256::digest(&bytes)));
            }
        }
    }
    out
}

fn file_hash(path: &Path) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ferry push DIR REF --plain-http --json [extra]`.
fn ferry_push(dir: &Path, reference: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(ferry_bin())
        .args(["push", "--json", "--plain-http"])
        .arg(dir)
        .arg(reference)
        .args(extra)
        .env("DOCKER_CONFIG", dir.join("no-docker-config"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[derive(Debug, Default)]
struct Pulled {
    started: Option<proto::ModelStarted>,
    summary: proto::ModelSummary,
    progress_bytes: u64,
    layers_done: u32,
}

fn model_request(reference: &str, output: Option<&Path>) -> proto::PullModelRequest {
    proto::PullModelRequest {
        reference: reference.into(),
        output_dir: output.map(|p| p.display().to_string()).unwrap_or_default(),
        plain_http: true,
        ..Default::default()
    }
}

async fn pull_model(
    client: &mut ControlClient,
    request: proto::PullModelRequest,
) -> Result<Pulled, tonic::Status> {
    let mut stream = client.pull_model(request).await?.into_inner();
    let mut pulled = Pulled::default();
    let mut summary = None;
    while let Some(event) = stream.message().await? {
        match event.event.expect("an event") {
            Event::Started(s) => pulled.started = Some(s),
            Event::Progress(p) => pulled.progress_bytes += p.bytes,
            Event::LayerDone(_) => pulled.layers_done += 1,
            Event::Summary(s) => summary = Some(s),
        }
    }
    pulled.summary = summary.expect("a summary");
    Ok(pulled)
}

/// No `.NAME.ferry-*` temporary sibling was left behind.
fn no_temp_siblings(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    for entry in std::fs::read_dir(dir.parent().unwrap()).unwrap() {
        let other = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !other.starts_with(&format!(".{name}.ferry-")),
            "temporary {other} left behind"
        );
    }
}

#[tokio::test]
async fn push_pull_and_peer_pull_give_the_same_directory() {
    let root = scratch("model-pull");
    let registry = Registry::start(&root.path().join("registry"), None);
    let src = model_dir(root.path(), &[9 * MIB + 3, 6 * MIB, MIB / 2]);
    let reference = registry.reference("models/tiny-llama:v1");
    let pushed = ferry_push(&src, &reference, &[]);
    assert_eq!(pushed["layers"], 7, "{pushed}");
    assert_eq!(pushed["uploaded"], 7);
    // The same tree pushed again: every blob is found by HEAD, the manifest is the same.
    let again = ferry_push(&src, &reference, &[]);
    assert_eq!(again["uploaded"], 0);
    assert_eq!(again["skipped"], 7);
    assert_eq!(again["manifest_digest"], pushed["manifest_digest"]);
    let digest = pushed["manifest_digest"].as_str().unwrap().to_owned();

    let a = Daemon::start(root.path(), "a", DaemonOptions::default()).await;
    let mut client_a = a.client().await;
    let out_a = root.path().join("out-a");
    let pulled = pull_model(&mut client_a, model_request(&reference, Some(&out_a)))
        .await
        .unwrap();
    let started = pulled.started.as_ref().unwrap();
    assert_eq!(started.manifest_digest, digest);
    assert_eq!(started.layers.len(), 7);
    let total: u64 = started.layers.iter().map(|l| l.size).sum();
    assert_eq!(pulled.summary.total_bytes, total);
    assert_eq!(pulled.summary.back_to_source_bytes, total);
    assert_eq!(pulled.summary.bytes_fetched, total);
    assert_eq!(pulled.progress_bytes, total);
    assert_eq!(pulled.layers_done, 7);
    assert_eq!(
        tree(&out_a),
        tree(&src),
        "the pulled directory is the pushed one"
    );
    no_temp_siblings(&out_a);
    // Every layer is a task whose id is Dragonfly's id of its blob URL.
    for layer in &started.layers {
        let url = format!(
            "http://{}/v2/models/tiny-llama/blobs/{}",
            registry.host(),
            layer.digest
        );
        assert_eq!(
            layer.task_id,
            ferry_engine::origin::task_id(&url, None, None, None).unwrap()
        );
        let task = a.stat(&layer.task_id).await;
        assert!(task.complete);
        assert_eq!(task.content_digest, layer.digest);
    }
    let tar_layer = started.layers.iter().find(|l| l.format == "tar").unwrap();
    assert_eq!(
        (tar_layer.media_type.as_str(), tar_layer.filepath.as_str()),
        (CODE_TAR, "code")
    );

    // Pulled again: the directory holds that manifest, nothing moves.
    let repeat = pull_model(&mut client_a, model_request(&reference, Some(&out_a)))
        .await
        .unwrap();
    assert!(repeat.summary.already_placed);
    assert_eq!(repeat.summary.bytes_fetched, 0);
    assert_eq!(repeat.progress_bytes, 0);

    // Stat by reference and by digest; the list has it.
    let by_digest = client_a
        .stat_model(proto::StatModelRequest {
            model: digest.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(by_digest.complete);
    assert_eq!(by_digest.placed, [out_a.display().to_string()]);
    let by_ref = client_a
        .stat_model(proto::StatModelRequest {
            model: reference.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_ref.manifest_digest, digest);
    let listed = client_a
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.models.len(), 1);

    // A second daemon pulls from the first over TCP: nothing from the registry but the
    // manifest and config.
    let b = Daemon::start(root.path(), "b", DaemonOptions::default()).await;
    let mut client_b = b.client().await;
    let out_b = root.path().join("out-b");
    let mut request = model_request(&reference, Some(&out_b));
    request.sources = vec![a.data_address.clone()];
    request.transport = proto::TransportPreference::Tcp as i32;
    let peer = pull_model(&mut client_b, request).await.unwrap();
    assert_eq!(peer.summary.back_to_source_bytes, 0);
    let tcp: u64 = peer
        .summary
        .transports
        .iter()
        .filter(|t| t.transport == "tcp")
        .map(|t| t.bytes)
        .sum();
    assert_eq!(tcp, total);
    assert_eq!(tree(&out_b), tree(&src));
    // The CLI says the same, in JSON, for the repeated pull.
    let out = Command::new(ferry_bin())
        .arg("--control")
        .arg(&b.control)
        .args(["--json", "pull", &reference, "--plain-http", "--output"])
        .arg(&out_b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["already_placed"], true);
}

#[tokio::test]
async fn an_independently_pushed_artifact_pulls_and_a_hostile_tar_is_refused() {
    let root = scratch("model-oras");
    let registry = Registry::start(&root.path().join("registry"), None);
    let shard = root.path().join("shard.bin");
    random_file(&shard, 5 * MIB + 11, 3);
    let spec = |tar: serde_json::Value| {
        json!({
            "artifact_type": ARTIFACT,
            "config": {"descriptor": {"name": "other"}, "modelfs": {"type": "layers", "diffIds": []}, "config": {"format": "safetensors"}},
            "layers": [
                {"media_type": WEIGHT_RAW, "file": shard, "filepath": "weights/shard.safetensors"},
                {"media_type": "application/vnd.cncf.model.weight.config.v1.raw", "file": shard, "filepath": "copy.safetensors"},
                {"media_type": CODE_TAR, "tar": tar, "filepath": "src"},
            ]
        })
    };
    let digest = python_push(
        &registry.host(),
        "other/model:1",
        &spec(json!([
            {"name": "src/", "type": "dir"},
            {"name": "src/run.py", "data": "print('hi')\n"},
            {"name": "./src/link.py", "type": "symlink", "target": "run.py"},
        ])),
        None,
    );
    let daemon = Daemon::start(root.path(), "d", DaemonOptions::default()).await;
    let mut client = daemon.client().await;
    let out = root.path().join("out");
    let pulled = pull_model(
        &mut client,
        model_request(&registry.reference("other/model:1"), Some(&out)),
    )
    .await
    .unwrap();
    assert_eq!(pulled.summary.manifest_digest, digest);
    // The shard named twice is one task, fetched once, placed at both paths.
    assert_eq!(
        pulled.summary.bytes_fetched,
        5 * MIB + 11 + pulled.started.as_ref().unwrap().layers[2].size
    );
    let shard_hash = file_hash(&shard);
    let got = tree(&out);
    assert_eq!(got["weights/shard.safetensors"], shard_hash);
    assert_eq!(got["copy.safetensors"], shard_hash);
    assert_eq!(got["src/link.py"], "-> run.py");
    assert_eq!(
        std::fs::read(out.join("src/run.py")).unwrap(),
        b"print('hi')\n"
    );
    // By digest, the same.
    let by_digest = registry.reference(&format!("other/model@{digest}"));
    let again = pull_model(&mut client, model_request(&by_digest, Some(&out)))
        .await
        .unwrap();
    assert!(again.summary.already_placed);

    // Tars that climb out: refused, nothing placed, nothing written outside.
    for (i, hostile) in [
        json!([{"name": "../evil.py", "data": "x"}]),
        json!([{"name": "/abs-evil.py", "data": "x"}]),
        json!([{"name": "src/", "type": "dir"}, {"name": "src/out", "type": "symlink", "target": "../../.."}]),
        json!([{"name": "ln", "type": "symlink", "target": "."}, {"name": "ln/evil.py", "data": "x"}]),
    ]
    .into_iter()
    .enumerate()
    {
        let tag = format!("other/evil:{i}");
        python_push(&registry.host(), &tag, &spec(hostile), None);
        let out = root.path().join(format!("evil-{i}"));
        let err = pull_model(&mut client, model_request(&registry.reference(&tag), Some(&out)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(err.message().contains("unsafe path"), "{}", err.message());
        assert!(!out.exists());
        assert!(!root.path().join("evil.py").exists());
        no_temp_siblings(&out);
    }
    assert!(!Path::new("/abs-evil.py").exists());
    // The daemon is still up and answering.
    assert_eq!(
        client
            .list_models(proto::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models
            .len(),
        1
    );
}

#[tokio::test]
async fn a_corrupted_blob_is_caught_by_its_digest_and_nothing_is_placed() {
    let root = scratch("model-corrupt");
    let registry = Registry::start(&root.path().join("registry"), None);
    let src = model_dir(root.path(), &[5 * MIB, 2 * MIB]);
    let reference = registry.reference("m/corrupt:v1");
    ferry_push(&src, &reference, &[]);
    let daemon = Daemon::start(root.path(), "d", DaemonOptions::default()).await;
    let mut client = daemon.client().await;
    // Find the first shard's blob and flip a byte in the registry's own storage.
    let layers = {
        let link = registry
            .storage
            .join("docker/registry/v2/repositories/m/corrupt/_manifests/tags/v1/current/link");
        let manifest_digest = std::fs::read_to_string(link).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(registry.blob_data(manifest_digest.trim())).unwrap(),
        )
        .unwrap();
        manifest["layers"].as_array().unwrap().clone()
    };
    let shard = layers
        .iter()
        .find(|l| l["annotations"]["org.cncf.model.filepath"] == "model-00001-of-00002.safetensors")
        .unwrap();
    let data = registry.blob_data(shard["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[3 * MIB as usize] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();

    let out = root.path().join("out");
    let err = pull_model(&mut client, model_request(&reference, Some(&out)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(
        err.message().contains(shard["digest"].as_str().unwrap()),
        "{}",
        err.message()
    );
    assert!(!out.exists());
    no_temp_siblings(&out);
    // The bad blob's pieces were dropped; the others stay held for a later pull.
    let task_id = ferry_engine::origin::task_id(
        &format!(
            "http://{}/v2/m/corrupt/blobs/{}",
            registry.host(),
            shard["digest"].as_str().unwrap()
        ),
        None,
        None,
        None,
    )
    .unwrap();
    let tasks = client
        .list_tasks(proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(
        tasks
            .iter()
            .all(|t| t.task_id != task_id || t.pieces_held == 0),
        "the corrupted layer's pieces are still held"
    );
    assert_eq!(
        tasks.iter().filter(|t| t.complete).count(),
        5,
        "the other five layers stay held"
    );
}

#[tokio::test]
async fn a_registry_gone_mid_pull_leaves_no_directory_and_the_resumed_pull_fetches_only_the_rest() {
    let root = scratch("model-resume");
    let mut registry = Registry::start(&root.path().join("registry"), None);
    let src = model_dir(root.path(), &[24 * MIB; 6]);
    let reference = registry.reference("m/resume:v1");
    ferry_push(&src, &reference, &[]);
    let daemon = Daemon::start(root.path(), "d", DaemonOptions::default()).await;
    let out = root.path().join("out");
    // One layer at a time, one connection: the registry dies while layers are left.
    let mut request = model_request(&reference, Some(&out));
    request.layers_in_flight = 1;
    request.origin_connections = 1;
    let mut client = daemon.client().await;
    let pull = tokio::spawn({
        let mut client = client.clone();
        let request = request.clone();
        async move { pull_model(&mut client, request).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let tasks = client
            .list_tasks(proto::ListTasksRequest {})
            .await
            .unwrap()
            .into_inner()
            .tasks;
        if tasks
            .iter()
            .any(|t| t.complete && t.content_length == 24 * MIB)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no layer completed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    registry.stop();
    let err = pull.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(!out.exists(), "a partial model was placed");
    no_temp_siblings(&out);

    // What the store holds now is not fetched again.
    let tasks = client
        .list_tasks(proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let mut held_bytes = 0;
    for task in &tasks {
        let stat = daemon.stat(&task.task_id).await;
        held_bytes += stat
            .pieces
            .iter()
            .filter(|p| p.held)
            .map(|p| p.length)
            .sum::<u64>();
    }
    registry.restart();
    let resumed = pull_model(&mut client, request).await.unwrap();
    let total = resumed.summary.total_bytes;
    assert!(
        held_bytes >= 24 * MIB && held_bytes < total,
        "{held_bytes} of {total}"
    );
    assert_eq!(resumed.summary.back_to_source_bytes, total - held_bytes);
    assert!(resumed.summary.layers_reused >= 1);
    assert_eq!(tree(&out), tree(&src));
}

#[tokio::test]
async fn basic_auth_registries_and_preheat() {
    let root = scratch("model-auth");
    let registry = Registry::start(&root.path().join("registry"), Some(("alice", "s3cret")));
    let src = model_dir(root.path(), &[3 * MIB]);
    let reference = registry.reference("private/m:v1");
    // Without credentials the push is refused; with them (flag, or docker config) it works.
    let refused = Command::new(ferry_bin())
        .args(["push", "--plain-http"])
        .arg(&src)
        .arg(&reference)
        .env("DOCKER_CONFIG", root.path().join("none"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused access"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    ferry_push(&src, &reference, &["--registry-auth", "alice:s3cret"]);
    let docker = root.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        json!({"auths": {registry.host(): {"auth": "YWxpY2U6czNjcmV0"}}}).to_string(),
    )
    .unwrap();

    let daemon = Daemon::start(root.path(), "d", DaemonOptions::default()).await;
    let mut client = daemon.client().await;
    let out = root.path().join("out");
    let err = pull_model(&mut client, model_request(&reference, Some(&out)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let mut wrong = model_request(&reference, Some(&out));
    wrong.registry_username = "alice".into();
    wrong.registry_password = "nope".into();
    assert_eq!(
        pull_model(&mut client, wrong).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Preheat through the CLI with the docker config's credentials: the store is filled,
    // no directory placed; the later pull fetches nothing.
    let preheat = Command::new(ferry_bin())
        .arg("--control")
        .arg(&daemon.control)
        .args(["--json", "preheat", &reference, "--plain-http"])
        .env("DOCKER_CONFIG", &docker)
        .output()
        .unwrap();
    assert!(
        preheat.status.success(),
        "{}",
        String::from_utf8_lossy(&preheat.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&preheat.stdout).unwrap();
    assert_eq!(summary["output_dir"], "");
    assert!(summary["back_to_source_bytes"].as_u64().unwrap() > 3 * MIB);
    assert!(!out.exists());
    let mut request = model_request(&reference, Some(&out));
    request.registry_username = "alice".into();
    request.registry_password = "s3cret".into();
    let pulled = pull_model(&mut client, request).await.unwrap();
    assert_eq!(pulled.summary.bytes_fetched, 0);
    assert_eq!(pulled.summary.layers_reused, pulled.summary.layers);
    assert_eq!(tree(&out), tree(&src));
}

#[tokio::test]
async fn model_calls_validate_like_task_calls() {
    let root = scratch("model-validate");
    let registry = Registry::start(&root.path().join("registry"), None);
    let inside = root.path().join("allowed");
    std::fs::create_dir_all(&inside).unwrap();
    let daemon = Daemon::start(
        root.path(),
        "d",
        DaemonOptions {
            output_dirs: Some(vec![inside.clone()]),
            ..Default::default()
        },
    )
    .await;
    let mut client = daemon.client().await;
    let code = |r: Result<Pulled, tonic::Status>| r.unwrap_err().code();
    let reference = registry.reference("m/x:v1");
    assert_eq!(
        code(pull_model(&mut client, model_request("docker://h/a", None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(pull_model(&mut client, model_request("oci://h/UPPER", None)).await),
        Code::InvalidArgument
    );
    let mut relative = model_request(&reference, None);
    relative.output_dir = "relative/dir".into();
    assert_eq!(
        code(pull_model(&mut client, relative).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            pull_model(
                &mut client,
                model_request(&reference, Some(&root.path().join("outside")))
            )
            .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            pull_model(
                &mut client,
                model_request(&reference, Some(&inside.join("m")))
            )
            .await
        ),
        Code::NotFound
    );
    // Not a model: a plain image-style manifest.
    let layer = root.path().join("layer");
    random_file(&layer, 1000, 1);
    python_push(
        &registry.host(),
        "m/image:v1",
        &json!({"config_media_type": "application/vnd.oci.image.config.v1+json",
                "layers": [{"media_type": "application/vnd.oci.image.layer.v1.tar", "file": layer}]}),
        None,
    );
    let err = pull_model(
        &mut client,
        model_request(&registry.reference("m/image:v1"), None),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    // A directory that is not a model Ferry placed is not replaced.
    let src = model_dir(root.path(), &[MIB]);
    ferry_push(&src, &reference, &[]);
    let taken = inside.join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("mine"), b"keep").unwrap();
    let err = pull_model(&mut client, model_request(&reference, Some(&taken)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_eq!(std::fs::read(taken.join("mine")).unwrap(), b"keep");
    // Unreachable registry: UNAVAILABLE.
    let gone = format!("oci://127.0.0.1:{}/m/x:v1", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    assert_eq!(
        code(pull_model(&mut client, model_request(&gone, None)).await),
        Code::Unavailable
    );
    for bad in ["", "nonsense", "sha256:12"] {
        let err = client
            .stat_model(proto::StatModelRequest { model: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
    }
    let err = client
        .stat_model(proto::StatModelRequest {
            model: reference.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A model replaced by a newer push at the same path: swapped atomically.
    let out = inside.join("m");
    pull_model(&mut client, model_request(&reference, Some(&out)))
        .await
        .unwrap();
    std::fs::write(src.join("README.md"), b"# v2\n").unwrap();
    ferry_push(&src, &reference, &[]);
    let v2 = pull_model(&mut client, model_request(&reference, Some(&out)))
        .await
        .unwrap();
    assert!(!v2.summary.already_placed);
    assert_eq!(std::fs::read(out.join("README.md")).unwrap(), b"# v2\n");
    assert_eq!(tree(&out), tree(&src));
    no_temp_siblings(&out);
}

#[tokio::test]
async fn import_dir_imports_every_file() {
    let root = scratch("model-import");
    let src = model_dir(root.path(), &[2 * MIB, MIB]);
    let daemon = Daemon::start(root.path(), "d", DaemonOptions::default()).await;
    let out = Command::new(ferry_bin())
        .arg("--control")
        .arg(&daemon.control)
        .args(["--json", "import"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = set["files"].as_array().unwrap();
    // Regular files only (the symlink is not a file of its own).
    assert_eq!(files.len(), 7, "{set}");
    for f in files {
        let task = daemon.stat(f["task_id"].as_str().unwrap()).await;
        assert!(task.complete);
        let bytes = std::fs::read(src.join(f["path"].as_str().unwrap())).unwrap();
        use sha2::Digest;
        assert_eq!(
            task.content_digest,
            format!("sha256:{}", hex(&sha2::Sha256::digest(&bytes)))
        );
    }
}

#[tokio::test]
async fn the_token_flow_in_front_of_a_registry() {
    let root = scratch("model-token");
    let registry = Registry::start(&root.path().join("registry"), None);
    let proxy = ferry_tests::registry::TokenProxy::start(&registry, "bob", "pw");
    let src = model_dir(root.path(), &[4 * MIB, MIB]);
    let reference = format!("oci://{}/models/tok:v1", proxy.host());
    ferry_push(&src, &reference, &["--registry-auth", "bob:pw"]);
    let after_push = proxy.stats().await;
    assert!(
        after_push["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "repository:models/tok:pull,push"),
        "{after_push}"
    );

    let daemon = Daemon::start(root.path(), "d", DaemonOptions::default()).await;
    let mut client = daemon.client().await;
    let out = root.path().join("out");
    let err = pull_model(&mut client, model_request(&reference, Some(&out)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let mut request = model_request(&reference, Some(&out));
    request.registry_username = "bob".into();
    request.registry_password = "pw".into();
    let pulled = pull_model(&mut client, request).await.unwrap();
    assert_eq!(
        pulled.summary.back_to_source_bytes,
        pulled.summary.total_bytes
    );
    assert_eq!(tree(&out), tree(&src));
    let stats = proxy.stats().await;
    // One token for the pull: the layers' Range requests carried it (the proxy forwards
    // nothing without one).
    assert_eq!(
        stats["tokens"].as_u64().unwrap(),
        after_push["tokens"].as_u64().unwrap() + 1,
        "{stats}"
    );
    assert!(stats["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "repository:models/tok:pull"));
}
