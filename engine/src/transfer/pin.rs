//! Which version of a task a transfer fetches, and from which sources: the pure decision,
//! no I/O. A transfer pins one content digest (the request's `--digest`, else the task's own
//! manifest, else the first source, in the order given, that states one) and one geometry;
//! a source whose `TaskInfo` disagrees with either is refused with the reason, so pieces of
//! two versions can never meet in one file. A source that states no digest (a stock Vortex
//! peer, or one whose stat failed) may still serve: the final whole-content check against the
//! pin decides whether what it gave counts.

use crate::geometry::Geometry;
use crate::manifest::{ContentDigest, Manifest};
use ferry_fallback_tcp::TaskInfo;

/// What a source said when asked for the task's geometry and manifest.
#[derive(Debug, Clone)]
pub(super) enum SourceStat {
    Known(TaskInfo),
    /// The stat failed (unreachable, not a Ferry peer, does not hold the task).
    Unknown(String),
}

/// The pin and what it means for each source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pinning {
    pub pin: Option<ContentDigest>,
    /// (source index, why it is not used)
    pub refused: Vec<(usize, String)>,
    /// Sources whose manifest is not known yet: checked again before their first piece.
    pub unchecked: Vec<bool>,
    /// Sources that stated no digest or could not be asked: only the final whole-content
    /// check vouches for what they send.
    pub without_manifest: Vec<usize>,
}

/// Why a transfer cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum PinError {
    #[error("task {task_id} here is {held} ({state}), not the requested {requested}; delete the task to fetch another version")]
    HeldDiffers {
        task_id: String,
        held: ContentDigest,
        state: &'static str,
        requested: ContentDigest,
    },
    #[error("every source was refused: {0}")]
    AllRefused(String),
}

/// Whether one source's `TaskInfo` fits the transfer.
pub(super) fn judge(
    pin: Option<ContentDigest>,
    geometry: Geometry,
    info: &TaskInfo,
) -> Result<(), String> {
    if info.content_length != geometry.content_length()
        || info.piece_length != geometry.piece_length()
    {
        return Err(format!(
            "it holds the task with content length {} and piece length {}, not {} and {}",
            info.content_length,
            info.piece_length,
            geometry.content_length(),
            geometry.piece_length()
        ));
    }
    match (pin, info.content_sha256.map(ContentDigest)) {
        (Some(pin), Some(stated)) if pin != stated => Err(format!(
            "its manifest states content {stated}, not the pinned {pin} (another version of the task)"
        )),
        _ => Ok(()),
    }
}

