//! The model calls of `ferry.v1.Ferry`: validation and status codes, as for the task calls.

use super::pull::{self, ModelPull};
use super::record::{ModelRecord, ModelRecords};
use super::reference::Reference;
use super::registry::{Credentials, RegistryOptions};
use super::ModelError;
use crate::daemon::Admission;
use crate::proto::{self, model_event::Event};
use crate::transfer::{Engine, TransportChoice};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::Status;

pub type ModelEventStream = Pin<Box<dyn Stream<Item = Result<proto::ModelEvent, Status>> + Send>>;

/// What a model failure means to the caller: a malformed request INVALID_ARGUMENT; a registry
/// refusing access PERMISSION_DENIED; nothing there NOT_FOUND; an artifact that is not a
/// model, or a layer or tar that cannot be placed safely, FAILED_PRECONDITION; bytes that do
/// not hash to their digest DATA_LOSS; an unreachable registry UNAVAILABLE; a layer's
/// transfer failure the transfer's own status.
pub fn model_status(err: ModelError) -> Status {
    let message = err.to_string();
    match err {
        ModelError::InvalidReference { .. } | ModelError::InvalidCredentials(_) => {
            Status::invalid_argument(message)
        }
        ModelError::Connect { .. } => Status::unavailable(message),
        ModelError::Status { code, .. } if code >= 500 || code == 429 || code == 408 => {
            Status::unavailable(message)
        }
        ModelError::Status { .. } | ModelError::Protocol { .. } => {
            Status::failed_precondition(message)
        }
        ModelError::Unauthorized { .. } => Status::permission_denied(message),
        ModelError::NotFound { .. } | ModelError::UnknownModel(_) => Status::not_found(message),
        ModelError::DigestMismatch { .. } => Status::data_loss(message),
        ModelError::NotAModel(_)
        | ModelError::BadLayer { .. }
        | ModelError::UnsafeTarPath { .. }
        | ModelError::OutputExists(_) => Status::failed_precondition(message),
        ModelError::Place { ref source, .. }
            if source.raw_os_error() == Some(nix::libc::ENOSPC) =>
        {
            Status::resource_exhausted(message)
        }
        ModelError::Place { .. } | ModelError::Read { .. } | ModelError::Record { .. } => {
            Status::internal(message)
        }
        ModelError::Transfer(err) => Status::from(*err),
        ModelError::Layer { source, .. } => {
            let code = Status::from(*source).code();
            Status::new(code, message)
        }
    }
}

fn transport_choice(value: i32) -> Result<TransportChoice, Status> {
    match proto::TransportPreference::try_from(value) {
        Ok(proto::TransportPreference::Auto) => Ok(TransportChoice::Auto),
        Ok(proto::TransportPreference::Tcp) => Ok(TransportChoice::Tcp),
        Ok(proto::TransportPreference::Rdma) => Ok(TransportChoice::Rdma),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown transport preference {value}"
        ))),
    }
}

/// `PullModel`: checks the request, then streams the pull's events and its summary (or its
/// error status) from a task of its own.
pub async fn pull_model(
    engine: Arc<Engine>,
    admission: Admission,
    request: proto::PullModelRequest,
) -> Result<ModelEventStream, Status> {
    let reference = Reference::parse(&request.reference).map_err(model_status)?;
    let transport = transport_choice(request.transport)?;
    let output = if request.output_dir.is_empty() {
        None
    } else {
        let dir = PathBuf::from(&request.output_dir);
        // The checks of a task output: absolute, no '..', inside output_dirs.
        engine
            .check_output_path(&dir)
            .map_err(|e| model_status(e.into()))?;
        Some(dir)
    };
    let credentials = match (
        request.registry_username.is_empty(),
        request.registry_password.is_empty(),
    ) {
        (true, true) => None,
        (false, _) => Some(Credentials {
            username: request.registry_username,
            password: request.registry_password,
        }),
        (true, false) => {
            return Err(Status::invalid_argument(
                "registry_password without registry_username",
            ))
        }
    };
    let pull = ModelPull {
        reference,
        output,
        registry: RegistryOptions {
            plain_http: request.plain_http,
            credentials,
            tls: None,
        },
        sources: request.sources,
        transport,
        origin_connections: request.origin_connections,
        layers_in_flight: match request.layers_in_flight {
            0 => pull::DEFAULT_LAYERS_IN_FLIGHT,
            n => n as usize,
        },
    };
    let (events_tx, events_rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let last_tx = events_tx.clone();
        let result = tokio::spawn(pull::pull_model(engine, pull, events_tx))
            .await
            .unwrap_or_else(|err| {
                Err(ModelError::from(crate::transfer::TransferError::Internal {
                    task_id: String::new(),
                    what: format!(
                        "the model pull panicked: {}",
                        crate::transfer::panic_message(err)
                    ),
                }))
            });
        let last = match result {
            Ok(summary) => Ok(proto::ModelEvent {
                event: Some(Event::Summary(summary)),
            }),
            Err(err) => {
                tracing::warn!(error = %err, "model pull failed");
                Err(model_status(err))
            }
        };
        let _ = last_tx.send(last).await;
        drop(admission);
    });
    Ok(Box::pin(ReceiverStream::new(events_rx)))
}

pub fn model_message(engine: &Engine, record: &ModelRecord) -> proto::Model {
    let layers: Vec<proto::ModelLayer> = record
        .layers
        .iter()
        .map(|l| pull::layer_message(engine, &l.layer, &l.task_id))
        .collect();
    proto::Model {
        references: record.references.clone(),
        manifest_digest: record.manifest_digest.clone(),
        config_digest: record.config_digest.clone(),
        complete: layers.iter().all(|l| l.held),
        total_bytes: layers.iter().map(|l| l.size).sum(),
        layers,
        placed: record.placed.clone(),
        pulled_at: record.pulled_at.clone(),
    }
}

pub fn stat_model(
    engine: &Engine,
    request: proto::StatModelRequest,
) -> Result<proto::Model, Status> {
    if request.model.is_empty() {
        return Err(Status::invalid_argument(
            "model is empty: give a reference (oci://...) or a manifest digest (sha256:...)",
        ));
    }
    if !request.model.starts_with("oci://") && !request.model.starts_with("sha256:") {
        return Err(Status::invalid_argument(format!(
            "model {:?}: give a reference (oci://...) or a manifest digest (sha256:...)",
            request.model
        )));
    }
    let what = if request.model.starts_with("oci://") {
        Reference::parse(&request.model)
            .map_err(model_status)?
            .to_string()
    } else {
        super::reference::parse_digest(&request.model).map_err(Status::invalid_argument)?
    };
    let records = ModelRecords::new(engine.store.data_dir());
    let record = records
        .find(&what)
        .map_err(model_status)?
        .ok_or_else(|| model_status(ModelError::UnknownModel(what)))?;
    Ok(model_message(engine, &record))
}

pub fn list_models(engine: &Engine) -> Result<proto::ListModelsResponse, Status> {
    let records = ModelRecords::new(engine.store.data_dir());
    Ok(proto::ListModelsResponse {
        models: records
            .list()
            .map_err(model_status)?
            .iter()
            .map(|r| model_message(engine, r))
            .collect(),
    })
}
