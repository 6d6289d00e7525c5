//! Out-of-order and late delivery through the vault-backed Signal stores: messages of a 1:1
//! session (after PQXDH) and of a sender-key chain, decrypted in another order than they were sent.

use std::sync::Arc;

use libsignal_protocol::{
    CiphertextMessage, DeviceId, GenericSignedPreKey, IdentityKeyStore, KeyPair, KyberPreKeyRecord,
    KyberPreKeyStore, PreKeyBundle, PreKeyRecord, PreKeySignalMessage, PreKeyStore,
    ProtocolAddress, SignalMessage, SignedPreKeyRecord, SignedPreKeyStore, Timestamp,
    create_sender_key_distribution_message, group_decrypt, group_encrypt, kem, message_decrypt,
    message_encrypt, process_prekey_bundle, process_sender_key_distribution_message,
};
use matrix_interop_bridge::{
    store::testing,
    vault::{SecretKey, Vault, VaultStore, signal::SignalStore},
};

fn addr(name: &str) -> ProtocolAddress {
    ProtocolAddress::new(name.to_owned(), DeviceId::new(1).expect("device 1"))
}

async fn store(owner: &str) -> (SignalStore, tempfile::TempDir) {
    let (sql, dir) = testing::sqlite().await;
    let db: Arc<dyn VaultStore> = Arc::new(sql);
    let vault = Vault::open(SecretKey::random(), db.clone())
        .await
        .expect("vault");
    (
        SignalStore::open(owner, vault, db).await.expect("store"),
        dir,
    )
}

async fn bundle_of(s: &mut SignalStore) -> PreKeyBundle {
    let mut rng = rand::rng();
    let ikp = s.identity_key_pair();
    let pk = KeyPair::generate(&mut rng);
    let spk = KeyPair::generate(&mut rng);
    let sig = ikp
        .private_key()
        .calculate_signature(&spk.public_key.serialize(), &mut rng)
        .expect("sign");
    s.prekeys
        .save_pre_key(1u32.into(), &PreKeyRecord::new(1u32.into(), &pk))
        .await
        .expect("save");
    s.signed
        .save_signed_pre_key(
            2u32.into(),
            &SignedPreKeyRecord::new(2u32.into(), Timestamp::from_epoch_millis(0), &spk, &sig),
        )
        .await
        .expect("save");
    let k = KyberPreKeyRecord::generate(kem::KeyType::Kyber1024, 3u32.into(), ikp.private_key())
        .expect("kyber");
    s.kyber
        .save_kyber_pre_key(3u32.into(), &k)
        .await
        .expect("save");
    s.commit(vec![]).await.expect("commit");
    PreKeyBundle::new(
        s.identity.get_local_registration_id().await.expect("reg"),
        DeviceId::new(1).expect("device"),
        Some((1u32.into(), pk.public_key)),
        2u32.into(),
        spk.public_key,
        sig.to_vec(),
        3u32.into(),
        k.public_key().expect("pk"),
        k.signature().expect("sig"),
        *ikp.identity_key(),
    )
    .expect("bundle")
}

async fn decrypt(s: &mut SignalStore, from: &ProtocolAddress, c: &CiphertextMessage) -> Vec<u8> {
    let msg = match c {
        CiphertextMessage::PreKeySignalMessage(_) => CiphertextMessage::PreKeySignalMessage(
            PreKeySignalMessage::try_from(c.serialize()).expect("parse"),
        ),
        _ => {
            CiphertextMessage::SignalMessage(SignalMessage::try_from(c.serialize()).expect("parse"))
        }
    };
    let out = message_decrypt(
        &msg,
        from,
        &mut s.sessions,
        &mut s.identity,
        &mut s.prekeys,
        &s.signed,
        &mut s.kyber,
        &mut rand::rng(),
    )
    .await
    .expect("decrypt");
    s.commit(vec![]).await.expect("commit");
    out
}

async fn encrypt(s: &mut SignalStore, to: &ProtocolAddress, pt: &[u8]) -> CiphertextMessage {
    let c = message_encrypt(
        pt,
        to,
        &mut s.sessions,
        &mut s.identity,
        std::time::SystemTime::now(),
        &mut rand::rng(),
    )
    .await
    .expect("encrypt");
    s.commit(vec![]).await.expect("commit");
    c
}

#[tokio::test(flavor = "current_thread")]
async fn one_to_one_messages_decrypt_in_any_order() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (mut a, _da) = store("@a:test").await;
            let (mut b, _db) = store("@b:test").await;
            let (aa, ba) = (addr("+15550000001"), addr("+15550000002"));
            let bundle = bundle_of(&mut b).await;
            process_prekey_bundle(
                &ba,
                &mut a.sessions,
                &mut a.identity,
                &bundle,
                std::time::SystemTime::now(),
                &mut rand::rng(),
            )
            .await
            .expect("bundle");
            a.commit(vec![]).await.expect("commit");
            // Three messages sent in a row; the first two arrive late, the third first.
            let c0 = encrypt(&mut a, &ba, b"zero").await;
            let c1 = encrypt(&mut a, &ba, b"one").await;
            let c2 = encrypt(&mut a, &ba, b"two").await;
            assert_eq!(decrypt(&mut b, &aa, &c2).await, b"two");
            assert_eq!(decrypt(&mut b, &aa, &c0).await, b"zero");
            assert_eq!(decrypt(&mut b, &aa, &c1).await, b"one");
            // After a reply (a DH ratchet step), a message from the old chain still opens.
            let r = encrypt(&mut b, &aa, b"reply").await;
            let late = encrypt(&mut a, &ba, b"late one").await;
            assert_eq!(decrypt(&mut a, &ba, &r).await, b"reply");
            let fresh = encrypt(&mut a, &ba, b"fresh").await;
            assert_eq!(decrypt(&mut b, &aa, &fresh).await, b"fresh");
            assert_eq!(decrypt(&mut b, &aa, &late).await, b"late one");
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn group_messages_decrypt_in_any_order() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (mut a, _da) = store("@a:test").await;
            let (mut b, _db) = store("@b:test").await;
            let aa = addr("+15550000001");
            let dist = uuid::Uuid::new_v4();
            let skdm = create_sender_key_distribution_message(
                &aa,
                dist,
                &mut a.sender_keys,
                &mut rand::rng(),
            )
            .await
            .expect("skdm");
            a.commit(vec![]).await.expect("commit");
            process_sender_key_distribution_message(&aa, &skdm, &mut b.sender_keys)
                .await
                .expect("process");
            b.commit(vec![]).await.expect("commit");
            let mut sent = Vec::new();
            for text in ["g0", "g1", "g2", "g3"] {
                let m = group_encrypt(
                    &mut a.sender_keys,
                    &aa,
                    dist,
                    text.as_bytes(),
                    &mut rand::rng(),
                )
                .await
                .expect("enc");
                a.commit(vec![]).await.expect("commit");
                sent.push((text, m.serialized().to_vec()));
            }
            for i in [3, 1, 0, 2] {
                let out = group_decrypt(&sent[i].1, &mut b.sender_keys, &aa)
                    .await
                    .expect("dec");
                b.commit(vec![]).await.expect("commit");
                assert_eq!(out, sent[i].0.as_bytes());
            }
        })
        .await;
}
