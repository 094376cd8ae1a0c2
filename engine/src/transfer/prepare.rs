//! Preparing a transfer: the request checked, its sources asked for their `TaskInfo`, the
//! geometry and the version pinned, the task reserved, all before any piece moves.

use super::*;

impl Engine {
    /// Validates a request and reserves its task; errors here are the caller's mistakes or
    /// the store's state, reported before any byte moves.
    pub async fn prepare(
        &self,
        mut request: TransferRequest,
    ) -> Result<PreparedTransfer, TransferError> {
        let origin = request
            .origin
            .as_ref()
            .map(|o| Origin::new(o, self.origin_settings.clone(), Arc::clone(&self.metrics)))
            .transpose()?
            .map(Arc::new);
        if let (Some(wanted), true) = (&request.origin, request.task_id.is_empty()) {
            let user_piece = (request.piece_length != 0).then_some(request.piece_length);
            if let Some(piece) = user_piece {
                geometry::validate_piece_length(piece)?;
            }
            request.task_id = crate::origin::task_id(
                &wanted.url,
                wanted.tag.as_deref(),
                wanted.application.as_deref(),
                user_piece,
            )?;
        }
        geometry::validate_task_id(&request.task_id)?;
        if request.transport == TransportChoice::Rdma && self.rdma.is_none() {
            return Err(TransferError::FailedPrecondition(
                "RDMA was asked for but this daemon has no usable RDMA device (see `ferry devices`)".into(),
            ));
        }
        if request.sources.is_empty() && origin.is_none() {
            return Err(TransferError::InvalidArgument(
                "no source peers and no origin URL given".into(),
            ));
        }
        if request.sources.len() > MAX_SOURCES {
            return Err(TransferError::InvalidArgument(format!(
                "{} sources given; at most {MAX_SOURCES}",
                request.sources.len()
            )));
        }
        if !request.source_weights.is_empty()
            && request.source_weights.len() != request.sources.len()
        {
            return Err(TransferError::InvalidArgument(format!(
                "{} source weights for {} sources",
                request.source_weights.len(),
                request.sources.len()
            )));
        }
        let mut sources = Vec::new();
        let mut source_weights = Vec::new();
        for (index, source) in request.sources.iter().enumerate() {
            let addr = tokio::net::lookup_host(source.as_str())
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    TransferError::InvalidArgument(format!(
                        "source {source:?} is not a reachable host:port"
                    ))
                })?;
            if !sources.contains(&addr) {
                sources.push(addr);
                if let Some(&weight) = request.source_weights.get(index) {
                    source_weights.push(weight);
                }
            }
        }
        let output = request
            .output
            .as_deref()
            .map(|p| self.output_target(p))
            .transpose()?;
        if request.piece_length != 0 {
            geometry::validate_piece_length(request.piece_length)?;
        }
        let mut source_names: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        // Every source is asked for its geometry and manifest once, at once: the answers fix
        // the geometry (when the request leaves it open) and which sources may serve.
        // Bounded tightly when the geometry is given: a silent source must not hold up the
        // start (its workers ask it again, cancellably); otherwise the answers are needed.
        let stat_limit = if request.content_length != 0 && request.piece_length != 0 {
            self.settings.piece_timeout.min(STAT_AT_START_LIMIT)
        } else {
            self.settings.piece_timeout
        };
        let stats = self
            .stat_sources(&request.task_id, &sources, stat_limit)
            .await;
        let held = self.store.get(&request.task_id);
        let known = |s: &SourceStat| matches!(s, SourceStat::Known(_));
        let lengths_given = request.content_length != 0 && request.piece_length != 0;
        let geometry = match &origin {
            // Nothing else can tell: the origin's answer fixes the geometry.
            Some(origin) if held.is_none() && !lengths_given && !stats.iter().any(known) => {
                let probe = origin.probe().await?;
                if request.content_length != 0 && request.content_length != probe.length {
                    return Err(TransferError::FailedPrecondition(format!(
                        "the origin {} has {} bytes, not the {} asked for",
                        origin.name(),
                        probe.length,
                        request.content_length
                    )));
                }
                let piece_length = match request.piece_length {
                    0 => geometry::default_piece_length(probe.length),
                    set => set,
                };
                let geometry = Geometry::new(probe.length, piece_length)?;
                if !probe.ranges && geometry.piece_count() > 1 {
                    return Err(OriginError::NoRangeSupport {
                        url: origin.name().to_owned(),
                        length: probe.length,
                        pieces: geometry.piece_count(),
                    }
                    .into());
                }
                geometry
            }
            _ => resolve_geometry(&request, held.as_deref(), &source_names, &stats)?,
        };
        if let Some(task) = &held {
            if task.geometry() != geometry {
                return Err(TransferError::Store(StoreError::GeometryConflict {
                    task_id: request.task_id.clone(),
                    stored_length: task.geometry().content_length(),
                    stored_piece: task.geometry().piece_length(),
                    length: geometry.content_length(),
                    piece: geometry.piece_length(),
                }));
            }
        }
        if held.is_none() {
            self.check_capacity(&request.task_id, geometry)?;
        }
        for &number in &request.pieces {
            geometry.piece(number)?;
        }
        let mut pieces = if request.pieces.is_empty() {
            (0..geometry.piece_count()).collect()
        } else {
            request.pieces.clone()
        };
        pieces.sort_unstable();
        pieces.dedup();
        if output.is_some() && pieces.len() as u32 != geometry.piece_count() {
            return Err(TransferError::InvalidArgument(
                "an output path needs every piece of the task; request all pieces or no output"
                    .into(),
            ));
        }
        let held_manifest = match &held {
            Some(task) => task.manifest().map_err(|source| TransferError::Manifest {
                task_id: request.task_id.clone(),
                source,
            })?,
            None => None,
        };
        let pinning = pin::choose(
            &request.task_id,
            request.digest,
            held_manifest,
            geometry,
            &source_names,
            &stats,
        )
        .map_err(|err| TransferError::ContentConflict(err.to_string()))?;
        if let Some(origin) = &origin {
            // The origin is the last source; it states no manifest.
            source_names.push(origin.name().to_owned());
        }
        let task = self.store.create_or_get(&request.task_id, geometry)?;
        let writing = match task.try_begin_writing(WriterKind::Transfer) {
            Ok(guard) => guard,
            Err(StoreError::Busy {
                writer: WriterKind::Transfer,
                ..
            }) => return Err(TransferError::AlreadyRunning(request.task_id)),
            Err(err) => return Err(err.into()),
        };
        if let (Some(pin), None) = (pinning.pin, held_manifest) {
            // Recorded before any piece arrives: a restart, or this daemon serving the pieces
            // it has so far, keeps to the same version.
            task.set_manifest(Manifest {
                content_sha256: pin,
                state: ManifestState::Pinned,
            })
            .map_err(|source| TransferError::Manifest {
                task_id: request.task_id.clone(),
                source,
            })?;
        }
        for (index, why) in &pinning.refused {
            tracing::warn!(task_id = %request.task_id, source = %source_names[*index], reason = %why, "source refused");
        }
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .expect("running lock")
            .insert(request.task_id.clone(), cancel.clone());
        let streams_per_source = if request.streams_per_source == 0 {
            self.settings.streams_per_source
        } else {
            request.streams_per_source.min(64)
        };
        Ok(PreparedTransfer {
            task,
            pieces,
            source_names,
            source_weights,
            sources,
            pinning,
            output,
            streams_per_source,
            transport: request.transport,
            origin_connections: match request.origin_connections {
                0 => self.origin_settings.connections,
                n => n.min(64),
            },
            origin,
            cancel,
            attempts: None,
            _writing: writing,
        })
    }

    /// Asks every source for the task's `TaskInfo` at once, each bounded by the piece timeout.
    pub(super) async fn stat_sources(
        &self,
        task_id: &str,
        sources: &[SocketAddr],
        limit: Duration,
    ) -> Vec<SourceStat> {
        let mut asking = tokio::task::JoinSet::new();
        for (index, &source) in sources.iter().enumerate() {
            let (tcp, task_id) = (Arc::clone(&self.tcp), task_id.to_owned());
            asking.spawn(async move {
                let stat = match tokio::time::timeout(limit, tcp.stat_task(source, &task_id)).await
                {
                    Ok(Ok(info)) => SourceStat::Known(info),
                    Ok(Err(err)) => SourceStat::Unknown(err.to_string()),
                    Err(_) => SourceStat::Unknown(format!("no answer within {limit:?}")),
                };
                (index, stat)
            });
        }
        let mut stats = vec![SourceStat::Unknown(String::new()); sources.len()];
        while let Some(joined) = asking.join_next().await {
            if let Ok((index, stat)) = joined {
                stats[index] = stat;
            }
        }
        stats
    }

    /// A new task must fit the configured cap and the data dir's free space before anything
    /// is allocated for it: a source's word alone must not make this daemon allocate.
    pub(super) fn check_capacity(
        &self,
        task_id: &str,
        geometry: Geometry,
    ) -> Result<(), TransferError> {
        let length = geometry.content_length();
        let cap = self.settings.max_task_bytes;
        if length > cap {
            return Err(TransferError::ResourceExhausted(format!(
                "task {task_id} has {length} bytes, over this daemon's store.max_task_bytes ({cap})"
            )));
        }
        let free = nix::sys::statvfs::statvfs(self.store.data_dir())
            .map(|fs| fs.blocks_available().saturating_mul(fs.fragment_size()))
            .map_err(|errno| {
                TransferError::Store(StoreError::Io {
                    context: format!("checking free space in {}", self.store.data_dir().display()),
                    source: errno.into(),
                })
            })?;
        if length > free {
            return Err(TransferError::Store(StoreError::NoSpace {
                task_id: task_id.into(),
                needed: length,
                path: self.store.data_dir().to_owned(),
            }));
        }
        Ok(())
    }
}

