//! One local user's export, as a zip archive:
//!
//! - `profile.json`: account facts, profile fields, devices (no keys, no tokens), account data
//!   without secrets (secret storage, cross-signing, key backup, dehydrated-device and any
//!   SSSS-encrypted content are withheld and only named);
//! - `rooms/<name>-<hash>/messages.json` and `messages.html` for every room where the user has
//!   a membership (forgotten rooms included): the events the user may see by the room's history
//!   visibility (`rooms::visibility::Viewer`, as `/messages`), in client format, up to the
//!   export's start, or to the user's departure for a room they left or were removed from;
//! - `media/`: the files the user uploaded, up to `max_media_bytes` in all (the others are
//!   listed with the reason they were left out);
//! - `index.html` (the entry point for a reader) and `manifest.json` (what is where, with the
//!   size and SHA-256 of every file, written last).
//!
//! Nothing is held whole in memory: rooms are read 500 events at a time, media are streamed
//! from the store, and the archive is written incrementally by [`Archive`]. The archive is
//! built as `<output>.partial` and renamed into place once complete.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::archive::{self, Archive};
use super::html::{self, LineContext, escape};
use super::{paris_time, slug, utc_iso};
use crate::rooms::Room;
use crate::rooms::client::format;
use crate::rooms::visibility::Viewer;
use crate::state::AppState;
use crate::storage::media::MediaRow;
use crate::storage::records::UserRoom;
use crate::storage::users::UserRow;
use crate::storage::{self, now_ms};

/// Events read per query.
pub const PAGE: i64 = 500;
/// Buffered output is handed to the archive writer in chunks of about this size.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Most media bytes in the archive.
    pub max_media_bytes: u64,
    /// Replace an existing file at the output path.
    pub overwrite: bool,
}

/// Where an export is, reported as it goes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub rooms_total: u64,
    pub rooms_done: u64,
    pub events: u64,
    pub media_files: u64,
    pub media_skipped: u64,
    pub media_bytes: u64,
    /// The room being exported (its name: user-controlled text).
    #[serde(skip)]
    pub room: Option<String>,
}

