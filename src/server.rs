//! Wiring: prepare the database and keys, build the state and router, run the listeners, shut
//! down gracefully.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::state::AppState;
use crate::storage::{self, now_ms};

/// Installs the process-wide TLS crypto provider (aws-lc-rs). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Makes glibc return large freed blocks to the OS. By default glibc raises its mmap threshold
/// after the first large free, after which every argon2 working buffer (19 MiB by default) comes
/// from a per-thread heap arena and stays resident: a burst of logins left gigabytes of RSS.
/// A fixed threshold keeps such buffers mmapped, so they are unmapped when freed.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called once at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
}

/// Creates the database if needed, migrates it, checks the server name and loads the signing key.
pub async fn prepare(config: Config) -> anyhow::Result<AppState> {
    install_crypto_provider();
    tune_allocator();
    if config.testing.fail_append_containing.is_some() || config.testing.fail_push_containing.is_some() {
        tracing::warn!("testing.* fault injection is configured: some writes will fail on purpose");
    }
    if config.database.create_if_missing {
        storage::create_database_if_missing(&config.database.url).await?;
    }
    let pool = storage::connect(&config.database).await?;
    storage::migrate(&pool).await?;
    let recorded = storage::meta::claim_server_name(&pool, &config.server_name).await?;
    if recorded != config.server_name {
        anyhow::bail!(
            "this database belongs to server `{recorded}`, but server_name is `{}`; \
             the server name cannot change once accounts exist",
            config.server_name
        );
    }
    let key = crate::keys::load_or_create(&pool, config.signing_key.path.as_deref()).await?;
    tracing::info!(server_name = %config.server_name, key_id = %key.key_id, "database ready");
    let state = AppState::new(config, pool, key)?;
    // Before anything takes stream positions: the other instances must know of this one.
    crate::cluster::join(&state).await?;
    crate::sync::init(&state).await?;
    crate::cluster::ready(&state);
    Ok(state)
}

/// A running server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub client_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The federation listener's address, when `listen.federation` is set.
    pub federation_addr: Option<SocketAddr>,
    pub state: AppState,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl RunningServer {
    /// Stops accepting connections, lets in-flight requests finish, closes the pool.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.context("server task panicked")??;
        }
        crate::cluster::leave(&self.state).await;
        self.state.db.close().await;
        Ok(())
    }

    /// Waits until the server stops by itself (it only does on error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        for t in self.tasks.drain(..) {
            t.await.context("server task panicked")??;
        }
        Ok(())
    }

    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Binds the listeners and serves until shut down.
pub async fn start(state: AppState) -> anyhow::Result<RunningServer> {
    let (stop, stop_rx) = watch::channel(false);
    let client = TcpListener::bind(state.config.listen.client)
        .await
        .with_context(|| format!("cannot listen on {}", state.config.listen.client))?;
    let client_addr = client.local_addr()?;
    let app = crate::http::with_layers(crate::api::router(), state.clone());
    let mut tasks = vec![serve(client, app, stop_rx.clone())];

    let mut metrics_addr = None;
    if let Some(addr) = state.config.listen.metrics {
        let l = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        metrics_addr = Some(l.local_addr()?);
        let s = state.clone();
        let app = Router::new().route("/metrics", get(move || async move { s.metrics.render(&s.db) }));
        tasks.push(serve(l, app, stop_rx.clone()));
    }
    let mut federation_addr = None;
    if let Some(addr) = state.config.listen.federation {
        let l = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        federation_addr = Some(l.local_addr()?);
        let app = crate::http::with_layers(crate::api::federation::router(state.federation.enabled), state.clone());
        let f = &state.config.federation;
        match (&f.tls_certificate, &f.tls_private_key) {
            (Some(cert), Some(key)) => {
                let tls = crate::federation::tls::server_config(cert, key)?;
                let l = crate::federation::tls::TlsListener::new(l, tls)?;
                tasks.push(serve_tls(l, app, stop_rx.clone()));
            }
            _ => tasks.push(serve(l, app, stop_rx.clone())),
        }
    }
    // Per instance: its own temporary files and export jobs.
    tasks.push(tokio::spawn(crate::media::housekeeping(state.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(crate::records::jobs::housekeeping(state.clone(), stop_rx.clone())));
    // Singleton duties: on one instance at a time (see `cluster::lease`).
    let s = state.clone();
    tasks.push(tokio::spawn(crate::cluster::lease::run(
        state.clone(),
        MAINTENANCE_LEASE.to_owned(),
        stop_rx.clone(),
        None,
        move |stop| maintenance(s.clone(), stop),
    )));
    tasks.push(crate::federation::sender::spawn(&state, stop_rx.clone()));
    crate::appservice::ensure_senders(&state).await?;
    tasks.extend(crate::appservice::sender::spawn_all(&state, &stop_rx));
    {
        // Appservice sockets outlive the HTTP server's graceful shutdown (they are upgraded
        // connections): they are closed with `server_shutting_down` here.
        let (state, mut stop) = (state.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            state.appservice_sockets.shut_down();
        });
    }
    crate::rooms::spawn_profile_propagation(state.clone());
    // Detached: a re-index (after `search.language` changed) is resumable and idempotent.
    tokio::spawn(crate::search::reindex_if_needed(state.clone()));
    if state.sso.enabled() {
        let s = state.clone();
        tokio::spawn(async move { s.sso.warm_up().await });
    }
    let mut typing_changes = state.typing.room_changes();
    let typing_state = state.clone();
    tokio::spawn(async move {
        while let Some(room_nid) = typing_changes.recv().await {
            crate::sync::typing_changed(&typing_state, room_nid);
            crate::appservice::sender::typing_changed(&typing_state, room_nid);
        }
    });
    tracing::info!(%client_addr, ?metrics_addr, ?federation_addr, "listening");
    Ok(RunningServer { client_addr, metrics_addr, federation_addr, state, stop, tasks })
}

fn serve(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        // Responses go out as soon as they are written (no Nagle delay waiting for an ACK).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .context("HTTP server failed")
    })
}