pub(super) fn choose(
    task_id: &str,
    requested: Option<ContentDigest>,
    held: Option<Manifest>,
    geometry: Geometry,
    names: &[String],
    stats: &[SourceStat],
) -> Result<Pinning, PinError> {
    if let (Some(requested), Some(held)) = (requested, held) {
        if requested != held.content_sha256 {
            return Err(PinError::HeldDiffers {
                task_id: task_id.to_owned(),
                held: held.content_sha256,
                state: match held.state {
                    crate::manifest::ManifestState::Pinned => "pinned by an earlier transfer",
                    crate::manifest::ManifestState::Verified => "verified",
                },
                requested,
            });
        }
    }
    let pin = requested.or(held.map(|m| m.content_sha256)).or_else(|| {
        stats.iter().find_map(|stat| match stat {
            SourceStat::Known(info) if judge(None, geometry, info).is_ok() => {
                info.content_sha256.map(ContentDigest)
            }
            _ => None,
        })
    });
    let mut refused = Vec::new();
    let mut unchecked = Vec::new();
    let mut without_manifest = Vec::new();
    for (index, stat) in stats.iter().enumerate() {
        match stat {
            SourceStat::Known(info) => {
                if let Err(why) = judge(pin, geometry, info) {
                    refused.push((index, why));
                } else if info.content_sha256.is_none() {
                    without_manifest.push(index);
                }
                unchecked.push(false);
            }
            SourceStat::Unknown(_) => {
                unchecked.push(true);
                without_manifest.push(index);
            }
        }
    }
    if refused.len() == stats.len() && !stats.is_empty() {
        let reasons: Vec<String> = refused
            .iter()
            .map(|(i, why)| format!("{}: {why}", names[*i]))
            .collect();
        return Err(PinError::AllRefused(reasons.join("; ")));
    }
    Ok(Pinning {
        pin,
        refused,
        unchecked,
        without_manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestState;

    const A: ContentDigest = ContentDigest([0xA; 32]);
    const B: ContentDigest = ContentDigest([0xB; 32]);

    fn geometry() -> Geometry {
        Geometry::new(64 << 20, 4 << 20).unwrap()
    }

    fn info(digest: Option<ContentDigest>) -> SourceStat {
        SourceStat::Known(TaskInfo {
            content_length: 64 << 20,
            piece_length: 4 << 20,
            pieces_held: 16,
            complete: true,
            content_sha256: digest.map(|d| d.0),
        })
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("seed{i}")).collect()
    }

    #[test]
    fn the_first_stated_digest_pins_and_a_source_stating_another_is_refused() {
        let stats = [
            SourceStat::Unknown("down".into()),
            info(None),
            info(Some(A)),
            info(Some(B)),
        ];
        let pinning = choose("t", None, None, geometry(), &names(4), &stats).unwrap();
        assert_eq!(pinning.pin, Some(A));
        assert_eq!(pinning.refused.len(), 1);
        assert_eq!(pinning.refused[0].0, 3);
        assert!(
            pinning.refused[0].1.contains("not the pinned"),
            "{pinning:?}"
        );
        assert_eq!(pinning.unchecked, vec![true, false, false, false]);
        assert_eq!(pinning.without_manifest, vec![0, 1]);
    }

    #[test]
    fn the_request_and_the_held_manifest_pin_before_any_source() {
        let stats = [info(Some(A)), info(Some(B))];
        let by_request = choose("t", Some(B), None, geometry(), &names(2), &stats).unwrap();
        assert_eq!(by_request.pin, Some(B));
        assert_eq!(
            by_request.refused.iter().map(|r| r.0).collect::<Vec<_>>(),
            [0]
        );
        let held = Manifest {
            content_sha256: B,
            state: ManifestState::Pinned,
        };
        let by_held = choose("t", None, Some(held), geometry(), &names(2), &stats).unwrap();
        assert_eq!(by_held.pin, Some(B));
        let err = choose("t", Some(A), Some(held), geometry(), &names(2), &stats).unwrap_err();
        assert!(matches!(err, PinError::HeldDiffers { .. }), "{err}");
    }

    #[test]
    fn when_every_source_disagrees_the_transfer_fails_naming_each() {
        let stats = [info(Some(A)), info(Some(A))];
        let err = choose("t", Some(B), None, geometry(), &names(2), &stats).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("seed0") && text.contains("seed1"), "{text}");
    }

    #[test]
    fn a_source_with_another_geometry_is_refused_and_does_not_pin() {
        let other = SourceStat::Known(TaskInfo {
            content_length: 65 << 20,
            piece_length: 4 << 20,
            pieces_held: 1,
            complete: false,
            content_sha256: Some(B.0),
        });
        let pinning = choose(
            "t",
            None,
            None,
            geometry(),
            &names(2),
            &[other, info(Some(A))],
        )
        .unwrap();
        assert_eq!(pinning.pin, Some(A));
        assert_eq!(pinning.refused[0].0, 0);
        assert!(pinning.refused[0].1.contains("content length"));
    }

    #[test]
    fn with_no_digest_anywhere_nothing_is_pinned_and_every_source_serves() {
        let pinning = choose(
            "t",
            None,
            None,
            geometry(),
            &names(2),
            &[info(None), info(None)],
        )
        .unwrap();
        assert_eq!(pinning.pin, None);
        assert!(pinning.refused.is_empty());
    }
}