/// A finished export.
#[derive(Debug, Clone)]
pub struct Summary {
    pub progress: Progress,
    /// Size of the archive.
    pub size_bytes: u64,
    /// Files in the archive.
    pub files: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("`{0}` is not a valid user ID")]
    InvalidUser(String),
    #[error("{0} is not a user of this server ({1})")]
    RemoteUser(String, String),
    #[error("there is no user {0} on this server")]
    UnknownUser(String),
    #[error("{} exists already", .0.display())]
    OutputExists(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Api(#[from] crate::error::Error),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// The local account `user_id` names, deactivated or not.
pub async fn check_local_user(state: &AppState, user_id: &str) -> Result<UserRow, ExportError> {
    let parsed = ruma::UserId::parse(user_id).map_err(|_| ExportError::InvalidUser(user_id.to_owned()))?;
    if parsed.server_name().as_str() != state.config.server_name {
        return Err(ExportError::RemoteUser(user_id.to_owned(), state.config.server_name.clone()));
    }
    storage::users::get(&state.db, user_id).await?.ok_or_else(|| ExportError::UnknownUser(user_id.to_owned()))
}

/// `<output>.partial`: where the archive is built.
pub fn partial_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Account data types that hold secrets or key material (and their sub-types): never exported.
const SECRET_ACCOUNT_DATA: &[&str] = &[
    "m.secret_storage",
    "m.cross_signing",
    "m.megolm_backup",
    "m.dehydrated_device",
    "org.matrix.msc3814",
    "org.matrix.msc2697",
];

/// Whether a piece of account data is a secret: a known secret type, or any content in the
/// secret-storage format (`encrypted: {key: {ciphertext, ...}}`).
pub fn is_secret_account_data(data_type: &str, content: &Value) -> bool {
    SECRET_ACCOUNT_DATA
        .iter()
        .any(|p| data_type == *p || data_type.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')))
        || content
            .get("encrypted")
            .and_then(Value::as_object)
            .is_some_and(|m| m.values().any(|v| v.get("ciphertext").is_some()))
}

/// Exports `user_id` (a local user) to a zip archive at `output`. `report` is called as the
/// export progresses (after each page of events, room and media file).
pub async fn export_user(
    state: &AppState,
    user_id: &str,
    output: &Path,
    opts: &ExportOptions,
    report: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Summary, ExportError> {
    let user = check_local_user(state, user_id).await?;
    if !opts.overwrite && tokio::fs::try_exists(output).await.unwrap_or(false) {
        return Err(ExportError::OutputExists(output.to_owned()));
    }
    let partial = partial_path(output);
    let io_err = |source| ExportError::Io { path: output.to_owned(), source };
    let started = now_ms();
    let archive =
        Archive::create(&partial, &archive::spill_path(&partial), super::zip_time(started)).await.map_err(io_err)?;
    // The safe watermark, not the highest committed position: a lower one may still commit
    // (on another instance too), and the export would silently miss it.
    let upto = crate::cluster::settled_event_position(&state.db).await?;
    let mut ex = Exporter {
        state,
        user,
        opts,
        report,
        archive,
        started,
        upto,
        progress: Progress::default(),
        media_paths: HashMap::new(),
        media: Vec::new(),
        skipped: Vec::new(),
        rooms: Vec::new(),
        dirs: HashSet::new(),
        display_name: None,
    };
    if let Err(e) = ex.run().await {
        ex.archive.abort().await;
        return Err(e);
    }
    let manifest = ex.manifest();
    let Exporter { archive, progress, .. } = ex;
    let files = archive.finish(Some(("manifest.json".into(), manifest))).await?;
    if !opts.overwrite && tokio::fs::try_exists(output).await.unwrap_or(true) {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ExportError::OutputExists(output.to_owned()));
    }
    if let Err(e) = tokio::fs::rename(&partial, output).await {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(io_err(e));
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = tokio::fs::File::open(dir).await
    {
        let _ = d.sync_all().await;
    }
    let size_bytes = tokio::fs::metadata(output).await.map_err(io_err)?.len();
    Ok(Summary { progress, size_bytes, files: files.len() })
}

/// A file of the user's in the archive.
#[derive(Serialize)]
struct MediaEntry {
    mxc: String,
    path: String,
    content_type: Option<String>,
    upload_name: Option<String>,
    size: u64,
    uploaded_at: String,
    sha256: Option<String>,
}

/// An upload left out, and why.
#[derive(Serialize)]
struct MediaSkipped {
    mxc: String,
    upload_name: Option<String>,
    size: Option<i64>,
    reason: String,
}

#[derive(Serialize)]
struct RoomSummary {
    room_id: String,
    name: String,
    directory: String,
    membership: String,
    forgotten: bool,
    encrypted: bool,
    events: u64,
    encrypted_events: u64,
    /// When the user left (or was removed): the room's events stop there.
    departed_at: Option<String>,
    #[serde(skip)]
    departed_ts: Option<i64>,
}

struct Exporter<'a> {
    state: &'a AppState,
    user: UserRow,
    opts: &'a ExportOptions,
    report: &'a (dyn Fn(&Progress) + Send + Sync),
    archive: Archive,
    started: i64,
    /// The last event stream position exported (the position when the export started).
    upto: i64,
    progress: Progress,
    /// `mxc://` URI → path in the archive, of exported media.
    media_paths: HashMap<String, String>,
    media: Vec<MediaEntry>,
    skipped: Vec<MediaSkipped>,
    rooms: Vec<RoomSummary>,
    dirs: HashSet<String>,
    display_name: Option<String>,
}

/// Output buffered until it is worth a message to the writer.
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.0))
    }
    fn full(&self) -> bool {
        self.0.len() >= CHUNK
    }
}

