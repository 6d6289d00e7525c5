//! Out-of-order and late delivery through the vault-backed Signal stores: messages of a 1:1
//! session (after PQXDH) and of a sender-key chain, decrypted in another order than they were sent.

use libsignal_protocol::{
    create_sender_key_distribution_message, group_decrypt, group_encrypt,
    process_sender_key_distribution_message,
};
use matrix_interop_bridge::{
    interop::{
        keys,
        signal_store::testing::{addr, decrypt, encrypt, session_to},
    },
    testing::signal_store as store,
};

/// An idle login does not hold its prekeys in memory (an upload set of 50 one-time Kyber1024
/// prekeys and the last-resort one is about 250 KB), and a peer that starts a session with
/// them is still answered: they are read from the vault.
#[tokio::test(flavor = "current_thread")]
async fn prekeys_are_read_from_the_vault_not_kept_in_memory() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (mut a, _da) = store("@a:test").await;
            let (mut b, _db) = store("@b:test").await;
            let (aa, ba) = (addr("+15550000001"), addr("+15550000002"));
            keys::make_upload(&mut b, true, keys::BATCH, keys::BATCH)
                .await
                .expect("upload set");
            assert!(
                b.memory_bytes() < 16 * 1024,
                "{} bytes of records in memory after an upload set",
                b.memory_bytes()
            );
            session_to(&mut a, &mut b, &ba).await;
            let first = encrypt(&mut a, &ba, b"hello").await;
            assert_eq!(decrypt(&mut b, &aa, &first).await, b"hello");
            assert!(b.memory_bytes() < 16 * 1024, "{} bytes", b.memory_bytes());
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn one_to_one_messages_decrypt_in_any_order() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (mut a, _da) = store("@a:test").await;
            let (mut b, _db) = store("@b:test").await;
            let (aa, ba) = (addr("+15550000001"), addr("+15550000002"));
            session_to(&mut a, &mut b, &ba).await;
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
