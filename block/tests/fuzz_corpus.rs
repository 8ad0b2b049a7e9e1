//! Replays the committed fuzz corpora of the block layer's targets (`fuzz/corpus/qcow2_header/`,
//! `qcow2_image/`, `backing_name/`, `partition_table/`, `vdi_image/`, `vpc_image/`,
//! `vhdx_image/`, `vmdk_image/`: small images made by `qemu-img` (the vdi, vpc and vhdx ones in
//! the sparse form of `block::fuzzing::expand_sparse`, the vmdk ones compacted by
//! `scripts/vmdk-fuzz-seeds.py`), tables
//! made by `sfdisk` and `sgdisk`, names, and every input that once crashed) through the same
//! bodies the fuzzer runs ([`block::fuzzing`]). This is the part of the fuzzing that runs in
//! every `cargo test`, without cargo-fuzz or nightly.

use std::path::PathBuf;
use std::sync::Arc;

use block::fuzzing::MemDriver;
use block::Qcow2Driver;

/// The files of `fuzz/corpus/<target>/`, sorted; panics if there are none.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    block::fuzzing::corpus_files(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target),
    )
}

fn replay(target: &str, body: fn(&[u8])) {
    for (path, bytes) in corpus(target) {
        eprintln!("{}", path.display());
        body(&bytes);
    }
}

#[test]
fn qcow2_header_corpus_replays_cleanly() {
    replay("qcow2_header", block::fuzzing::qcow2_header);
}

#[test]
fn qcow2_image_corpus_replays_cleanly() {
    replay("qcow2_image", block::fuzzing::qcow2_image);
    // The seeds made by qemu-img open (but the one with a backing file, which needs its path),
    // so the target starts from images that reach the read and write paths.
    for (path, bytes) in corpus("qcow2_image") {
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if !name.starts_with("qemu-img-") || name.contains("backing") {
            continue;
        }
        for read_only in [true, false] {
            let child = Arc::new(MemDriver::new(bytes.clone(), read_only, 1 << 24));
            if let Err(e) = Qcow2Driver::open(child) {
                panic!("{name} (read-only: {read_only}): {e}");
            }
        }
    }
}

#[test]
fn vmdk_image_corpus_replays_cleanly() {
    replay("vmdk_image", block::fuzzing::vmdk_image);
    // The seeds made by qemu-img open, so the target starts from images that reach the reads.
    for (path, bytes) in corpus("vmdk_image") {
        let name = path.file_name().expect("a name").to_string_lossy();
        if !name.starts_with("qemu-img-") {
            continue;
        }
        let (first, extent) = match bytes.iter().position(|&b| b == 0) {
            Some(nul) if !bytes.starts_with(b"KDMV") => (&bytes[..nul], &bytes[nul + 1..]),
            _ => (&bytes[..], &[][..]),
        };
        let child = Arc::new(MemDriver::new(first.to_vec(), true, 0));
        let extent = Arc::new(MemDriver::new(extent.to_vec(), true, 0));
        let mut open = |_: &std::path::Path| -> block::Result<Arc<dyn block::BlockDriver>> {
            Ok(extent.clone())
        };
        let d = block::VmdkDriver::open_with(child, std::path::Path::new("seed.vmdk"), &mut open)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(block::BlockDriver::getlength(&d) % 512, 0, "{name}");
    }
}

#[test]
fn backing_name_corpus_replays_cleanly() {
    replay("backing_name", block::fuzzing::backing_name);
}

#[test]
fn partition_table_corpus_replays_cleanly() {
    replay("partition_table", block::fuzzing::partition_table);
    // The seeds the tools made parse (so the fuzzer starts from inputs that reach every
    // branch): sfdisk's 3 primaries-or-logicals and sgdisk's 3 GPT entries.
    for (path, bytes) in corpus("partition_table") {
        let name = path.file_name().expect("a name").to_string_lossy();
        if !(name.starts_with("sfdisk-") || name.starts_with("sgdisk-")) {
            continue;
        }
        let (size, disk) = bytes.split_at(8);
        let size = u64::from_le_bytes(size.try_into().expect("8 bytes"));
        let mut read = |off: u64, buf: &mut [u8]| {
            buf.fill(0);
            let start = (off as usize).min(disk.len());
            let n = (disk.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&disk[start..start + n]);
            Ok(())
        };
        let table = block::partition::read_partitions(&mut read, size)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: no table"));
        let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
        let want: &[u32] = if name.starts_with("sfdisk-") {
            &[1, 2, 5, 6, 7]
        } else {
            &[1, 2, 4]
        };
        assert_eq!(numbers, want, "{name}");
    }
}

#[test]
fn nbd_server_corpus_replays_cleanly() {
    replay("nbd_server", block::fuzzing::nbd_server);
}

/// The read-only formats' seeds made by qemu-img open (so the targets start from images that
/// reach the read path), and every corpus file replays without a panic.
fn read_only_corpus(target: &str, body: fn(&[u8]), open: fn(Arc<MemDriver>) -> block::Result<()>) {
    replay(target, body);
    for (path, bytes) in corpus(target) {
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if !name.starts_with("qemu-img-") {
            continue;
        }
        let image = block::fuzzing::expand_sparse(&bytes);
        if let Err(e) = open(Arc::new(MemDriver::new(image, true, 0))) {
            panic!("{target}/{name}: {e}");
        }
    }
}

#[test]
fn vdi_image_corpus_replays_cleanly() {
    read_only_corpus("vdi_image", block::fuzzing::vdi_image, |c| {
        block::vdi::VdiDriver::open(c).map(drop)
    });
}

#[test]
fn vpc_image_corpus_replays_cleanly() {
    read_only_corpus("vpc_image", block::fuzzing::vpc_image, |c| {
        block::vpc::VpcDriver::open(c).map(drop)
    });
}

#[test]
fn vhdx_image_corpus_replays_cleanly() {
    read_only_corpus("vhdx_image", block::fuzzing::vhdx_image, |c| {
        block::vhdx::VhdxDriver::open(c).map(drop)
    });
}
