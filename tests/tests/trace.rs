//! `-vv` (trace level) shows one request's life, as `docs/lifecycle.md` walks through it: the
//! request read from `/dev/fuse` (or fetched from an io_uring entry), its coroutine (or task)
//! entered, the reply written — in that order, all under the request's `unique` id.

use std::fs;
use std::os::unix::fs::FileExt;

use tests::*;

/// Where the test reads: an offset no other request of the run uses.
const OFFSET: u64 = 12288;

/// Runs an export with `-vv` (and `RUST_LOG=trace`, which the harness would otherwise set to
/// `info`), reads 4 KiB at [`OFFSET`], stops it; returns the daemon's log and stdout.
fn traced_read(transport: &str) -> (String, String) {
    let dir = workdir();
    let img = dir.path().join("t.img");
    fs::write(&img, random_bytes(7, 64 * 1024)).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let args = ["-vv", "--transport", transport];
    let mut e = match Export::try_start_with(None, &img, &mnt, &args, |cmd| {
        cmd.env("RUST_LOG", "trace");
    }) {
        Ok(e) => e,
        Err(x) => panic!("export did not start: {x}"),
    };
    let f = fs::File::open(e.path()).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, OFFSET).unwrap();
    assert_eq!(
        buf,
        random_bytes(7, 64 * 1024)[OFFSET as usize..][..4096],
        "{}",
        e.logs()
    );
    drop(f);
    // The reply's trace line is written after the reply itself: stop first, then read.
    let x = e.stop_ok();
    (x.stderr, x.stdout)
}

/// The index of the first line at or after `from` that contains every one of `parts`.
fn find(lines: &[&str], from: usize, parts: &[&str]) -> Option<usize> {
    (from..lines.len()).find(|&i| parts.iter().all(|p| lines[i].contains(p)))
}

/// The `unique` id of the traced READ at [`OFFSET`] (`… unique 14 READ 4096 bytes at 12288: …`)
/// and the index of its line.
fn the_read(lines: &[&str], arrival: &str) -> (usize, String) {
    let at = format!("READ 4096 bytes at {OFFSET}:");
    let i = find(lines, 0, &[&at, arrival])
        .unwrap_or_else(|| panic!("no `{at} {arrival}` line in the trace"));
    let unique = lines[i]
        .split("unique ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no unique id in `{}`", lines[i]))
        .to_owned();
    (i, unique)
}

#[test]
fn vv_traces_a_read_from_dev_fuse_to_its_reply() {
    require!(fuse_available());
    let (log, _) = traced_read("dev");
    let lines: Vec<&str> = log.lines().collect();
    let (read, unique) = the_read(&lines, "read from /dev/fuse");
    let id = format!("unique {unique}:");
    // Entered at once, by the fd handler that read it: a coroutine (`enters co 0@main`) or,
    // with `--engine async`, a task.
    let enter = find(&lines, read + 1, &[&id, "enters "])
        .unwrap_or_else(|| panic!("no `{id} enters` after the read\n{log}"));
    assert!(
        lines[enter].contains("enters co ") || lines[enter].contains("enters a task"),
        "{}",
        lines[enter]
    );
    let reply = find(
        &lines,
        enter + 1,
        &[&id, "reply written to /dev/fuse (4096 bytes of data)"],
    )
    .unwrap_or_else(|| panic!("no 4096-byte reply for {id} after it was entered\n{log}"));
    // The block layer's part sits between: the file driver's read of those bytes.
    let file = format!("file: read 4096 bytes at {OFFSET}:");
    assert!(
        find(&lines[..reply], enter + 1, &[&file]).is_some(),
        "no `{file}` between {id}'s enter and reply\n{log}"
    );
}

#[test]
fn vv_traces_a_read_fetched_from_a_ring_entry_to_its_commit() {
    require!(fuse_available());
    if uring_skip() {
        return;
    }
    let (log, stdout) = traced_read("uring");
    if !stdout.contains("via io_uring") {
        // The kernel did not grant the ring (the log says why): nothing ring-shaped to trace.
        skip(&format!("the ring was not granted: {stdout}"));
        return;
    }
    let lines: Vec<&str> = log.lines().collect();
    // One line says both: the request arrived in an entry whose coroutine (or task) the
    // completion of COMMIT_AND_FETCH has just resumed.
    let (fetch, unique) = the_read(&lines, "fetched from a ring entry");
    let id = format!("unique {unique}:");
    find(
        &lines,
        fetch + 1,
        &[&id, "reply written to the ring entry (4096 bytes of data"],
    )
    .unwrap_or_else(|| panic!("no 4096-byte reply for {id} after its fetch\n{log}"));
}

/// Whether the io_uring transport cannot run here (the kernel has it off or lacks it).
fn uring_skip() -> bool {
    match fs::read_to_string("/sys/module/fuse/parameters/enable_uring") {
        Ok(v) if v.trim() == "Y" => false,
        _ => {
            skip("FUSE over io_uring is not enabled (/sys/module/fuse/parameters/enable_uring)");
            true
        }
    }
}
