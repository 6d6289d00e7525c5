//! The interop transport (docs/interop-protocol.md §2–3): a Noise XX handshake over TCP, every
//! Noise message framed by a 2-byte big-endian length, then a secure byte stream of records
//! (4-byte big-endian length + one protobuf `Stanza`).

use std::{fmt, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::{Buf, BytesMut};
use prost::Message;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::Mutex,
};
use zeroize::Zeroizing;

use super::pb::Stanza;

pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2b";
pub const PROLOGUE: &[u8] = b"interop/1";
/// Largest Noise message.
pub const MAX_NOISE_MSG: usize = 65535;
/// Largest plaintext in one transport message (65535 - 16 bytes of tag).
pub const MAX_CHUNK: usize = MAX_NOISE_MSG - TAG_LEN;
/// The authentication tag each transport message carries.
const TAG_LEN: usize = 16;
/// Largest record (one stanza).
pub const MAX_RECORD: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    #[error("the gateway's static key does not match the pinned key")]
    KeyMismatch,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("record of {0} bytes exceeds the 1 MiB limit")]
    TooLarge(usize),
    #[error("malformed stanza: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// An X25519 static key pair for Noise.
#[derive(Clone)]
pub struct StaticKey {
    pub private: Zeroizing<Vec<u8>>,
    pub public: Vec<u8>,
}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKey")
            .field("public", &B64.encode(&self.public))
            .finish_non_exhaustive()
    }
}

impl StaticKey {
    pub fn generate() -> Self {
        let kp = snow::Builder::new(params())
            .generate_keypair()
            .expect("key generation with a valid suite");
        Self {
            private: Zeroizing::new(kp.private),
            public: kp.public,
        }
    }

    /// Key file format: base64 of private (32) || public (32).
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut both = Zeroizing::new(self.private.to_vec());
        both.extend_from_slice(&self.public);
        Zeroizing::new(B64.encode(&*both))
    }

    pub fn from_file_text(text: &str) -> Option<Self> {
        let raw = Zeroizing::new(B64.decode(text.trim()).ok()?);
        (raw.len() == 64).then(|| Self {
            private: Zeroizing::new(raw[..32].to_vec()),
            public: raw[32..].to_vec(),
        })
    }

    pub fn public_b64(&self) -> String {
        B64.encode(&self.public)
    }
}

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("a valid Noise suite name")
}

async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), TransportError> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(TransportError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    let len = u16::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(TransportError::Protocol("empty frame"));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Closed
        } else {
            e.into()
        }
    })?;
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> Result<(), TransportError> {
    debug_assert!(msg.len() <= MAX_NOISE_MSG);
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await?;
    Ok(())
}

/// Runs the XX handshake as initiator and checks the gateway's key against `pinned`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    local: &StaticKey,
    pinned: &[u8],
) -> Result<
    (
        SecureReader<tokio::io::ReadHalf<S>>,
        SecureWriter<tokio::io::WriteHalf<S>>,
    ),
    TransportError,
> {
    let mut hs = snow::Builder::new(params())
        .local_private_key(&local.private)
        .prologue(PROLOGUE)
        .build_initiator()?;
    let mut msg = vec![0u8; MAX_NOISE_MSG];
    let mut frame = Vec::new();
    let n = hs.write_message(&[], &mut msg)?;
    write_frame(&mut stream, &msg[..n]).await?;
    read_frame(&mut stream, &mut frame).await?;
    let mut payload = vec![0u8; MAX_NOISE_MSG];
    let n = hs.read_message(&frame, &mut payload)?;
    if n != 0 {
        return Err(TransportError::Protocol("non-empty handshake payload"));
    }
    if hs.get_remote_static() != Some(pinned) {
        return Err(TransportError::KeyMismatch);
    }
    let n = hs.write_message(&[], &mut msg)?;
    write_frame(&mut stream, &msg[..n]).await?;
    stream.flush().await?;
    Ok(split(stream, hs.into_transport_mode()?))
}

/// Runs the XX handshake as responder; returns the halves and the client's static key.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    local: &StaticKey,
) -> Result<
    (
        SecureReader<tokio::io::ReadHalf<S>>,
        SecureWriter<tokio::io::WriteHalf<S>>,
        Vec<u8>,
    ),
    TransportError,
> {
    let mut hs = snow::Builder::new(params())
        .local_private_key(&local.private)
        .prologue(PROLOGUE)
        .build_responder()?;
    let mut frame = Vec::new();
    let mut payload = vec![0u8; MAX_NOISE_MSG];
    let mut msg = vec![0u8; MAX_NOISE_MSG];
    read_frame(&mut stream, &mut frame).await?;
    if frame.len() != 32 {
        return Err(TransportError::Protocol(
            "handshake message 1 must be 32 bytes",
        ));
    }
    hs.read_message(&frame, &mut payload)?;
    let n = hs.write_message(&[], &mut msg)?;
    write_frame(&mut stream, &msg[..n]).await?;
    stream.flush().await?;
    read_frame(&mut stream, &mut frame).await?;
    if frame.len() != 64 {
        return Err(TransportError::Protocol(
            "handshake message 3 must be 64 bytes",
        ));
    }
    let n = hs.read_message(&frame, &mut payload)?;
    if n != 0 {
        return Err(TransportError::Protocol("non-empty handshake payload"));
    }
    let remote = hs
        .get_remote_static()
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let (r, w) = split(stream, hs.into_transport_mode()?);
    Ok((r, w, remote))
}

