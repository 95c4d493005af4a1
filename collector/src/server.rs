//! Assembly: [`Collector::open`] builds the shared [`AppState`] from a [`Config`] (store,
//! credentials, log writer, pipeline), [`app`] builds the router, and
//! [`Collector::serve`] runs it until a shutdown signal, then drains and flushes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use axum::Router;
use axum::extract::{Request, State};
use axum::routing::{get, post};
use ipnet::IpNet;
use kith_sdk_core::protocol::MessageType;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tower_http::cors::CorsLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::activation::Activation;
use crate::config::{Config, FileConfig};
use crate::error::{ApiError, StoreError};
use crate::health::Health;
use crate::identity::Identity;
use crate::imports::job::Importer;
use crate::imports::postgres::PostgresSource;
use crate::imports::watch::Watchers;
use crate::pipeline::{Deduplicate, PanicOn, Pipeline, Stage, Wake};
use crate::processing::{DEFAULT_RULES, Process, Rules};
use crate::ratelimit::RateLimiter;
use crate::secrets::MasterKey;
use crate::segments::{self, Membership, Segment};
use crate::stats::Stats;
use crate::store::Store;
use crate::writer::LogWriter;
use crate::{admin, ingest};

/// How many stored events the live tail buffers for a slow subscriber.
const LIVE_BUFFER: usize = 1_024;

/// State shared by every handler.
#[derive(Debug)]
pub struct AppState {
    /// The embedded store.
    pub store: Arc<Store>,
    /// Event accounting.
    pub stats: Arc<Stats>,
    /// The background threads' health and the quarantine count.
    pub health: Arc<Health>,
    /// Group commit onto the log.
    pub writer: Arc<LogWriter>,
    /// Runs file imports.
    pub importer: Arc<Importer>,
    /// Where uploaded import files wait for the importer.
    pub imports_dir: PathBuf,
    /// The largest import file taken.
    pub max_import_bytes: u64,
    /// The deduplication window, in milliseconds.
    pub dedup_window_ms: i64,
    /// Stored events as JSON, for the live tail.
    pub live: broadcast::Sender<Arc<str>>,
    /// The admin API's bearer token.
    pub admin_token: String,
    /// `/readyz` fails while the pipeline is further behind than this.
    pub ready_max_lag: std::time::Duration,
    /// How long a request body may take to arrive (between two reads, for uploads).
    pub body_timeout: std::time::Duration,
    /// The free-space watermark.
    pub disk: Arc<crate::disk::Disk>,
    /// Places for live tails; one is held while a tail is open.
    pub live_tails: Arc<tokio::sync::Semaphore>,
    /// Connections refused because too many were open.
    pub refused_connections: Arc<crate::http::Refused>,
    /// Proxies whose `X-Forwarded-For` is trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// What is stored of clients' IP addresses.
    pub store_ip: crate::config::StoreIp,
    /// The per-source rate limit, when configured.
    pub limiter: Option<RateLimiter>,
    /// Each source's processing rules.
    pub rules: Arc<Rules>,
    /// The identity graph, when identity resolution is on.
    pub identity: Option<Arc<Identity>>,
    /// Segment membership, kept current (with identity resolution).
    pub membership: Option<Arc<Membership>>,
    /// Campaigns and the delivery outbox (with identity resolution).
    pub activation: Option<Arc<Activation>>,
    sources: HashMap<String, Arc<str>>,
    /// Import keys, by key: the source each imports into.
    import_keys: HashMap<String, Arc<str>>,
    shutdown: watch::Sender<bool>,
}

impl AppState {
    /// The source id behind a write key.
    pub fn source_for(&self, write_key: &str) -> Option<Arc<str>> {
        self.sources.get(write_key).cloned()
    }

    /// The source an import key imports into.
    pub fn import_source_for(&self, import_key: &str) -> Option<Arc<str>> {
        self.import_keys.get(import_key).cloned()
    }

    /// The ids of the sources this collector accepts.
    pub fn source_ids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.sources.values()
    }

    /// Whether the collector is ready for traffic (not shutting down).
    pub fn ready(&self) -> bool {
        !*self.shutdown.borrow()
    }

    /// Turns `true` when shutdown begins; long-lived responses (the live tail) end then.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// A source's id: derived from its write key, so that it is stable without being secret.
pub fn source_id(write_key: &str) -> String {
    let digest = Sha256::digest(write_key.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("src_{hex}")
}

/// A credential the collector uses, and whether it was generated on this start.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The secret.
    pub value: String,
    /// Generated and stored now (rather than given or found in the store).
    pub generated: bool,
}