impl Exporter<'_> {
    async fn run(&mut self) -> Result<(), ExportError> {
        let user_id = self.user.user_id.clone();
        let rooms = storage::records::rooms_of_user(&self.state.db, &user_id).await?;
        self.progress.rooms_total = rooms.len() as u64;
        (self.report)(&self.progress);
        self.profile().await?;
        self.media().await?;
        for r in &rooms {
            self.room(r).await?;
            self.progress.rooms_done += 1;
            self.progress.room = None;
            (self.report)(&self.progress);
        }
        self.index().await?;
        Ok(())
    }

    // ---- profile.json ----

    async fn profile(&mut self) -> Result<(), ExportError> {
        let db = &self.state.db;
        let u = &self.user;
        let profile = storage::profiles::get(db, &u.user_id).await?.unwrap_or_default();
        self.display_name = profile.get("displayname").and_then(Value::as_str).map(str::to_owned);
        let devices = storage::records::devices_of_user(db, &u.user_id).await?;
        let mut global = Map::new();
        let mut per_room: Map<String, Value> = Map::new();
        let mut withheld = Vec::new();
        for (room_id, data_type, content) in storage::records::account_data_of_user(db, &u.user_id).await? {
            if is_secret_account_data(&data_type, &content.0) {
                withheld.push(json!({ "type": data_type, "room_id": (!room_id.is_empty()).then_some(&room_id) }));
            } else if room_id.is_empty() {
                global.insert(data_type, content.0);
            } else if let Value::Object(m) = per_room.entry(room_id).or_insert_with(|| json!({})) {
                m.insert(data_type, content.0);
            }
        }
        let doc = json!({
            "user_id": u.user_id,
            "account": {
                "created_ts": u.created_ts,
                "created_at": utc_iso(u.created_ts),
                "admin": u.is_admin,
                "user_type": u.user_type,
                "deactivated": u.deactivated,
            },
            "profile": profile,
            "devices": devices,
            "account_data": { "global": global, "rooms": per_room },
            "account_data_withheld": withheld,
            "note": "No password hash, access or refresh token, device or cross-signing key, key backup, \
                     secret storage or dehydrated device is ever exported. Account data holding secrets is \
                     named in account_data_withheld, without its content.",
        });
        self.archive.start("profile.json", true, false).await?;
        self.archive.data(Bytes::from(serde_json::to_vec_pretty(&doc).map_err(anyhow::Error::from)?)).await?;
        Ok(())
    }

    // ---- media/ ----

    async fn media(&mut self) -> Result<(), ExportError> {
        let mut from = 0;
        loop {
            let (rows, _) =
                storage::media::list_by_uploader(&self.state.db, &self.user.user_id, from, 100, "created_ts", true)
                    .await?;
            from += rows.len() as i64;
            let last = rows.len() < 100;
            for row in rows {
                self.media_file(row).await?;
                (self.report)(&self.progress);
            }
            if last {
                return Ok(());
            }
        }
    }

    fn skip(&mut self, row: &MediaRow, mxc: String, reason: impl Into<String>) -> Result<(), ExportError> {
        self.progress.media_skipped += 1;
        self.skipped.push(MediaSkipped {
            mxc,
            upload_name: row.upload_name.clone(),
            size: row.size,
            reason: reason.into(),
        });
        Ok(())
    }

    async fn media_file(&mut self, row: MediaRow) -> Result<(), ExportError> {
        let mxc = format!("mxc://{}/{}", row.server_name, row.media_id);
        let declared = row.size.unwrap_or(0).max(0) as u64;
        let budget = self.opts.max_media_bytes.saturating_sub(self.progress.media_bytes);
        if row.quarantined_by.is_some() {
            return self.skip(&row, mxc, "quarantined by an administrator");
        }
        if row.scan_verdict.as_deref() == Some("infected") {
            return self.skip(&row, mxc, "found infected by the antivirus");
        }
        if declared > budget {
            return self.skip(&row, mxc, "over the archive's media size limit (records.max_media_bytes)");
        }
        let Some(key) = row.storage_key.as_deref() else { return Ok(()) };
        let mut stream = match self.state.media.store.get(key, None).await {
            Ok(Some(s)) => s,
            Ok(None) => return self.skip(&row, mxc, "missing from the media store"),
            Err(e) => return self.skip(&row, mxc, format!("unreadable from the media store: {e:#}")),
        };
        let path = format!("media/{}", media_file_name(&row));
        self.archive.start(path.clone(), false, declared >= 0xFFFF_0000).await?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let failure = match chunk {
                Ok(b) if written + b.len() as u64 <= budget => {
                    written += b.len() as u64;
                    self.archive.data(b).await?;
                    continue;
                }
                Ok(_) => "larger than recorded, over the archive's media size limit".to_owned(),
                Err(e) => format!("unreadable from the media store: {e}"),
            };
            self.archive.abort_entry().await?;
            return self.skip(&row, mxc, failure);
        }
        self.progress.media_files += 1;
        self.progress.media_bytes += written;
        self.media_paths.insert(mxc.clone(), format!("../../{path}"));
        self.media.push(MediaEntry {
            mxc,
            path,
            content_type: row.content_type,
            upload_name: row.upload_name,
            size: written,
            uploaded_at: utc_iso(row.created_ts),
            sha256: row.sha256.as_deref().map(hex::encode),
        });
        Ok(())
    }

    // ---- rooms/ ----

    /// A directory name for a room: its name made safe, and a hash of its ID (unique, stable).
    fn room_dir(&mut self, label: &str, room_id: &str) -> String {
        let hash = hex::encode(&Sha256::digest(room_id.as_bytes())[..4]);
        let base = match slug(label, 48) {
            s if s.is_empty() => format!("salon-{hash}"),
            s => format!("{s}-{hash}"),
        };
        let mut dir = base.clone();
        let mut n = 2;
        while !self.dirs.insert(dir.clone()) {
            dir = format!("{base}-{n}");
            n += 1;
        }
        dir
    }

    async fn room(&mut self, ur: &UserRoom) -> Result<(), ExportError> {
        let state = self.state;
        let db = &state.db;
        let user_id = self.user.user_id.clone();
        let room = Room::load(state, &ur.room_id).await?;
        let viewer = Viewer::load(state, &room, &user_id).await?;
        // A departed member's records stop at their departure, whatever the room's visibility.
        let upto = viewer.departed_at.map_or(self.upto, |d| d.min(self.upto));
        let group = storage::records::state_after_latest(db, room.nid, upto).await?;

        // The room as the user last saw it.
        let (mut name, mut alias, mut topic, mut encrypted) = (None, None, None, false);
        if let Some(g) = group {
            let keys =
                [("m.room.name", ""), ("m.room.canonical_alias", ""), ("m.room.topic", ""), ("m.room.encryption", "")];
            for row in storage::records::state_in_group(db, g, &keys).await? {
                let ev = format(&room, &row, None);
                let text = |k: &str| ev["content"][k].as_str().filter(|s| !s.trim().is_empty()).map(str::to_owned);
                match row.event_type.as_str() {
                    "m.room.name" => name = text("name"),
                    "m.room.canonical_alias" => alias = text("alias"),
                    "m.room.topic" => topic = text("topic"),
                    _ => encrypted = true,
                }
            }
        }
        let label = match (name, &alias, group) {
            (Some(n), _, _) => n,
            (None, Some(a), _) => a.clone(),
            (None, None, Some(g)) => {
                let others = storage::records::members_in_group(db, g, &user_id, 5).await?;
                if others.is_empty() {
                    "Salon sans nom".to_owned()
                } else {
                    let names: Vec<String> = others.into_iter().map(|(u, n)| n.unwrap_or(u)).collect();
                    format!("Conversation avec {}", names.join(", "))
                }
            }
            (None, None, None) => ur.room_id.clone(),
        };
        let dir = self.room_dir(&label, &ur.room_id);
        let departed_ts = match viewer.departed_at {
            Some(d) => storage::records::origin_ts_at(db, room.nid, d).await?,
            None => None,
        };
        self.progress.room = Some(label.clone());
        (self.report)(&self.progress);

        let mut json_out = Buf::default();
        let mut html_out = Buf::default();
        let head = json!({
            "room_id": ur.room_id,
            "name": label,
            "canonical_alias": alias,
            "exported_for": user_id,
            "membership": ur.membership,
            "forgotten": ur.forgotten,
            "encrypted": encrypted,
            "departed_at": departed_ts.map(utc_iso),
            "exported_at": utc_iso(self.started),
        });
        json_out.0.extend_from_slice(b"{\"room\": ");
        serde_json::to_writer(&mut json_out.0, &head).map_err(anyhow::Error::from)?;
        json_out.0.extend_from_slice(b",\n\"events\": [\n");
        html_out.0.extend_from_slice(
            html::room_header(&html::RoomHeader {
                label: &label,
                room_id: &ur.room_id,
                alias: alias.as_deref(),
                topic: topic.as_deref(),
                user_id: &user_id,
                exported_at: self.started,
                membership: &ur.membership,
                departed_ts,
                forgotten: ur.forgotten,
                encrypted,
            })
            .as_bytes(),
        );
        self.archive.start(format!("rooms/{dir}/messages.json"), true, true).await?;

        // Every event up to the bound is read, in topological order, so that display names and
        // memberships are known at each event; only the visible ones are written.
        let mut members: HashMap<String, (String, Option<String>)> = HashMap::new();
        let mut cursor = (i64::MIN, i64::MIN);
        let (mut count, mut encrypted_events) = (0u64, 0u64);
        loop {
            let rows = storage::events::page(db, room.nid, false, cursor, (i64::MIN, upto), PAGE).await?;
            let visible = viewer.visible(state, &rows).await?;
            for (row, visible) in rows.iter().zip(visible) {
                cursor = (row.depth, row.stream_ordering.saturating_add(1));
                let member_of = (row.event_type == "m.room.member").then_some(row.state_key.as_deref()).flatten();
                if !visible && member_of.is_none() {
                    continue;
                }
                let mut ev = format(&room, row, None);
                if visible {
                    if let Some(u) = ev.get_mut("unsigned").and_then(Value::as_object_mut) {
                        u.remove("age");
                    }
                    if count > 0 {
                        json_out.0.extend_from_slice(b",\n");
                    }
                    serde_json::to_writer(&mut json_out.0, &ev).map_err(anyhow::Error::from)?;
                    let name_of = |u: &str| members.get(u).and_then(|(_, n)| n.clone()).unwrap_or_else(|| u.to_owned());
                    let cx = LineContext {
                        name_of: &name_of,
                        prev_membership: member_of.and_then(|k| members.get(k)).map(|(m, _)| m.as_str()),
                        media: &self.media_paths,
                    };
                    html_out.0.extend_from_slice(html::event_line(&ev, &cx).as_bytes());
                    count += 1;
                    self.progress.events += 1;
                    if row.event_type == "m.room.encrypted" {
                        encrypted_events += 1;
                    }
                }
                if let Some(k) = member_of {
                    let c = &ev["content"];
                    let membership = c["membership"].as_str().unwrap_or("").to_owned();
                    let display = c["displayname"].as_str().filter(|s| !s.trim().is_empty()).map(str::to_owned);
                    members.insert(k.to_owned(), (membership, display));
                }
                if json_out.full() {
                    self.archive.data(json_out.take()).await?;
                }
                if html_out.full() {
                    self.archive.spill(html_out.take()).await?;
                }
            }
            (self.report)(&self.progress);
            if (rows.len() as i64) < PAGE {
                break;
            }
        }
        json_out.0.extend_from_slice(format!("\n],\n\"event_count\": {count}}}\n").as_bytes());
        self.archive.data(json_out.take()).await?;
        self.archive.spill(html_out.take()).await?;
        self.archive
            .from_spill(format!("rooms/{dir}/messages.html"), Bytes::from(html::room_footer(count, encrypted_events)))
            .await?;
        self.rooms.push(RoomSummary {
            room_id: ur.room_id.clone(),
            name: label,
            directory: format!("rooms/{dir}"),
            membership: ur.membership.clone(),
            forgotten: ur.forgotten,
            encrypted: encrypted || encrypted_events > 0,
            events: count,
            encrypted_events,
            departed_at: departed_ts.map(utc_iso),
            departed_ts,
        });
        Ok(())
    }

    // ---- index.html, manifest.json ----

    async fn index(&mut self) -> Result<(), ExportError> {
        let u = &self.user;
        let who = match &self.display_name {
            Some(n) => format!("{n} ({})", u.user_id),
            None => u.user_id.clone(),
        };
        let mut s = html::page_start(&format!("Export des données de {who}"));
        s.push_str(&format!("<h1>Export des données de <bdi>{}</bdi></h1>\n<dl>\n", escape(&who)));
        s.push_str(&format!("<dt>Compte</dt><dd><code>{}</code>", escape(&u.user_id)));
        if u.deactivated {
            s.push_str(" (compte désactivé)");
        }
        s.push_str("</dd>\n");
        s.push_str(&format!("<dt>Serveur</dt><dd><code>{}</code></dd>\n", escape(&self.state.config.server_name)));
        s.push_str(&format!("<dt>Date de l'export</dt><dd>{}</dd>\n", paris_time(self.started)));
        s.push_str(&format!("<dt>Fuseau horaire</dt><dd>{}</dd>\n</dl>\n", html::TIMEZONE_NOTE));
        s.push_str(
            "<p class=\"note\">Pour chaque salon dont ce compte est ou a été membre : les événements qu'il pouvait \
             voir (règles de visibilité de l'historique du salon), jusqu'à la date de l'export, ou jusqu'à son \
             départ s'il a quitté le salon ou en a été retiré. <code>messages.html</code> est la version lisible, \
             <code>messages.json</code> la version complète au format Matrix. <code>profile.json</code> contient \
             le profil, les appareils et les réglages du compte (sans aucun secret : ni mot de passe, ni jeton, \
             ni clé). <code>manifest.json</code> liste chaque fichier avec sa taille et son empreinte SHA-256.</p>\n",
        );
        s.push_str("<h2>Salons</h2>\n");
        if self.rooms.is_empty() {
            s.push_str("<p>Aucun salon.</p>\n");
        } else {
            s.push_str("<table>\n<tr><th>Salon</th><th>Appartenance</th><th>Événements</th><th>Chiffré</th></tr>\n");
            for r in &self.rooms {
                let membership = match (r.membership.as_str(), r.departed_ts) {
                    ("join", _) => "membre".to_owned(),
                    ("invite", _) => "invité".to_owned(),
                    ("knock", _) => "demande d'accès".to_owned(),
                    ("ban", Some(t)) => format!("banni le {}", paris_time(t)),
                    (_, Some(t)) => format!("parti ou retiré le {}", paris_time(t)),
                    (m, None) => escape(m),
                };
                s.push_str(&format!(
                    "<tr><td><a href=\"{}/messages.html\"><bdi>{}</bdi></a></td><td>{membership}{}</td><td>{}</td><td>{}</td></tr>\n",
                    escape(&r.directory),
                    escape(&r.name),
                    if r.forgotten { " (oublié)" } else { "" },
                    r.events,
                    if r.encrypted { "oui (messages illisibles par le serveur)" } else { "non" },
                ));
            }
            s.push_str("</table>\n");
        }
        s.push_str("<h2>Fichiers envoyés</h2>\n");
        if self.media.is_empty() {
            s.push_str("<p>Aucun fichier dans l'archive.</p>\n");
        } else {
            s.push_str("<table>\n<tr><th>Fichier</th><th>Type</th><th>Taille (octets)</th><th>Envoyé le</th></tr>\n");
            for m in &self.media {
                s.push_str(&format!(
                    "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                    escape(&m.path),
                    escape(m.upload_name.as_deref().unwrap_or(&m.path)),
                    escape(m.content_type.as_deref().unwrap_or("")),
                    m.size,
                    escape(&m.uploaded_at),
                ));
            }
            s.push_str("</table>\n");
        }
        if !self.skipped.is_empty() {
            s.push_str(&format!(
                "<p class=\"note\"><strong>{} fichier(s) non inclus</strong> (limite de l'archive : {} octets \
                 de fichiers) :</p>\n<ul>\n",
                self.skipped.len(),
                self.opts.max_media_bytes
            ));
            for m in &self.skipped {
                s.push_str(&format!(
                    "<li><code>{}</code> {} : {}</li>\n",
                    escape(&m.mxc),
                    m.upload_name.as_deref().map(|n| format!("({})", escape(n))).unwrap_or_default(),
                    escape(&m.reason),
                ));
            }
            s.push_str("</ul>\n");
        }
        s.push_str(html::PAGE_END);
        self.archive.start("index.html", true, false).await?;
        self.archive.data(Bytes::from(s)).await?;
        Ok(())
    }

    fn manifest(&self) -> Value {
        json!({
            "format": "parvis-user-export",
            "format_version": 1,
            "generator": format!("Parvis {}", env!("CARGO_PKG_VERSION")),
            "server_name": self.state.config.server_name,
            "user_id": self.user.user_id,
            "exported_at": utc_iso(self.started),
            "exported_at_ms": self.started,
            "events_up_to_stream_position": self.upto,
            "html_time_zone": "Europe/Paris",
            "rooms": self.rooms,
            "media": self.media,
            "media_skipped": self.skipped,
            "media_limit_bytes": self.opts.max_media_bytes,
            "notes": [
                "Events are those the user may see under each room's history visibility, up to the export's \
                 start, or up to the user's departure from a room they left or were removed from.",
                "Encrypted events are exported as stored: the server has no keys to decrypt them.",
                "Events of users the account ignores are included (they were sent to the room).",
                "No password hash, token, key or secret storage data is exported.",
            ],
        })
    }
}

