//! Where media content lives: one trait, [`MediaStore`], with a filesystem and an S3 backend.
//!
//! Keys are chosen by the server (`content/ab/cd/<random>`, `thumbnails/...`), never by clients.
//! A put is atomic and durable when it returns: the filesystem backend writes a temporary file,
//! fsyncs it, renames it into place and fsyncs the directory; S3 objects only become visible
//! once completely uploaded.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::config::{MediaBackend, MediaConfig};

/// A stream of content chunks.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

pub trait MediaStore: Send + Sync {
    /// Publishes the complete local file `src` under `key` (the file may be moved or left behind;
    /// the caller removes what is left).
    fn put_file<'a>(&'a self, key: &'a str, src: &'a Path) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Publishes `data` under `key`.
    fn put_bytes<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Streams the content of `key`, or the byte `range` of it. `Ok(None)` if it does not exist.
    fn get<'a>(&'a self, key: &'a str, range: Option<Range<u64>>) -> BoxFuture<'a, anyhow::Result<Option<ByteStream>>>;
    /// Deletes `key`; deleting a missing key is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, anyhow::Result<()>>;
    /// A local path of the content, when the backend has one (used by scanners).
    fn local_path(&self, key: &str) -> Option<PathBuf>;
}

/// Builds the configured backend.
pub fn open(config: &MediaConfig) -> anyhow::Result<Arc<dyn MediaStore>> {
    Ok(match config.backend {
        MediaBackend::Filesystem => Arc::new(FsStore::new(config.path.clone())),
        MediaBackend::S3 => Arc::new(S3Store::new(config)?),
    })
}

/// Reads a whole stream, refusing more than `max` bytes.
pub async fn collect(mut stream: ByteStream, max: u64) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if (out.len() + chunk.len()) as u64 > max {
            anyhow::bail!("content larger than {max} bytes");
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    async fn publish(&self, key: &str, src: &Path) -> anyhow::Result<()> {
        let dest = self.path(key);
        let dir = dest.parent().context("key without a directory")?.to_owned();
        tokio::fs::create_dir_all(&dir).await.with_context(|| format!("creating {}", dir.display()))?;
        match tokio::fs::rename(src, &dest).await {
            Ok(()) => {}
            // Another filesystem: copy to a temporary name beside the destination, then rename.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let tmp = dir.join(format!(".{}.part", crate::media::random_id(16)));
                tokio::fs::copy(src, &tmp).await?;
                tokio::fs::File::open(&tmp).await?.sync_all().await?;
                if let Err(e) = tokio::fs::rename(&tmp, &dest).await {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e.into());
                }
            }
            Err(e) => return Err(e).with_context(|| format!("moving upload to {}", dest.display())),
        }
        // The rename is durable once the directory is synced.
        tokio::fs::File::open(&dir).await?.sync_all().await?;
        Ok(())
    }
}

impl MediaStore for FsStore {
    fn put_file<'a>(&'a self, key: &'a str, src: &'a Path) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            tokio::fs::File::open(src).await?.sync_all().await?;
            self.publish(key, src).await
        })
    }

    fn put_bytes<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let dest = self.path(key);
            let dir = dest.parent().context("key without a directory")?;
            tokio::fs::create_dir_all(dir).await?;
            let tmp = dir.join(format!(".{}.part", crate::media::random_id(16)));
            let result = async {
                let mut f = tokio::fs::File::create(&tmp).await?;
                f.write_all(&data).await?;
                f.sync_all().await?;
                drop(f);
                self.publish(key, &tmp).await
            }
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            result
        })
    }

    fn get<'a>(&'a self, key: &'a str, range: Option<Range<u64>>) -> BoxFuture<'a, anyhow::Result<Option<ByteStream>>> {
        Box::pin(async move {
            let mut file = match tokio::fs::File::open(self.path(key)).await {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let reader: Pin<Box<dyn tokio::io::AsyncRead + Send>> = match range {
                Some(r) => {
                    file.seek(std::io::SeekFrom::Start(r.start)).await?;
                    Box::pin(file.take(r.end - r.start))
                }
                None => Box::pin(file),
            };
            let stream = tokio_util_stream(reader);
            Ok(Some(stream))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.path(key)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        Some(self.path(key))
    }
}

/// Turns an `AsyncRead` into a stream of chunks of up to 64 KiB.
fn tokio_util_stream(reader: Pin<Box<dyn tokio::io::AsyncRead + Send>>) -> ByteStream {
    futures_util::stream::try_unfold(reader, |mut r| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), r)))
    })
    .boxed()
}

pub struct S3Store {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl S3Store {
    pub fn new(config: &MediaConfig) -> anyhow::Result<Self> {
        let s3 = &config.s3;
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_virtual_hosted_style_request(!s3.path_style);
        if let Some(endpoint) = &s3.endpoint {
            b = b.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(k) = &s3.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &s3.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        let store = b.build().context("media.s3: cannot build the S3 client")?;
        Ok(Self { store: Arc::new(store), prefix: s3.prefix.clone() })
    }

    fn path(&self, key: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{}{key}", self.prefix))
    }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl MediaStore for S3Store {
    fn put_file<'a>(&'a self, key: &'a str, src: &'a Path) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let mut file = tokio::fs::File::open(src).await?;
            // Small files in one PUT, larger ones as a multipart upload of 8 MiB parts: memory
            // stays bounded and the object appears only once complete.
            let mut w = object_store::buffered::BufWriter::with_capacity(self.store.clone(), self.path(key), 8 << 20);
            if let Err(e) = tokio::io::copy(&mut file, &mut w).await {
                let _ = w.abort().await;
                return Err(e.into());
            }
            w.shutdown().await.context("S3 upload")?;
            Ok(())
        })
    }

    fn put_bytes<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.store.put(&self.path(key), data.into()).await.context("S3 put")?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str, range: Option<Range<u64>>) -> BoxFuture<'a, anyhow::Result<Option<ByteStream>>> {
        Box::pin(async move {
            let opts =
                object_store::GetOptions { range: range.map(object_store::GetRange::Bounded), ..Default::default() };
            match self.store.get_opts(&self.path(key), opts).await {
                Ok(r) => Ok(Some(r.into_stream().map_err(std::io::Error::other).boxed())),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(anyhow::Error::new(e).context("S3 get")),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            match self.store.delete(&self.path(key)).await {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(anyhow::Error::new(e).context("S3 delete")),
            }
        })
    }

    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }
}
