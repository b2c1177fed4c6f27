//! The zip archive of an export, written by a thread of the blocking pool: the async side sends
//! entries and chunks through a bounded channel (so memory stays bounded whatever the size of
//! the archive), the thread compresses and writes them to the file, hashing each entry
//! (SHA-256) for the manifest.
//!
//! An entry may also be assembled in a side ("spill") file first and copied in later: a room's
//! HTML page is written while its JSON entry is open (zip entries are written one after the
//! other), from the same walk through the room's events.
//!
//! If the `Archive` is dropped without `finish`, the thread stops and deletes the partial
//! archive; the spill file is always deleted.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// A file of the archive, for the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

enum Cmd {
    /// Starts an entry (ending the previous one). `compress`: deflate, else stored (media are
    /// mostly compressed already). `large`: the size is unknown and may pass 4 GiB (zip64).
    Start { name: String, compress: bool, large: bool },
    /// Content of the current entry.
    Data(Bytes),
    /// Drops the current entry (its content could not be read to the end).
    AbortEntry,
    /// Appends to the spill file.
    Spill(Bytes),
    /// Ends the current entry, then writes the spill file followed by `suffix` as entry `name`
    /// (deflated, zip64), and empties the spill file.
    FromSpill { name: String, suffix: Bytes },
    /// Ends the current entry, writes the manifest (if any: `(name, value)`, its `files` set to
    /// the records of every entry before it), then the central directory.
    Finish(Option<(String, serde_json::Value)>),
}

pub struct Archive {
    tx: Option<mpsc::Sender<Cmd>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<Vec<FileRecord>>>>,
}

fn create_private(path: &Path) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

impl Archive {
    /// Creates (or truncates) the archive file at `path` and the spill file at `spill`, both
    /// readable by the owner only. `modified`: the timestamp of every entry.
    pub async fn create(path: &Path, spill: &Path, modified: zip::DateTime) -> std::io::Result<Self> {
        let (path, spill) = (path.to_owned(), spill.to_owned());
        let (file, spill_file, path, spill) = tokio::task::spawn_blocking(move || {
            let file = create_private(&path)?;
            let spill_file = match create_private(&spill) {
                Ok(f) => f,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            };
            Ok::<_, std::io::Error>((file, spill_file, path, spill))
        })
        .await
        .map_err(std::io::Error::other)??;
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::task::spawn_blocking(move || {
            let result = write(rx, file, spill_file, modified);
            let _ = std::fs::remove_file(&spill);
            if result.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            result
        });
        Ok(Self { tx: Some(tx), task: Some(task) })
    }

    async fn send(&mut self, cmd: Cmd) -> anyhow::Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send(cmd).await.is_ok(),
            None => false,
        };
        if sent { Ok(()) } else { Err(self.stopped().await) }
    }

    /// The writer thread stopped early: its error.
    async fn stopped(&mut self) -> anyhow::Error {
        self.tx = None;
        match self.task.take() {
            Some(t) => match t.await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => anyhow::anyhow!("the archive writer stopped"),
                Err(e) => anyhow::anyhow!("the archive writer panicked: {e}"),
            },
            None => anyhow::anyhow!("the archive writer stopped"),
        }
    }

    pub async fn start(&mut self, name: impl Into<String>, compress: bool, large: bool) -> anyhow::Result<()> {
        self.send(Cmd::Start { name: name.into(), compress, large }).await
    }

    pub async fn data(&mut self, data: Bytes) -> anyhow::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.send(Cmd::Data(data)).await
    }

    pub async fn abort_entry(&mut self) -> anyhow::Result<()> {
        self.send(Cmd::AbortEntry).await
    }

    pub async fn spill(&mut self, data: Bytes) -> anyhow::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.send(Cmd::Spill(data)).await
    }

    pub async fn from_spill(&mut self, name: impl Into<String>, suffix: Bytes) -> anyhow::Result<()> {
        self.send(Cmd::FromSpill { name: name.into(), suffix }).await
    }

    /// Writes the manifest (`(name, value)`: a JSON object whose `files` is set to the list of
    /// the entries before it, with their sizes and SHA-256) and the central directory, and syncs
    /// the file. Returns the entries written (the manifest last).
    pub async fn finish(mut self, manifest: Option<(String, serde_json::Value)>) -> anyhow::Result<Vec<FileRecord>> {
        self.send(Cmd::Finish(manifest)).await?;
        self.tx = None;
        match self.task.take() {
            Some(t) => t.await.context("the archive writer panicked")?,
            None => anyhow::bail!("the archive writer stopped"),
        }
    }

    /// Stops the writer and waits until the partial archive is deleted.
    pub async fn abort(mut self) {
        self.tx = None;
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A writer that hashes and counts what goes through it.
struct Hashing<'a, W> {
    inner: &'a mut W,
    entry: &'a mut Option<Entry>,
}

