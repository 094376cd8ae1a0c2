//! A model pull in the daemon: resolve the reference, make every layer blob a task (its id
//! Dragonfly's id of the blob URL, its SHA-256 pinned from the manifest), run the layers'
//! transfers concurrently through the engine (peers first where named, the registry back
//! to source), then lay the directory out and record the model.

use super::layout::{self, HeldContent, PlaceOutcome};
use super::record::{HeldLayer, ModelRecord, ModelRecords};
use super::reference::Reference;
use super::registry::{Registry, RegistryOptions};
use super::spec::{self, Layer};
use super::ModelError;
use crate::manifest::ContentDigest;
use crate::origin::OriginRequest;
use crate::proto::{self, model_event::Event};
use crate::transfer::{Engine, TransferError, TransferRequest, TransferSummary, TransportChoice};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, Semaphore};

/// A pull as asked for.
#[derive(Debug, Clone)]
pub struct ModelPull {
    pub reference: Reference,
    /// Absolute; `None`: preheat.
    pub output: Option<PathBuf>,
    pub registry: RegistryOptions,
    pub sources: Vec<String>,
    pub transport: TransportChoice,
    pub origin_connections: u32,
    pub layers_in_flight: usize,
}

pub const DEFAULT_LAYERS_IN_FLIGHT: usize = 8;

/// The proto view of a layer, with whether the store holds it.
pub fn layer_message(engine: &Engine, layer: &Layer, task_id: &str) -> proto::ModelLayer {
    proto::ModelLayer {
        digest: layer.digest.clone(),
        size: layer.size,
        media_type: layer.media_type.clone(),
        format: match layer.format {
            spec::LayerFormat::Raw => "raw".into(),
            spec::LayerFormat::Tar => "tar".into(),
        },
        filepath: layer.filepath.clone(),
        task_id: task_id.to_owned(),
        held: layer.size == 0 || engine.store.get(task_id).is_some_and(|t| t.is_complete()),
    }
}

/// Where a pull's events go (the stream of `PullModel`, whose last item is the status).
pub type Events = mpsc::Sender<Result<proto::ModelEvent, tonic::Status>>;

async fn send(events: &Events, event: Event) {
    let _ = events
        .send(Ok(proto::ModelEvent { event: Some(event) }))
        .await;
}

