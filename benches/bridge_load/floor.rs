//! The floor: what the Signal work of one message costs without the bridge around it, measured
//! in the same run so that the bridge's CPU per message can be read against it.
//!
//! It is the account actor's own work on a message, done the same way (`signal_store::testing`:
//! vault-backed stores on SQLite, one commit per message): Matrix→interop is an encrypt and its
//! commit, interop→Matrix a decrypt and its commit. As in the runs, a chat's messages all go one
//! way, so they follow one chain (no DH ratchet step per message); the alternating pattern of a
//! conversation, where every decrypt takes a ratchet step, is printed beside it.

use std::time::{Duration, Instant};

use matrix_interop_bridge::{
    interop::signal_store::testing::{addr, decrypt, encrypt, session_to},
    testing::signal_store as store,
};

/// Mean µs per message of one task on an otherwise quiet machine.
pub(crate) struct Floor {
    pub(crate) encrypt_us: f64,
    pub(crate) decrypt_us: f64,
    pub(crate) alternating_encrypt_us: f64,
    pub(crate) alternating_decrypt_us: f64,
}

fn mean_us(total: Duration, n: usize) -> f64 {
    total.as_secs_f64() * 1e6 / n.max(1) as f64
}

/// `n` messages one way, then `n` rounds of a reply each way.
pub(crate) async fn measure_floor(n: usize) -> Floor {
    let (mut a, _da) = store("@floor-a:bench").await;
    let (mut b, _db) = store("@floor-b:bench").await;
    let (aa, ba) = (addr("+15559990001"), addr("+15559990002"));
    session_to(&mut a, &mut b, &ba).await;
    let pt = vec![b'x'; 64];
    let first = encrypt(&mut a, &ba, &pt).await;
    decrypt(&mut b, &aa, &first).await;

    let (mut enc, mut dec) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let t = Instant::now();
        let c = encrypt(&mut a, &ba, &pt).await;
        enc += t.elapsed();
        let t = Instant::now();
        decrypt(&mut b, &aa, &c).await;
        dec += t.elapsed();
    }
    let (mut alt_enc, mut alt_dec) = (Duration::ZERO, Duration::ZERO);
    for round in 0..n {
        let (from, to, from_addr, to_addr) = if round % 2 == 0 {
            (&mut b, &mut a, &ba, &aa)
        } else {
            (&mut a, &mut b, &aa, &ba)
        };
        let t = Instant::now();
        let c = encrypt(from, to_addr, &pt).await;
        alt_enc += t.elapsed();
        let t = Instant::now();
        decrypt(to, from_addr, &c).await;
        alt_dec += t.elapsed();
    }
    Floor {
        encrypt_us: mean_us(enc, n),
        decrypt_us: mean_us(dec, n),
        alternating_encrypt_us: mean_us(alt_enc, n),
        alternating_decrypt_us: mean_us(alt_dec, n),
    }
}

impl Floor {
    pub(crate) fn print(&self) {
        println!(
            "floor (Signal and its vault commit alone, one task, no bridge): Matrix→interop {:.0} µs/msg \
             (encrypt), interop→Matrix {:.0} µs/msg (decrypt), one way as in the runs; in a conversation \
             (a DH ratchet step per reply) {:.0} and {:.0} µs",
            self.encrypt_us,
            self.decrypt_us,
            self.alternating_encrypt_us,
            self.alternating_decrypt_us
        );
    }
}
