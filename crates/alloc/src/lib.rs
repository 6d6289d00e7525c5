//! The memory allocator of the project's two programs, the bridge and the reference gateway.
//!
//! mimalloc instead of glibc's allocator: both allocate and free small buffers on several
//! threads for every message. glibc's malloc took about a tenth of the bridge's CPU under load;
//! in the gateway, mimalloc took 8 to 15 % less CPU per message than glibc's allocator in the
//! bench's max runs at 1,000 chats.
//!
//! Each program names it as its global allocator and calls [`with_settings`] first thing in
//! `main`:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: mib_alloc::Allocator = mib_alloc::Allocator;
//!
//! fn main() {
//!     mib_alloc::with_settings();
//!     // ...
//! }
//! ```

/// The allocator.
pub use mimalloc::MiMalloc as Allocator;

/// mimalloc's settings: memory is committed as it is used, and freed memory goes back to the
/// system at once. With mimalloc's defaults (an arena committed up front, freed pages reset
/// after a delay rather than returned) an idle bridge kept about twice the resident memory it
/// has with glibc's allocator, and the gateway about three times (42 against 13 MiB at start);
/// with these, the bridge a little less than with glibc's, the gateway a little more (14 MiB
/// at start, 68 against 61 MiB at its peak in the bench).
pub const SETTINGS: [(&str, &str); 2] = [
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
    ("MIMALLOC_PURGE_DELAY", "0"),
];

/// mimalloc reads its settings from the environment as the process starts, before `main`. When
/// they are not there (set by the admin, or by an earlier call of this), the program starts
/// itself again, in the same process, with them added; an admin's own values are kept. Call it
/// before anything else, in a `main` that has started no threads.
#[cfg(unix)]
pub fn with_settings() {
    use std::os::unix::process::CommandExt;
    if SETTINGS.iter().all(|(k, _)| std::env::var_os(k).is_some()) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args);
    for (k, v) in SETTINGS {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    // Returns only if the new image could not be started.
    let e = cmd.exec();
    // Before any logging exists: the program's own report of why it goes on with the defaults.
    eprintln!("cannot restart with the allocator's settings ({e}); going on with its defaults");
}

/// Elsewhere mimalloc runs with its defaults.
#[cfg(not(unix))]
pub fn with_settings() {}
