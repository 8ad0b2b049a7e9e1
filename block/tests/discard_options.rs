//! The backend's `discard` and `detect-zeroes` options (QEMU's meanings), in both engines. The
//! oracles: the file's allocation as `stat` counts it (`st_blocks`), its bytes as `std::fs`
//! reads them, and for qcow2 `qemu-img map`/`check`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use block::{open_image, BlockBackend, DetectZeroes, Discard, Format, OpenOptions};
use common::qemu::{create_qcow2, have_qemu, oracle_bytes, oracle_map, qemu_img, qemu_io};
use common::{co, disk_dir, image, pattern};
use runtime::block_on;

const KIB: u64 = 1024;
const SIZE: usize = 1 << 20;
/// The range punched / zeroed in every test: 256 KiB at 256 KiB.
const OFF: u64 = 256 * KIB;
const LEN: u64 = 256 * KIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Coroutine,
    Async,
}

const ENGINES: [Engine; 2] = [Engine::Coroutine, Engine::Async];

fn opts(format: Format, discard: Discard, detect_zeroes: DetectZeroes) -> OpenOptions {
    OpenOptions {
        format,
        discard,
        detect_zeroes,
        ..OpenOptions::default()
    }
}

fn blocks(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks()
}

fn write(e: Engine, blk: &Arc<BlockBackend>, off: u64, data: Vec<u8>) {
    match e {
        Engine::Coroutine => {
            let b = blk.clone();
            co(move || b.co_pwrite(off, &data)).expect("write");
        }
        Engine::Async => block_on(blk.pwrite_async(off, &data)).expect("write"),
    }
}

fn zeroes(e: Engine, blk: &Arc<BlockBackend>, off: u64, len: u64, may_unmap: bool) {
    match e {
        Engine::Coroutine => {
            let b = blk.clone();
            co(move || b.co_pwrite_zeroes(off, len, may_unmap)).expect("write zeroes");
        }
        Engine::Async => {
            block_on(blk.pwrite_zeroes_async(off, len, may_unmap)).expect("write zeroes")
        }
    }
}

fn discard(e: Engine, blk: &Arc<BlockBackend>, off: u64, len: u64) {
    match e {
        Engine::Coroutine => {
            let b = blk.clone();
            co(move || b.co_pdiscard(off, len)).expect("discard");
        }
        Engine::Async => block_on(blk.pdiscard_async(off, len)).expect("discard"),
    }
}

fn flush(e: Engine, blk: &Arc<BlockBackend>) {
    match e {
        Engine::Coroutine => {
            let b = blk.clone();
            co(move || b.co_flush()).expect("flush");
        }
        Engine::Async => block_on(blk.flush_async()).expect("flush"),
    }
}

/// A fully allocated raw image of pattern data, synced (so `st_blocks` is final).
fn allocated_raw(dir: &Path, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let data = pattern(SIZE, 3);
    let path = image(dir, name, &data);
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    (path, data)
}

/// [`allocated_raw`], its allocated size, and the image opened raw with these options.
fn open_allocated_raw(
    dir: &Path,
    name: &str,
    discard: Discard,
    detect_zeroes: DetectZeroes,
) -> (std::path::PathBuf, Vec<u8>, u64, Arc<BlockBackend>) {
    let (path, data) = allocated_raw(dir, name);
    let before = blocks(&path);
    let blk = open_image(&path, &opts(Format::Raw, discard, detect_zeroes)).expect("open");
    (path, data, before, blk)
}

fn expect_zeroed(path: &Path, mut model: Vec<u8>) {
    model[OFF as usize..(OFF + LEN) as usize].fill(0);
    assert!(std::fs::read(path).unwrap() == model, "contents differ");
}

#[test]
fn raw_discard_ignore_zeroes_but_keeps_allocation() {
    let dir = disk_dir();
    for e in ENGINES {
        let (path, data, before, blk) =
            open_allocated_raw(dir.path(), "ignore.img", Discard::Ignore, DetectZeroes::Off);
        // A discard does nothing at all: the data stays.
        discard(e, &blk, OFF, LEN);
        flush(e, &blk);
        assert!(
            std::fs::read(&path).unwrap() == data,
            "{e:?}: ignored discard changed data"
        );
        assert_eq!(blocks(&path), before, "{e:?}: ignored discard deallocated");
        // A punch (write-zeroes with may_unmap) zeroes, but deallocates nothing.
        zeroes(e, &blk, OFF, LEN, true);
        flush(e, &blk);
        assert!(blocks(&path) >= before, "{e:?}: discard=ignore deallocated");
        blk.close().unwrap();
        drop(blk);
        expect_zeroed(&path, data);
    }
}

