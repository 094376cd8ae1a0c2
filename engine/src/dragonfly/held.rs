//! What a held task was announced with, kept in its directory, so that a restarted daemon
//! announces it to the scheduler again.

use super::scheduler::PullSpec;

/// What a task was announced with, kept in its directory so that a restarted daemon can
/// announce it again. Origin headers are not kept (they may carry credentials).
pub(super) const ANNOUNCED_FILE: &str = "dragonfly.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Announced {
    task_id: String,
    url: String,
    tag: Option<String>,
    application: Option<String>,
    piece_length: Option<u64>,
}

/// Keeps `spec` in the task's directory (write, fsync, rename); a failure is logged: the
/// task is then not re-announced after a restart, nothing else.
pub fn remember(task: &crate::store::StoredTask, spec: &PullSpec) {
    let announced = Announced {
        task_id: spec.task_id.clone(),
        url: spec.url.clone(),
        tag: spec.tag.clone(),
        application: spec.application.clone(),
        piece_length: spec.piece_length,
    };
    let dir = task.dir();
    let written = serde_json::to_vec(&announced)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            let partial = dir.join(format!("{ANNOUNCED_FILE}.partial"));
            let mut file = std::fs::File::create(&partial)?;
            std::io::Write::write_all(&mut file, &bytes)?;
            file.sync_all()?;
            std::fs::rename(&partial, dir.join(ANNOUNCED_FILE))
        });
    if let Err(err) = written {
        tracing::warn!(task_id = %spec.task_id, error = %err, "keeping the Dragonfly announcement failed; the task will not be re-announced after a restart");
    }
}

/// What [`remember`] kept, if anything readable.
pub(super) fn recall(dir: &std::path::Path) -> Option<PullSpec> {
    let bytes = std::fs::read(dir.join(ANNOUNCED_FILE)).ok()?;
    let announced: Announced = serde_json::from_slice(&bytes)
        .inspect_err(
            |err| tracing::warn!(dir = %dir.display(), error = %err, "unreadable {ANNOUNCED_FILE}"),
        )
        .ok()?;
    Some(PullSpec {
        task_id: announced.task_id,
        url: announced.url,
        tag: announced.tag,
        application: announced.application,
        piece_length: announced.piece_length,
        ..PullSpec::default()
    })
}
