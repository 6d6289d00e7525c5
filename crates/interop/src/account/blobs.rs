//! Blob transfers over the gateway connection (interop-protocol.md §13): chunked upload and
//! download.

use super::*;

/// Uploads `bytes` in chunks (§13.2); `sha256` is the hash of `bytes`.
pub(super) async fn put_blob(
    conn: &GatewayConn,
    bytes: &[u8],
    sha256: Vec<u8>,
) -> Result<String, InteropError> {
    let upload = uuid::Uuid::new_v4().to_string();
    let chunks: Vec<&[u8]> = if bytes.is_empty() {
        vec![&[][..]]
    } else {
        bytes.chunks(512 * 1024).collect()
    };
    let n = chunks.len();
    let mut offset = 0u64;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        let put = pb::BlobPut {
            upload: upload.clone(),
            offset,
            data: chunk.to_vec(),
            last,
            sha256: if last { sha256.clone() } else { Vec::new() },
        };
        offset += chunk.len() as u64;
        match conn.request(Body::BlobPut(put)).await? {
            Body::BlobStored(s) if last => return Ok(s.blob),
            Body::Ok(_) if !last => {}
            _ => return Err(InteropError::Unexpected),
        }
    }
    Err(InteropError::Unexpected)
}

/// Downloads a whole blob in chunks (§13.3), refusing one over `max` bytes.
pub(super) async fn get_blob(
    conn: &GatewayConn,
    blob: &str,
    max: u64,
) -> Result<Vec<u8>, InteropError> {
    let mut data = Vec::new();
    let mut total = None;
    loop {
        let get = pb::BlobGet {
            blob: blob.to_owned(),
            offset: data.len() as u64,
            length: 512 * 1024,
        };
        match conn.request(Body::BlobGet(get)).await? {
            Body::BlobData(d) => {
                if d.total_size > max {
                    return Err(InteropError::TooLarge(max));
                }
                // The size must hold still, and no chunk may run past it.
                if *total.get_or_insert(d.total_size) != d.total_size
                    || (data.len() + d.data.len()) as u64 > d.total_size
                {
                    return Err(InteropError::Invalid(
                        "the blob's chunks do not match its announced size".into(),
                    ));
                }
                data.extend_from_slice(&d.data);
                if data.len() as u64 == d.total_size {
                    break;
                }
                if d.data.is_empty() {
                    return Err(InteropError::Invalid(
                        "the blob ended before its announced size".into(),
                    ));
                }
            }
            _ => return Err(InteropError::Unexpected),
        }
    }
    Ok(data)
}
