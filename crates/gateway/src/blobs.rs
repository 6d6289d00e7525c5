//! Media blobs: chunked uploads into a temporary file, checked against the SHA-256 the client
//! sends with the last chunk, then moved into the blob directory under a random id.

use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{Reject, Shared, reject};
use mib_wire::pb::{self, ErrorCode};

pub const MAX_CHUNK: usize = 512 * 1024;
/// Unfinished uploads on one connection (docs §19).
const MAX_UPLOADS: usize = 8;

pub(crate) struct Upload {
    path: PathBuf,
    file: tokio::fs::File,
    received: u64,
    hash: Sha256,
}

impl Upload {
    pub async fn discard(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.path).await;
    }
}

fn blob_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(id)
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Handles one `BlobPut` chunk.
pub(crate) async fn put(
    shared: &Shared,
    uploads: &mut std::collections::HashMap<String, Upload>,
    req: pb::BlobPut,
) -> Result<pb::stanza::Body, Reject> {
    if req.upload.is_empty() || req.upload.len() > 64 {
        return Err(reject(
            ErrorCode::BadRequest,
            "upload id must be 1 to 64 characters",
        ));
    }
    if req.data.len() > MAX_CHUNK {
        return Err(reject(ErrorCode::BadRequest, "chunk larger than 512 KiB"));
    }
    if req.data.is_empty() && !req.last {
        return Err(reject(
            ErrorCode::BadRequest,
            "empty chunk that is not last",
        ));
    }
    // Checked before anything is written, so the client may resend the chunk with the hash.
    if req.last && req.sha256.len() != 32 {
        return Err(reject(
            ErrorCode::BadRequest,
            "the last chunk carries the 32-byte SHA-256 of the blob",
        ));
    }
    if !uploads.contains_key(&req.upload) {
        if req.offset != 0 {
            return Err(reject(
                ErrorCode::BadRequest,
                "unknown upload: the first chunk must have offset 0",
            ));
        }
        if uploads.len() >= MAX_UPLOADS {
            return Err(reject(
                ErrorCode::BadRequest,
                "too many uploads in progress on this connection",
            ));
        }
        let path = shared
            .cfg
            .blob_dir
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let file = tokio::fs::File::create(&path).await?;
        uploads.insert(
            req.upload.clone(),
            Upload {
                path,
                file,
                received: 0,
                hash: Sha256::new(),
            },
        );
    }
    let up = uploads.get_mut(&req.upload).expect("inserted above");
    if req.offset != up.received {
        return Err(reject(
            ErrorCode::BadRequest,
            format!("offset {} but {} bytes received", req.offset, up.received),
        ));
    }
    if up.received + req.data.len() as u64 > shared.cfg.max_blob_bytes {
        if let Some(up) = uploads.remove(&req.upload) {
            up.discard().await;
        }
        return Err(reject(
            ErrorCode::TooLarge,
            format!("blobs are limited to {} bytes", shared.cfg.max_blob_bytes),
        ));
    }
    up.file.write_all(&req.data).await?;
    up.hash.update(&req.data);
    up.received += req.data.len() as u64;
    if !req.last {
        return Ok(pb::stanza::Body::Ok(pb::Ok {}));
    }
    let mut up = uploads.remove(&req.upload).expect("present");
    let digest = std::mem::take(&mut up.hash).finalize();
    if digest.as_slice() != req.sha256.as_slice() {
        up.discard().await;
        return Err(reject(
            ErrorCode::BadRequest,
            "sha256 does not match the uploaded bytes",
        ));
    }
    up.file.flush().await?;
    up.file.sync_all().await?;
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    let id = hex::encode(raw);
    tokio::fs::rename(&up.path, blob_path(&shared.cfg.blob_dir, &id)).await?;
    shared.db.save_blob(&id, up.received, &digest).await?;
    Ok(pb::stanza::Body::BlobStored(pb::BlobStored {
        blob: id,
        size: up.received,
    }))
}

/// Handles `BlobGet`.
pub(crate) async fn get(shared: &Shared, req: pb::BlobGet) -> Result<pb::stanza::Body, Reject> {
    if !is_hex_id(&req.blob) {
        return Err(reject(ErrorCode::BadRequest, "malformed blob id"));
    }
    if req.length as usize > MAX_CHUNK {
        return Err(reject(ErrorCode::BadRequest, "length larger than 512 KiB"));
    }
    let Some(total) = shared.db.blob_size(&req.blob).await? else {
        return Err(reject(ErrorCode::NotFound, "no such blob"));
    };
    if req.offset > total {
        return Err(reject(
            ErrorCode::BadRequest,
            "offset beyond the end of the blob",
        ));
    }
    let want = if req.length == 0 {
        MAX_CHUNK as u64
    } else {
        req.length as u64
    };
    let len = want.min(total - req.offset) as usize;
    let mut f = tokio::fs::File::open(blob_path(&shared.cfg.blob_dir, &req.blob)).await?;
    f.seek(std::io::SeekFrom::Start(req.offset)).await?;
    let mut data = vec![0u8; len];
    f.read_exact(&mut data).await?;
    Ok(pb::stanza::Body::BlobData(pb::BlobData {
        blob: req.blob,
        offset: req.offset,
        data,
        total_size: total,
    }))
}
