//! The allocator's settings as a program started with `MIMALLOC_VERBOSE=1` printed them
//! (`mib-alloc`): the bridge's and the gateway's tests read them.

/// (`arena_eager_commit`, `purge_delay`) as mimalloc printed them last: it prints its options as
/// it starts, and a program that starts itself again prints them twice.
pub fn settings(out: &str) -> (Option<String>, Option<String>) {
    (
        last_option(out, "arena_eager_commit"),
        last_option(out, "purge_delay"),
    )
}

fn last_option(out: &str, option: &str) -> Option<String> {
    let prefix = format!("option '{option}': ");
    out.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .map(|v| v.trim().to_owned())
}