impl<W: Write> Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(e) = self.entry.as_mut() {
            e.hash.update(&buf[..n]);
            e.size += n as u64;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct Entry {
    name: String,
    hash: Sha256,
    size: u64,
}

fn options(compress: bool, large: bool, modified: zip::DateTime) -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(if compress { CompressionMethod::Deflated } else { CompressionMethod::Stored })
        .large_file(large)
        .last_modified_time(modified)
        .unix_permissions(0o644)
}

fn end_entry(entry: &mut Option<Entry>, records: &mut Vec<FileRecord>) {
    if let Some(e) = entry.take() {
        records.push(FileRecord { path: e.name, size: e.size, sha256: hex::encode(e.hash.finalize()) });
    }
}

fn write(
    mut rx: mpsc::Receiver<Cmd>,
    file: File,
    spill: File,
    modified: zip::DateTime,
) -> anyhow::Result<Vec<FileRecord>> {
    let mut zip = ZipWriter::new(BufWriter::with_capacity(256 * 1024, file));
    let mut spill = BufWriter::with_capacity(64 * 1024, spill);
    let mut spilled: u64 = 0;
    let mut entry: Option<Entry> = None;
    let mut records = Vec::new();
    let start = |zip: &mut ZipWriter<BufWriter<File>>, entry: &mut Option<Entry>, name: String, compress, large| {
        zip.start_file(name.as_str(), options(compress, large, modified))
            .with_context(|| format!("starting {name} in the archive"))?;
        *entry = Some(Entry { name, hash: Sha256::new(), size: 0 });
        anyhow::Ok(())
    };
    loop {
        let Some(cmd) = rx.blocking_recv() else {
            anyhow::bail!("the export was interrupted");
        };
        match cmd {
            Cmd::Start { name, compress, large } => {
                end_entry(&mut entry, &mut records);
                start(&mut zip, &mut entry, name, compress, large)?;
            }
            Cmd::Data(data) => {
                Hashing { inner: &mut zip, entry: &mut entry }.write_all(&data).context("writing the archive")?;
            }
            Cmd::AbortEntry => {
                entry = None;
                zip.abort_file().context("dropping an entry of the archive")?;
            }
            Cmd::Spill(data) => {
                spill.write_all(&data).context("writing the spill file")?;
                spilled += data.len() as u64;
            }
            Cmd::FromSpill { name, suffix } => {
                end_entry(&mut entry, &mut records);
                start(&mut zip, &mut entry, name, true, true)?;
                spill.flush()?;
                let f = spill.get_mut();
                f.seek(SeekFrom::Start(0))?;
                let mut out = Hashing { inner: &mut zip, entry: &mut entry };
                let copied = std::io::copy(&mut Read::by_ref(f).take(spilled), &mut out)?;
                anyhow::ensure!(copied == spilled, "the spill file is shorter than written");
                out.write_all(&suffix).context("writing the archive")?;
                f.set_len(0)?;
                f.seek(SeekFrom::Start(0))?;
                spilled = 0;
            }
            Cmd::Finish(manifest) => {
                end_entry(&mut entry, &mut records);
                if let Some((name, mut value)) = manifest {
                    value["files"] = serde_json::to_value(&records)?;
                    let text = serde_json::to_vec_pretty(&value)?;
                    start(&mut zip, &mut entry, name, true, false)?;
                    Hashing { inner: &mut zip, entry: &mut entry }.write_all(&text).context("writing the archive")?;
                    end_entry(&mut entry, &mut records);
                }
                let mut w = zip.finish().context("finishing the archive")?;
                w.flush()?;
                let file = w.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                return Ok(records);
            }
        }
    }
}

/// The spill file's path for an archive's partial file.
pub fn spill_path(partial: &Path) -> PathBuf {
    let mut s = partial.as_os_str().to_owned();
    s.push("-html");
    PathBuf::from(s)
}