/// The lease of the singleton maintenance duties.
pub const MAINTENANCE_LEASE: &str = "maintenance";

/// The duties one instance runs for all: delayed events, push retries, retention, clean-up.
async fn maintenance(state: AppState, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let retention = async {
        if state.config.retention.enabled {
            crate::rooms::retention::purge_loop(state.clone(), stop.clone()).await
        } else {
            Ok(())
        }
    };
    tokio::try_join!(
        crate::rtc::delayed::run(state.clone(), stop.clone()),
        crate::push::gateway::resume_loop(state.clone(), stop.clone()),
        housekeeping(state.clone(), stop.clone()),
        retention,
    )?;
    Ok(())
}

fn serve_tls(
    listener: crate::federation::tls::TlsListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        // `tap_io` gives the listener axum's `ConnectInfo<SocketAddr>` support.
        let listener = axum::serve::ListenerExt::tap_io(listener, |_| {});
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .context("federation HTTPS server failed")
    })
}

/// Periodic clean-up of short-lived rows.
async fn housekeeping(state: AppState, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let uia_cutoff = now_ms() - state.config.auth.uia_session_lifetime_secs as i64 * 1000;
        if let Err(e) = storage::uia::delete_expired(&state.db, uia_cutoff).await {
            tracing::warn!(error = %e, "UIA session clean-up failed");
        }
        if let Err(e) = storage::registration::delete_expired_nonces(&state.db, now_ms() - 60_000).await {
            tracing::warn!(error = %e, "nonce clean-up failed");
        }
        if let Err(e) = storage::sso::delete_expired(&state.db).await {
            tracing::warn!(error = %e, "SSO clean-up failed");
        }
        if let Err(e) = storage::oauth::delete_expired(&state.db).await {
            tracing::warn!(error = %e, "OAuth clean-up failed");
        }
        // To-device queues are bounded per device; transaction IDs are kept a day for retries.
        let max = state.config.limits.max_pending_to_device as i64;
        if let Err(e) = storage::e2ee::prune_to_device(&state.db, max, now_ms() - 86_400_000).await {
            tracing::warn!(error = %e, "to-device clean-up failed");
        }
        if let Err(e) = storage::openid::delete_expired(&state.db, now_ms()).await {
            tracing::warn!(error = %e, "OpenID token clean-up failed");
        }
        if let Err(e) = crate::sync::sliding::conn::housekeeping(&state).await {
            tracing::warn!(error = %e, "sliding sync connection clean-up failed");
        }
        let retention_ms = state.config.delayed_events.finalised_retention_secs.saturating_mul(1000) as i64;
        if let Err(e) = storage::delayed_events::delete_finalised_before(&state.db, now_ms() - retention_ms).await {
            tracing::warn!(error = %e, "delayed events clean-up failed");
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