#[test]
fn raw_discard_unmap_deallocates() {
    let dir = disk_dir();
    for e in ENGINES {
        let (path, data) = allocated_raw(dir.path(), "unmap.img");
        let before = blocks(&path);
        let blk =
            open_image(&path, &opts(Format::Raw, Discard::Unmap, DetectZeroes::Off)).expect("open");
        zeroes(e, &blk, OFF, LEN, true);
        flush(e, &blk);
        let punched = blocks(&path);
        assert!(
            punched <= before - LEN / 512,
            "{e:?}: punch did not deallocate ({before} -> {punched} blocks)"
        );
        // A write-zeroes without may_unmap stays a zero write, whatever the discard option.
        write(e, &blk, OFF + 2 * LEN, pattern(LEN as usize, 9));
        flush(e, &blk);
        let b2 = blocks(&path);
        zeroes(e, &blk, OFF + 2 * LEN, LEN, false);
        flush(e, &blk);
        assert!(
            blocks(&path) >= b2,
            "{e:?}: write-zeroes without unmap deallocated"
        );
        // A discard is passed down.
        discard(e, &blk, OFF + 2 * LEN, LEN);
        flush(e, &blk);
        assert!(
            blocks(&path) <= b2 - LEN / 512,
            "{e:?}: discard did not deallocate"
        );
        blk.close().unwrap();
        drop(blk);
        let mut model = data;
        model[(OFF + 2 * LEN) as usize..(OFF + 3 * LEN) as usize].fill(0);
        expect_zeroed(&path, model);
    }
}