fn split<S: AsyncRead + AsyncWrite>(
    stream: S,
    transport: snow::TransportState,
) -> (
    SecureReader<tokio::io::ReadHalf<S>>,
    SecureWriter<tokio::io::WriteHalf<S>>,
) {
    let state = Arc::new(Mutex::new(transport));
    let (r, w) = tokio::io::split(stream);
    (
        SecureReader {
            inner: r,
            state: state.clone(),
            plain: BytesMut::new(),
            frame: Vec::new(),
        },
        SecureWriter { inner: w, state },
    )
}

/// Buffers of an idle connection are given back above this size, so that one large record
/// does not leave every connection that saw one holding a large buffer (a bridge keeps one
/// connection per login).
const KEEP_IDLE_BUFFER: usize = 16 * 1024;

/// Reads records from the secure stream. Its buffers grow with the records it reads, not
/// ahead of them: an idle connection holds a few hundred bytes, not a 64 KiB frame buffer.
pub struct SecureReader<R> {
    inner: R,
    state: Arc<Mutex<snow::TransportState>>,
    /// Decrypted bytes not yet taken as records.
    plain: BytesMut,
    /// The frame being read.
    frame: Vec<u8>,
}

/// Takes the next complete record out of decrypted stream bytes, if there is one.
pub fn next_record(plain: &mut BytesMut) -> Result<Option<Vec<u8>>, TransportError> {
    if plain.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
    if len > MAX_RECORD {
        return Err(TransportError::TooLarge(len));
    }
    if plain.len() < 4 + len {
        return Ok(None);
    }
    plain.advance(4);
    Ok(Some(plain.split_to(len).to_vec()))
}

impl<R: AsyncRead + Unpin> SecureReader<R> {
    /// The next record's bytes.
    pub async fn read_record(&mut self) -> Result<Vec<u8>, TransportError> {
        loop {
            if let Some(rec) = next_record(&mut self.plain)? {
                if self.plain.is_empty() && self.plain.capacity() > KEEP_IDLE_BUFFER {
                    self.plain = BytesMut::new();
                }
                return Ok(rec);
            }
            read_frame(&mut self.inner, &mut self.frame).await?;
            // Decrypted in place at the end of `plain` (a plaintext is shorter than its frame).
            let start = self.plain.len();
            self.plain.resize(start + self.frame.len(), 0);
            let read = self
                .state
                .lock()
                .await
                .read_message(&self.frame, &mut self.plain[start..]);
            let n = match read {
                Ok(n) => n,
                Err(e) => {
                    self.plain.truncate(start);
                    return Err(e.into());
                }
            };
            self.plain.truncate(start + n);
            if self.frame.capacity() > KEEP_IDLE_BUFFER {
                self.frame = Vec::new();
            }
        }
    }

    /// The next stanza.
    pub async fn read_stanza(&mut self) -> Result<Stanza, TransportError> {
        let rec = self.read_record().await?;
        Ok(Stanza::decode(&rec[..])?)
    }
}

/// Writes records to the secure stream; each record is encrypted into a buffer of its own size.
pub struct SecureWriter<W> {
    inner: W,
    state: Arc<Mutex<snow::TransportState>>,
}