/// A running collector: its state, log writer and pipeline thread.
#[derive(Debug)]
pub struct Collector {
    state: Arc<AppState>,
    wake: Arc<Wake>,
    watchers: Watchers,
    postgres: Vec<PostgresSource>,
    metrics: Option<std::net::TcpListener>,
    limits: crate::http::Limits,
    pipeline: Mutex<Option<JoinHandle<()>>>,
    /// The write keys in use.
    pub write_keys: Vec<Credential>,
    /// The admin token in use.
    pub admin_token: Credential,
}

fn generate_secret(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn credential(
    store: &Store,
    secrets: &MasterKey,
    given: Option<String>,
    name: &str,
    prefix: &str,
) -> Result<Credential, StoreError> {
    if let Some(value) = given {
        return Ok(Credential {
            value,
            generated: false,
        });
    }
    let (value, generated) = store.credential(name, secrets, || generate_secret(prefix))?;
    Ok(Credential { value, generated })
}

/// The stored rules, with the config file's applied over them (and stored).
fn load_rules(store: &Store, file: &FileConfig) -> Result<Rules, StoreError> {
    let rules = Rules::default();
    let from_file = file
        .sources
        .iter()
        .filter_map(|s| s.rules.clone().map(|r| (source_id(&s.write_key), r)))
        .chain(
            file.default_rules
                .clone()
                .map(|r| (DEFAULT_RULES.to_owned(), r)),
        );
    for (source, source_rules) in from_file {
        store.put_rules(&source, Some(&source_rules))?;
    }
    for (source, source_rules) in store.rules()? {
        rules
            .set(&source, source_rules)
            .map_err(|e| StoreError::Corrupt(format!("stored rules of {source}: {e}")))?;
    }
    Ok(rules)
}

impl Collector {
    /// Opens the store in `config.data_dir`, resolves credentials (generating and storing
    /// a dev write key and an admin token when none is given) and starts the log writer
    /// and the pipeline.
    ///
    /// # Errors
    ///
    /// When the store cannot be opened or the threads cannot start.
    pub fn open(config: &Config) -> Result<Self, StoreError> {
        let store = Arc::new(Store::open(&config.data_dir, config.cache_bytes)?);
        let secrets = Arc::new(MasterKey::load(
            config.secret_key.as_deref(),
            &config
                .secret_key_file
                .clone()
                .unwrap_or_else(|| config.data_dir.join("secret.key")),
        )?);
        let file = config.file.clone().unwrap_or_default();
        let mut given: Vec<String> = config
            .write_keys
            .iter()
            .chain(file.write_keys())
            .cloned()
            .collect();
        given.sort();
        given.dedup();
        let write_keys = if given.is_empty() {
            vec![credential(&store, &secrets, None, "write_key", "wk")?]
        } else {
            given
                .into_iter()
                .map(|value| Credential {
                    value,
                    generated: false,
                })
                .collect()
        };
        let rules = Arc::new(load_rules(&store, &file)?);
        let admin_token = credential(
            &store,
            &secrets,
            config.admin_token.clone(),
            "admin_token",
            "adm",
        )?;
        let (ingest, pipeline_counters) = store.counters()?;
        let stats = Arc::new(Stats::restore(ingest, pipeline_counters));
        let health = Arc::new(Health::default());
        let mut panic_on_event = None;
        for fault in &config.faults {
            match fault.split_once(':') {
                Some(("stage_panic", event)) => panic_on_event = Some(event.to_owned()),
                Some(("thread_panic", thread)) => health.inject_panic(thread),
                _ => return Err(StoreError::Start(format!("the fault {fault:?}"))),
            }
        }
        let wake = Arc::new(Wake::default());
        let (live, _) = broadcast::channel(LIVE_BUFFER);

        let identity_config = file
            .identity
            .clone()
            .or_else(|| config.identity.then(Default::default));
        let identity = identity_config
            .map(|c| {
                c.compile()
                    .map(|rules| Arc::new(Identity::new(store.clone(), rules)))
                    .map_err(|e| StoreError::Start(format!("identity resolution: {e}")))
            })
            .transpose()?;
        let mut stages: Vec<Box<dyn Stage>> = vec![
            Box::new(Process::new(rules.clone())),
            Box::new(Deduplicate::new(store.clone(), config.dedup_window)),
        ];
        let membership = match &identity {
            Some(identity) => {
                for (key, why) in segments::broken(&store)? {
                    tracing::error!(segment = %key, reason = %why, "a stored segment cannot be read; it is left out until replaced or deleted");
                }
                let segments: Vec<Segment> = segments::all(&store)?.into_values().collect();
                Some(Membership::start(
                    store.clone(),
                    identity.clone(),
                    &segments,
                    &health,
                )?)
            }
            None => None,
        };
        let writer = Arc::new(LogWriter::start(
            store.clone(),
            stats.clone(),
            wake.clone(),
            &health,
        )?);
        let activation = match (&identity, &membership) {
            (Some(identity), Some(membership)) => Some(Activation::start(
                store.clone(),
                identity.clone(),
                membership.clone(),
                writer.clone(),
                crate::activation::Settings {
                    outbound: crate::activation::outbound::Outbound {
                        allow_private: config.allow_private_destinations,
                        push_hosts: config
                            .push_service_hosts
                            .iter()
                            .map(|h| h.trim().to_ascii_lowercase())
                            .filter(|h| !h.is_empty())
                            .collect(),
                    },
                    export_root: config
                        .export_dir
                        .clone()
                        .unwrap_or_else(|| config.data_dir.join("exports")),
                    secrets: secrets.clone(),
                },
                &health,
            )?),
            _ => None,
        };
        if let (Some(identity), Some(membership), Some(activation)) =
            (&identity, &membership, &activation)
        {
            let more: Arc<dyn segments::live::MoreIdentifiers> = activation.clone();
            membership.add_identifiers(Arc::downgrade(&more));
            stages.push(Box::new(identity.stage()));
            stages.push(Box::new(activation.tokens_stage()));
            stages.push(Box::new(membership.stage()));
            stages.push(Box::new(activation.events_stage()));
        }
        if let Some(event) = panic_on_event {
            stages.push(Box::new(PanicOn(event)));
        }
        let pipeline = Pipeline::new(
            store.clone(),
            stats.clone(),
            health.clone(),
            stages,
            live.clone(),
        )
        .with_retention(crate::pipeline::FailedRetention {
            max_age: config.failed_retention,
            max_count: config.max_failed_events,
        })
        .start(wake.clone())
        .map_err(|e| StoreError::Start(format!("the pipeline: {e}")))?;
        let disk = Arc::new(crate::disk::Disk::new(
            config.data_dir.clone(),
            config.min_free_disk,
        ));
        let importer = Arc::new(Importer::start(
            store.clone(),
            writer.clone(),
            config.dedup_window,
            config.max_import_bytes,
            disk.clone(),
            &health,
        )?);
        let watchers = Watchers::start(&file.watch, &importer)
            .map_err(|e| StoreError::Start(format!("the directory watchers: {e}")))?;

        let state = AppState {
            store,
            stats,
            health,
            writer,
            importer,
            imports_dir: config.data_dir.join("imports"),
            max_import_bytes: config.max_import_bytes,
            dedup_window_ms: i64::try_from(config.dedup_window.as_millis()).unwrap_or(i64::MAX),
            live,
            admin_token: admin_token.value.clone(),
            ready_max_lag: config.ready_max_lag,
            body_timeout: config.body_timeout,
            disk,
            live_tails: Arc::new(tokio::sync::Semaphore::new(config.max_live_tails)),
            refused_connections: Arc::default(),
            trusted_proxies: config.trusted_proxies.clone(),
            store_ip: config.store_ip,
            limiter: (config.rate_limit > 0).then(|| RateLimiter::new(config.rate_limit)),
            rules,
            identity,
            membership,
            activation,
            import_keys: file
                .sources
                .iter()
                .filter_map(|s| {
                    let key = s.import_key.clone()?;
                    Some((key, Arc::from(source_id(&s.write_key))))
                })
                .collect(),
            sources: write_keys
                .iter()
                .map(|key| (key.value.clone(), Arc::from(source_id(&key.value))))
                .collect(),
            shutdown: watch::channel(false).0,
        };
        Ok(Collector {
            state: Arc::new(state),
            wake,
            watchers,
            postgres: file.postgres,
            limits: crate::http::Limits {
                header_timeout: config.header_timeout,
                max_connections: config.max_connections,
            },
            metrics: config
                .metrics_listen
                .map(|addr| {
                    let listener = std::net::TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .transpose()
                .map_err(|e: std::io::Error| {
                    StoreError::Start(format!("the metrics listener: {e}"))
                })?,
            pipeline: Mutex::new(Some(pipeline)),
            write_keys,
            admin_token,
        })
    }

    /// Where `/metrics` is served without authentication (`--metrics-listen`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared state, for tests and tools.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        app(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then stops taking requests,
    /// finishes those in flight, commits what the log writer holds and stops the
    /// pipeline after its current chunk.
    ///
    /// # Errors
    ///
    /// When the server fails.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if let Some(metrics) = &self.metrics {
            let metrics = TcpListener::from_std(metrics.try_clone()?)?;
            let app = admin::metrics_routes(self.state.clone());
            let mut stopping = self.state.shutdown_signal();
            tokio::spawn(async move {
                let stopped = async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                };
                if let Err(error) = axum::serve(metrics, app)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!(%error, "the metrics listener failed");
                }
            });
        }
        for source in &self.postgres {
            tokio::spawn(
                source
                    .clone()
                    .run(self.state.clone(), self.state.shutdown_signal()),
            );
        }
        let state = self.state.clone();
        let signal = async move {
            shutdown.await;
            state.begin_shutdown();
        };
        let result = crate::http::serve(
            listener,
            self.router(),
            self.limits,
            self.state.refused_connections.clone(),
            signal,
        )
        .await;
        tokio::task::spawn_blocking(move || self.shutdown())
            .await
            .map_err(std::io::Error::other)?;
        result
    }

    /// Stops the watchers, the log writer (committing what it holds), the importer and
    /// the pipeline, then flushes.
    pub fn shutdown(&self) {
        self.state.begin_shutdown();
        self.watchers.stop();
        // Activation writes timeline events through the writer: it stops first.
        if let Some(activation) = &self.state.activation {
            activation.close();
        }
        self.state.writer.close();
        self.state.importer.close();
        self.wake.stop();
        let pipeline = self
            .pipeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = pipeline
            && thread.join().is_err()
        {
            tracing::error!("the pipeline thread panicked");
        }
        if let Some(membership) = &self.state.membership {
            membership.close();
        }
        if let Err(error) = self.state.store.flush() {
            tracing::error!(%error, "final flush failed");
        }
    }
}