/// Runs a pull, sending its events; the summary is the caller's last event.
pub async fn pull_model(
    engine: Arc<Engine>,
    request: ModelPull,
    events: Events,
) -> Result<proto::ModelSummary, ModelError> {
    let started = Instant::now();
    let output = request
        .output
        .as_deref()
        .map(|dir| engine.check_output_path(dir))
        .transpose()?;
    let mut options = request.registry.clone();
    if !options.plain_http && options.tls.is_none() {
        options.tls = Some(
            crate::origin::tls_client_config(&engine.origin_settings)
                .map_err(TransferError::Origin)?,
        );
    }
    let registry = Registry::new(&request.reference, false, options);
    let resolved = registry.resolve(&request.reference).await?;
    let layers = spec::model_layers(&resolved.manifest)?;
    let config_digest = resolved.manifest.config.digest.clone();
    let config = registry.blob_bytes(&config_digest).await?;
    let authorization = registry.authorization();
    let task_ids: Vec<String> = layers
        .iter()
        .map(|l| {
            crate::origin::task_id(&registry.blob_url(&l.digest), None, None, None)
                .map_err(|e| ModelError::from(TransferError::Origin(e)))
        })
        .collect::<Result<_, _>>()?;
    let total_bytes: u64 = layers.iter().map(|l| l.size).sum();
    let reference_text = request.reference.to_string();
    let already_placed = output
        .as_deref()
        .and_then(layout::placed_digest)
        .is_some_and(|d| d == resolved.digest);
    send(
        &events,
        Event::Started(proto::ModelStarted {
            reference: reference_text.clone(),
            manifest_digest: resolved.digest.clone(),
            layers: layers
                .iter()
                .zip(&task_ids)
                .map(|(l, id)| layer_message(&engine, l, id))
                .collect(),
            total_bytes,
            already_placed,
        }),
    )
    .await;
    let mut summary = proto::ModelSummary {
        reference: reference_text.clone(),
        manifest_digest: resolved.digest.clone(),
        layers: layers.len() as u32,
        total_bytes,
        output_dir: output
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        already_placed,
        ..Default::default()
    };
    if already_placed {
        summary.layers_reused = layers.len() as u32;
        summary.elapsed_micros = started.elapsed().as_micros() as u64;
        return Ok(summary);
    }

    // One transfer per distinct blob; a blob named twice is placed twice.
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    for (i, layer) in layers.iter().enumerate() {
        first_of.entry(layer.digest.as_str()).or_insert(i);
    }
    let gate = Arc::new(Semaphore::new(request.layers_in_flight.max(1)));
    let mut running = tokio::task::JoinSet::new();
    for (i, layer) in layers.iter().enumerate() {
        if first_of[layer.digest.as_str()] != i || layer.size == 0 {
            continue;
        }
        let digest: ContentDigest =
            layer
                .digest
                .parse()
                .map_err(
                    |e: crate::manifest::DigestParseError| ModelError::BadLayer {
                        digest: layer.digest.clone(),
                        why: e.to_string(),
                    },
                )?;
        let transfer = TransferRequest {
            task_id: task_ids[i].clone(),
            content_length: layer.size,
            piece_length: 0,
            pieces: Vec::new(),
            sources: request.sources.clone(),
            output: None,
            streams_per_source: 0,
            transport: request.transport,
            digest: Some(digest),
            origin: Some(OriginRequest {
                url: registry.blob_url(&layer.digest),
                headers: authorization
                    .iter()
                    .map(|a| format!("Authorization: {a}"))
                    .collect(),
                tag: None,
                application: None,
            }),
            origin_connections: request.origin_connections,
            source_weights: Vec::new(),
        };
        let engine = Arc::clone(&engine);
        let gate = Arc::clone(&gate);
        let events = events.clone();
        let index = i as u32;
        running.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("never closed");
            let result = run_layer(&engine, transfer, index, &events).await;
            (i, result)
        });
    }
    let mut failures: Vec<(usize, TransferError)> = Vec::new();
    let blob_prefix = format!("{}/v2/", registry.base());
    let mut sources: BTreeMap<String, proto::SourceStats> = BTreeMap::new();
    let mut transports: BTreeMap<String, proto::TransportStats> = BTreeMap::new();
    while let Some(joined) = running.join_next().await {
        let (i, result) = joined.unwrap_or_else(|err| {
            (
                usize::MAX,
                Err(TransferError::Internal {
                    task_id: String::new(),
                    what: format!(
                        "a layer transfer panicked: {}",
                        crate::transfer::panic_message(err)
                    ),
                }),
            )
        });
        match result {
            Ok(done) => {
                if done.bytes_fetched == 0 {
                    summary.layers_reused += 1;
                }
                summary.bytes_fetched += done.bytes_fetched;
                summary.back_to_source_bytes += done.back_to_source_bytes;
                for (name, t) in &done.sources {
                    if t.bytes == 0 && t.pieces == 0 && t.failures == 0 {
                        continue;
                    }
                    // Every blob URL of the registry is one source: the registry.
                    let name = if name.starts_with(&blob_prefix) {
                        registry.base().to_owned()
                    } else {
                        name.clone()
                    };
                    let entry = sources.entry(name.clone()).or_insert(proto::SourceStats {
                        source: name,
                        ..Default::default()
                    });
                    entry.bytes += t.bytes;
                    entry.pieces += t.pieces;
                    entry.failures += t.failures;
                }
                for (name, bytes, pieces) in &done.transports {
                    let entry = transports
                        .entry(name.clone())
                        .or_insert(proto::TransportStats {
                            transport: name.clone(),
                            ..Default::default()
                        });
                    entry.bytes += bytes;
                    entry.pieces += pieces;
                }
                send(
                    &events,
                    Event::LayerDone(proto::LayerDone {
                        layer: i as u32,
                        summary: Some(crate::control::summary_message(done)),
                    }),
                )
                .await;
            }
            Err(err) => failures.push((i, err)),
        }
    }
    // The layers that completed stay held: a repeated pull fetches only the rest.
    if let Some((i, err)) = failures.into_iter().min_by_key(|(i, _)| *i) {
        let (digest, filepath) = layers
            .get(i)
            .map(|l| (l.digest.clone(), l.filepath.clone()))
            .unwrap_or_default();
        return Err(ModelError::Layer {
            digest,
            filepath,
            source: Box::new(err),
        });
    }
    summary.sources = sources.into_values().collect();
    summary.transports = transports.into_values().collect();

    let held: Vec<HeldContent> = layers
        .iter()
        .zip(&task_ids)
        .map(|(layer, task_id)| HeldContent {
            layer: layer.clone(),
            content: engine
                .store
                .get(task_id)
                .map(|t| t.content_path())
                .unwrap_or_default(),
        })
        .collect();
    let records = ModelRecords::new(engine.store.data_dir());
    let mut record = ModelRecord {
        references: vec![reference_text.clone()],
        manifest_digest: resolved.digest.clone(),
        config_digest,
        layers: layers
            .iter()
            .zip(&task_ids)
            .map(|(layer, task_id)| HeldLayer {
                layer: layer.clone(),
                task_id: task_id.clone(),
            })
            .collect(),
        placed: Vec::new(),
        pulled_at: chrono::Utc::now().to_rfc3339(),
    };
    if let Some(dir) = output {
        let policy = engine.output_policy;
        let manifest = resolved.bytes.clone();
        let target = dir.clone();
        let placed: PlaceOutcome = tokio::task::spawn_blocking(move || {
            layout::place_model(&target, &held, &manifest, &config, &policy)
        })
        .await
        .map_err(|err| TransferError::Internal {
            task_id: String::new(),
            what: format!(
                "placing the model panicked: {}",
                crate::transfer::panic_message(err)
            ),
        })??;
        summary.files_placed = placed.files;
        summary.hard_links = placed.hard_links;
        record.placed.push(dir.display().to_string());
    }
    records.save(record)?;
    summary.elapsed_micros = started.elapsed().as_micros() as u64;
    Ok(summary)
}

/// One layer's transfer, its pieces reported as progress.
async fn run_layer(
    engine: &Arc<Engine>,
    transfer: TransferRequest,
    index: u32,
    events: &Events,
) -> Result<TransferSummary, TransferError> {
    let prepared = engine.prepare(transfer).await?;
    let (tx, mut rx) = mpsc::channel::<crate::transfer::PieceOutcome>(64);
    let forward_events = events.clone();
    let forward = tokio::spawn(async move {
        while let Some(outcome) = rx.recv().await {
            send(
                &forward_events,
                Event::Progress(proto::LayerProgress {
                    layer: index,
                    bytes: outcome.piece.length,
                    transport: outcome.transport.to_owned(),
                    source: outcome.source,
                }),
            )
            .await;
        }
    });
    let result = engine.run(prepared, tx).await;
    let _ = forward.await;
    result
}