/// Encrypts `data` as transport messages of at most [`MAX_CHUNK`] plaintext bytes each,
/// every one behind its 2-byte length, onto the end of `wire`.
fn seal_frames(
    state: &mut snow::TransportState,
    data: &[u8],
    wire: &mut Vec<u8>,
) -> Result<(), TransportError> {
    for chunk in data.chunks(MAX_CHUNK) {
        let at = wire.len();
        wire.resize(at + 2 + chunk.len() + TAG_LEN, 0);
        let n = match state.write_message(chunk, &mut wire[at + 2..]) {
            Ok(n) => n,
            Err(e) => {
                wire.truncate(at);
                return Err(e.into());
            }
        };
        wire[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        wire.truncate(at + 2 + n);
    }
    Ok(())
}

impl<W: AsyncWrite + Unpin> SecureWriter<W> {
    /// Writes one record (without flushing).
    pub async fn write_record(&mut self, record: &[u8]) -> Result<(), TransportError> {
        if record.len() > MAX_RECORD {
            return Err(TransportError::TooLarge(record.len()));
        }
        let mut data = Vec::with_capacity(4 + record.len());
        data.extend_from_slice(&(record.len() as u32).to_be_bytes());
        data.extend_from_slice(record);
        let mut wire = Vec::with_capacity(data.len() + data.len() / MAX_CHUNK * 18 + 18);
        seal_frames(&mut *self.state.lock().await, &data, &mut wire)?;
        self.inner.write_all(&wire).await?;
        Ok(())
    }

    pub async fn write_stanza(&mut self, stanza: &Stanza) -> Result<(), TransportError> {
        self.write_record(&stanza.encode_to_vec()).await
    }

    pub async fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush().await?;
        Ok(())
    }

    /// Writes bytes into the secure stream without record framing (for tests of hostile peers).
    pub async fn write_raw_stream(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        let mut wire = Vec::new();
        seal_frames(&mut *self.state.lock().await, bytes, &mut wire)?;
        self.inner.write_all(&wire).await?;
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.inner.shutdown().await;
    }

    /// Writes every stanza that arrives on `rx`, flushing when the queue runs empty, until the
    /// channel closes or the connection fails; then shuts the stream down. The queue may hold
    /// `Box<Stanza>`: a tokio channel allocates room for 32 items when it is made, which for a
    /// stanza held inline is about 22 KB per connection.
    pub async fn pump<S: std::borrow::Borrow<Stanza>>(
        mut self,
        mut rx: tokio::sync::mpsc::Receiver<S>,
    ) {
        while let Some(st) = rx.recv().await {
            if self.write_stanza(st.borrow()).await.is_err() {
                return;
            }
            while let Ok(st) = rx.try_recv() {
                if self.write_stanza(st.borrow()).await.is_err() {
                    return;
                }
            }
            if self.flush().await.is_err() {
                return;
            }
        }
        self.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, stanza::Body};

    #[tokio::test]
    async fn handshake_records_and_pinning() {
        let server_key = StaticKey::generate();
        let client_key = StaticKey::generate();
        let (a, b) = tokio::io::duplex(1 << 20);
        let sk = server_key.clone();
        let server = tokio::spawn(async move {
            let (mut r, mut w, remote) = accept(b, &sk).await.expect("accept");
            let big = r.read_record().await.expect("big record");
            let st = r.read_stanza().await.expect("stanza");
            w.write_stanza(&st).await.expect("echo");
            w.flush().await.expect("flush");
            (big.len(), remote)
        });
        let (mut r, mut w) = connect(a, &client_key, &server_key.public)
            .await
            .expect("connect");
        // A record spanning several transport messages.
        w.write_record(&vec![7u8; 200_000])
            .await
            .expect("write big");
        let ping = pb::Stanza {
            id: 5,
            body: Some(Body::Ping(pb::Ping { nonce: 9 })),
        };
        w.write_stanza(&ping).await.expect("write");
        w.flush().await.expect("flush");
        assert_eq!(r.read_stanza().await.expect("read"), ping);
        let (big, remote) = server.await.expect("server");
        assert_eq!(big, 200_000);
        assert_eq!(remote, client_key.public);
    }

    /// What the docs of `SecureReader` promise: a connection's buffers follow its records, and
    /// a large record does not leave a large buffer behind on an idle connection.
    #[tokio::test]
    async fn buffers_do_not_outlive_a_large_record() {
        let server_key = StaticKey::generate();
        let (a, b) = tokio::io::duplex(1 << 20);
        let sk = server_key.clone();
        let server = tokio::spawn(async move {
            let (r, _w, _) = accept(b, &sk).await.expect("accept");
            r
        });
        let (_r, mut w) = connect(a, &StaticKey::generate(), &server_key.public)
            .await
            .expect("connect");
        let mut r = server.await.expect("server");
        assert!(
            r.plain.capacity() + r.frame.capacity() < 1024,
            "idle after the handshake"
        );
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        w.write_record(&big).await.expect("write big");
        w.write_record(b"small").await.expect("write small");
        w.flush().await.expect("flush");
        assert_eq!(r.read_record().await.expect("big"), big);
        assert_eq!(r.read_record().await.expect("small"), b"small");
        assert!(
            r.plain.capacity() <= KEEP_IDLE_BUFFER && r.frame.capacity() <= KEEP_IDLE_BUFFER,
            "buffers after a large record: plain {}, frame {}",
            r.plain.capacity(),
            r.frame.capacity()
        );
    }

    #[tokio::test]
    async fn wrong_pinned_key_is_refused() {
        let server_key = StaticKey::generate();
        let (a, b) = tokio::io::duplex(1 << 16);
        let sk = server_key.clone();
        tokio::spawn(async move {
            let _ = accept(b, &sk).await;
        });
        let err = connect(a, &StaticKey::generate(), &StaticKey::generate().public)
            .await
            .err()
            .expect("must fail");
        assert!(matches!(err, TransportError::KeyMismatch), "{err}");
    }

    #[tokio::test]
    async fn garbage_handshake_is_an_error_not_a_panic() {
        let server_key = StaticKey::generate();
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let server =
            tokio::spawn(async move { accept(b, &server_key).await.err().map(|e| e.to_string()) });
        a.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.expect("write");
        assert!(server.await.expect("join").is_some());
    }

    #[test]
    fn key_file_roundtrip() {
        let k = StaticKey::generate();
        let back = StaticKey::from_file_text(&k.to_file_text()).expect("parses");
        assert_eq!(back.public, k.public);
        assert!(StaticKey::from_file_text("bm90IGEga2V5").is_none());
    }
}