/// The collector's HTTP API over `state`.
pub fn app(state: Arc<AppState>) -> Router {
    let mut ingest_routes = Router::new().route("/v1/batch", post(ingest::batch));
    for kind in MessageType::ALL {
        ingest_routes = ingest_routes.route(
            &format!("/v1/{kind}"),
            post(
                move |State(state): State<Arc<AppState>>, request: Request| {
                    ingest::single(state, kind, request)
                },
            ),
        );
    }
    let ingest_routes = ingest_routes.layer(CorsLayer::permissive());
    let body_timeout = state.body_timeout;

    Router::new()
        .merge(ingest_routes)
        .merge(admin::routes(state.clone()))
        .merge(crate::imports::api::routes())
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()) })
        .with_state(state)
        // A body that stops arriving is dropped: no request waits forever for bytes.
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
}

/// A collector serving on its own thread and runtime: for tests and for embedding in a
/// program that is not async. Dropping it (or [`Running::stop`]) shuts it down.
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its first write key.
    pub write_key: String,
    /// Its admin token.
    pub admin_token: String,
    /// Where `/metrics` is served without authentication, when configured.
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Opens a collector with `config` and serves it on `config.listen` (port 0 picks a
    /// free port) from a new thread.
    ///
    /// # Errors
    ///
    /// When the store cannot be opened or the address cannot be bound.
    pub fn start(config: &Config) -> std::io::Result<Self> {
        let collector = Collector::open(config).map_err(std::io::Error::other)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind(config.listen))?;
        let addr = listener.local_addr()?;
        let write_key = collector
            .write_keys
            .first()
            .map(|key| key.value.clone())
            .unwrap_or_default();
        let admin_token = collector.admin_token.value.clone();
        let metrics_addr = collector.metrics_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kith-collector".to_owned())
            .spawn(move || {
                runtime.block_on(collector.serve(listener, async {
                    let _ = stopped.await;
                }))
            })?;
        Ok(Running {
            addr,
            write_key,
            admin_token,
            metrics_addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://addr` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Shuts down gracefully and waits until the store is flushed.
    ///
    /// # Errors
    ///
    /// When serving failed.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.shutdown()
    }

    /// Shuts down gracefully in place (later calls do nothing), so that a collector on
    /// the same data directory can start.
    ///
    /// # Errors
    ///
    /// When serving failed.
    pub fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| std::io::Error::other("the collector thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(%error, "collector stopped with an error");
        }
    }
}