/// The task's geometry: the request's lengths when both are given, else the held task's,
/// else the first source (in the order given) that states one agreeing with what was asked.
fn resolve_geometry(
    request: &TransferRequest,
    held: Option<&StoredTask>,
    names: &[String],
    stats: &[SourceStat],
) -> Result<Geometry, TransferError> {
    if request.content_length != 0 && request.piece_length != 0 {
        return Ok(Geometry::new(request.content_length, request.piece_length)?);
    }
    if let Some(task) = held {
        return Ok(task.geometry());
    }
    let mut errors = Vec::new();
    for (name, stat) in names.iter().zip(stats) {
        match stat {
            SourceStat::Known(info) => {
                let conflicts = (request.content_length != 0
                    && request.content_length != info.content_length)
                    || (request.piece_length != 0 && request.piece_length != info.piece_length);
                if conflicts {
                    errors.push(format!(
                        "{name} holds it with content length {} and piece length {}, not what was asked",
                        info.content_length, info.piece_length
                    ));
                    continue;
                }
                return Ok(Geometry::new(info.content_length, info.piece_length)?);
            }
            SourceStat::Unknown(err) => errors.push(format!("{name}: {err}")),
        }
    }
    Err(TransferError::SourcesExhausted(format!(
        "no source could tell the geometry of task {} (pass content and piece length): {}",
        request.task_id,
        errors.join("; ")
    )))
}