/// `media/<media_id>-<name>.<ext>`: the upload name made safe, or an extension from the type.
fn media_file_name(row: &MediaRow) -> String {
    let name = row.upload_name.as_deref().and_then(crate::media::sanitize_file_name).unwrap_or_default();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() && !e.is_empty() => (s, slug(e, 10).to_ascii_lowercase()),
        _ => (name.as_str(), String::new()),
    };
    let ext = if ext.is_empty() {
        let essence = row.content_type.as_deref().unwrap_or("").split(';').next().unwrap_or("").trim();
        match essence {
            "image/png" => "png",
            "image/jpeg" => "jpg",
            "image/gif" => "gif",
            "image/webp" => "webp",
            "image/svg+xml" => "svg",
            "application/pdf" => "pdf",
            "text/plain" => "txt",
            "audio/ogg" => "ogg",
            "video/mp4" => "mp4",
            _ => "",
        }
        .to_owned()
    } else {
        ext
    };
    let mut out = row.media_id.clone();
    let stem = slug(stem, 60);
    if !stem.is_empty() {
        out.push('-');
        out.push_str(&stem);
    }
    if !ext.is_empty() {
        out.push('.');
        out.push_str(&ext);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised() {
        for t in [
            "m.secret_storage.default_key",
            "m.secret_storage.key.abc",
            "m.cross_signing.master",
            "m.cross_signing.self_signing",
            "m.megolm_backup.v1",
            "org.matrix.msc3814",
        ] {
            assert!(is_secret_account_data(t, &json!({})), "{t}");
        }
        let ssss = json!({ "encrypted": { "key1": { "iv": "x", "ciphertext": "y", "mac": "z" } } });
        assert!(is_secret_account_data("com.example.anything", &ssss));
        for t in ["m.direct", "m.push_rules", "m.tag", "m.fully_read", "m.secret_storagex", "im.vector.setting"] {
            assert!(!is_secret_account_data(t, &json!({ "a": 1 })), "{t}");
        }
    }

    #[test]
    fn media_names() {
        let row = |name: Option<&str>, ct: &str| MediaRow {
            server_name: "x".into(),
            media_id: "AbC123".into(),
            uploader: None,
            content_type: Some(ct.into()),
            upload_name: name.map(str::to_owned),
            size: Some(1),
            sha256: None,
            storage_key: Some("k".into()),
            created_ts: 0,
            pending_expires_ts: None,
            last_access_ts: 0,
            quarantined_by: None,
            quarantined_ts: None,
            allow_unauthenticated: false,
            scan_verdict: None,
        };
        assert_eq!(media_file_name(&row(Some("Plan du marché.PNG"), "image/png")), "AbC123-Plan-du-marche.png");
        assert_eq!(media_file_name(&row(Some("../../etc/passwd"), "text/plain")), "AbC123-passwd.txt");
        assert_eq!(media_file_name(&row(None, "image/jpeg")), "AbC123.jpg");
        assert_eq!(media_file_name(&row(Some(".bashrc"), "application/x")), "AbC123-bashrc");
    }
}