#[test]
fn raw_detect_zeroes() {
    let dir = disk_dir();
    for e in ENGINES {
        // unmap + discard=unmap: a zero write over data deallocates it.
        let (path, data, before, blk) =
            open_allocated_raw(dir.path(), "dz.img", Discard::Unmap, DetectZeroes::Unmap);
        write(e, &blk, OFF, vec![0; LEN as usize]);
        flush(e, &blk);
        assert!(
            blocks(&path) <= before - LEN / 512,
            "{e:?}: detect-zeroes=unmap did not deallocate"
        );
        // Data that is not all zeros is written as it is.
        let mut almost = vec![0u8; 4096];
        almost[4095] = 1;
        write(e, &blk, 0, almost.clone());
        blk.close().unwrap();
        drop(blk);
        let mut model = data.clone();
        model[..4096].copy_from_slice(&almost);
        expect_zeroed(&path, model);

        // unmap with discard=ignore behaves as on: zeros, no deallocation.
        let (path, data, before, blk) = open_allocated_raw(
            dir.path(),
            "dz-ignore.img",
            Discard::Ignore,
            DetectZeroes::Unmap,
        );
        write(e, &blk, OFF, vec![0; LEN as usize]);
        flush(e, &blk);
        assert!(
            blocks(&path) >= before,
            "{e:?}: deallocated with discard=ignore"
        );
        blk.close().unwrap();
        drop(blk);
        expect_zeroed(&path, data);

        // off: a zero write into a hole allocates (it is written as data).
        let path = dir.path().join("dz-off.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(SIZE as u64).unwrap();
        drop(f);
        let blk =
            open_image(&path, &opts(Format::Raw, Discard::Unmap, DetectZeroes::Off)).expect("open");
        write(e, &blk, OFF, vec![0; LEN as usize]);
        flush(e, &blk);
        assert!(
            blocks(&path) >= LEN / 512,
            "{e:?}: detect-zeroes=off did not write the zeros"
        );
        blk.close().unwrap();
        drop(blk);
    }
}

/// Whether `qemu-img map` says `[OFF, OFF+LEN)` has no data (zero or unallocated).
fn qcow2_range_has_data(path: &Path) -> bool {
    oracle_map(path)
        .into_iter()
        .filter(|&(s, l, _, _)| s < OFF + LEN && s + l > OFF)
        .any(|(_, _, data, _)| data)
}

#[test]
fn qcow2_detect_zeroes() {
    if !have_qemu("qcow2_detect_zeroes") {
        return;
    }
    let dir = disk_dir();
    for e in ENGINES {
        for (dz, discard_opt, data_after) in [
            (DetectZeroes::Off, Discard::Ignore, true),
            (DetectZeroes::On, Discard::Ignore, false),
            (DetectZeroes::Unmap, Discard::Unmap, false),
        ] {
            // Into a hole: off writes a data cluster, on/unmap do not.
            let path = create_qcow2(dir.path(), "dz.qcow2", "cluster_size=65536", SIZE as u64);
            let blk = open_image(&path, &opts(Format::Qcow2, discard_opt, dz)).expect("open");
            write(e, &blk, OFF, vec![0; LEN as usize]);
            blk.close().unwrap();
            drop(blk);
            assert_eq!(
                qcow2_range_has_data(&path),
                data_after,
                "{e:?} {dz:?}: zero write into a hole"
            );
            qemu_img(dir.path(), &["check", "-q", path.to_str().unwrap()]);
            assert!(oracle_bytes(&path).iter().all(|&b| b == 0));

            // Over data: with unmap (and discard=unmap) the clusters are freed and read as
            // zeros; the file's other data stays.
            let path = create_qcow2(dir.path(), "dz2.qcow2", "cluster_size=65536", SIZE as u64);
            qemu_io("qcow2", &path, &["write -P 0xab 0 1M"]);
            let blk = open_image(&path, &opts(Format::Qcow2, discard_opt, dz)).expect("open");
            write(e, &blk, OFF, vec![0; LEN as usize]);
            blk.close().unwrap();
            drop(blk);
            assert_eq!(
                qcow2_range_has_data(&path),
                dz == DetectZeroes::Off,
                "{e:?} {dz:?}: zero write over data"
            );
            qemu_img(dir.path(), &["check", "-q", path.to_str().unwrap()]);
            let bytes = oracle_bytes(&path);
            let mut model = vec![0xab; SIZE];
            model[OFF as usize..(OFF + LEN) as usize].fill(0);
            assert!(bytes == model, "{e:?} {dz:?}: contents differ");
            std::fs::remove_file(&path).unwrap();
            std::fs::remove_file(dir.path().join("dz.qcow2")).unwrap();
        }
    }
}

#[test]
fn qcow2_discard_ignore_keeps_data_clusters_allocated() {
    if !have_qemu("qcow2_discard_ignore_keeps_data_clusters_allocated") {
        return;
    }
    let dir = disk_dir();
    for e in ENGINES {
        for (d, freed) in [(Discard::Ignore, false), (Discard::Unmap, true)] {
            let path = create_qcow2(dir.path(), "d.qcow2", "cluster_size=65536", SIZE as u64);
            qemu_io("qcow2", &path, &["write -P 0xcd 0 1M"]);
            let blk = open_image(&path, &opts(Format::Qcow2, d, DetectZeroes::Off)).expect("open");
            zeroes(e, &blk, OFF, LEN, true);
            discard(e, &blk, 0, 64 * KIB);
            blk.close().unwrap();
            drop(blk);
            qemu_img(dir.path(), &["check", "-q", path.to_str().unwrap()]);
            let bytes = oracle_bytes(&path);
            assert!(
                bytes[OFF as usize..(OFF + LEN) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "{e:?} {d:?}: a punched range must read as zeros"
            );
            // discard=ignore: the discarded first cluster keeps its data.
            let first_kept = bytes[..64 * KIB as usize].iter().all(|&b| b == 0xcd);
            assert_eq!(first_kept, !freed, "{e:?} {d:?}: discard of cluster 0");
            // Allocation as qemu-img sees it: zeroed clusters that keep their host cluster
            // (ignore) have an "offset"; freed ones (unmap) have none.
            let json = qemu_img(
                dir.path(),
                &["map", "--output=json", path.to_str().unwrap()],
            );
            let punched = json
                .split('{')
                .find(|o| o.contains(&format!("\"start\": {OFF},")))
                .expect("an extent at the punched offset");
            assert!(punched.contains("\"zero\": true"), "{e:?} {d:?}: {json}");
            assert_eq!(
                punched.contains("\"offset\""),
                !freed,
                "{e:?} {d:?}: host clusters of the punched range: {json}"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }
}
