//! Client-side media encryption (docs/interop-protocol.md §13): a random 64-byte key
//! (AES-256 key || HMAC-SHA256 key), blob = iv || AES-256-CBC-PKCS7(plaintext) || HMAC(iv || ct).

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type Enc = cbc::Encryptor<aes::Aes256>;
type Dec = cbc::Decryptor<aes::Aes256>;
type HmacSha256 = Hmac<Sha256>;

/// An encrypted blob and what the recipient needs to open it.
pub struct Sealed {
    pub blob: Vec<u8>,
    pub key: Zeroizing<Vec<u8>>,
    pub sha256: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaError {
    #[error("media key must be 64 bytes")]
    BadKey,
    #[error("media hash does not match")]
    Hash,
    #[error("media authentication failed")]
    Mac,
    #[error("media is malformed")]
    Malformed,
}

pub fn encrypt(plaintext: &[u8]) -> Sealed {
    let mut key = Zeroizing::new(vec![0u8; 64]);
    let mut iv = [0u8; 16];
    rand::rng().fill_bytes(&mut key);
    rand::rng().fill_bytes(&mut iv);
    let ct = Enc::new_from_slices(&key[..32], &iv)
        .expect("32-byte key, 16-byte iv")
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext);
    let mut blob = Vec::with_capacity(16 + ct.len() + 32);
    blob.extend_from_slice(&iv);
    blob.extend_from_slice(&ct);
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(&key[32..]).expect("HMAC takes any key length");
    mac.update(&blob);
    blob.extend_from_slice(&mac.finalize().into_bytes());
    let sha256 = Sha256::digest(&blob).to_vec();
    Sealed { blob, key, sha256 }
}

/// Checks hash and MAC, then decrypts.
pub fn decrypt(blob: &[u8], key: &[u8], sha256: &[u8]) -> Result<Zeroizing<Vec<u8>>, MediaError> {
    if key.len() != 64 {
        return Err(MediaError::BadKey);
    }
    if Sha256::digest(blob).as_slice() != sha256 {
        return Err(MediaError::Hash);
    }
    if blob.len() < 16 + 16 + 32 {
        return Err(MediaError::Malformed);
    }
    let (body, tag) = blob.split_at(blob.len() - 32);
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(&key[32..]).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(tag).map_err(|_| MediaError::Mac)?;
    let (iv, ct) = body.split_at(16);
    Dec::new_from_slices(&key[..32], iv)
        .map_err(|_| MediaError::Malformed)?
        .decrypt_padded_vec_mut::<Pkcs7>(ct)
        .map(Zeroizing::new)
        .map_err(|_| MediaError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_tamper() {
        let s = encrypt(b"picture bytes");
        assert_eq!(
            &decrypt(&s.blob, &s.key, &s.sha256).expect("opens")[..],
            b"picture bytes"
        );
        let mut bad = s.blob.clone();
        bad[20] ^= 1;
        assert_eq!(
            decrypt(&bad, &s.key, &s.sha256).err(),
            Some(MediaError::Hash)
        );
        let hash = Sha256::digest(&bad).to_vec();
        assert_eq!(decrypt(&bad, &s.key, &hash).err(), Some(MediaError::Mac));
        assert_eq!(
            decrypt(&s.blob, &s.key[..10], &s.sha256).err(),
            Some(MediaError::BadKey)
        );
    }
}
