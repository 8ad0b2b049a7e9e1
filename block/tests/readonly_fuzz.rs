//! Property tests (proptest) of the read-only format drivers (vdi, vpc, vhdx) against untrusted
//! bytes: the `qemu-img`-made seeds of `fuzz/corpus/{vdi,vpc,vhdx}_image/` with a few random
//! bytes or 8-byte words written over their metadata (headers, block maps, BATs, metadata
//! items), then the fuzz body (`block::fuzzing::*_image`): opened read-only, read, block status
//! walked — `Ok` or a clean error, never a panic, a zero range reads as zeros, nothing written.
//! For vhdx, half the cases recompute the headers' and region table's CRC-32C after the
//! mutation, so that the mutation gets past the checksums to the parsers behind them.
//!
//! Case counts are small (a few seconds); proptest prints the minimal failing case.

use std::path::PathBuf;

use block::fuzzing::{compact_sparse, corpus_files, expand_sparse};
use block::vhdx::header::crc32c;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// The expanded seeds of a target.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    corpus_files(&dir)
        .into_iter()
        .filter(|(p, _)| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("qemu-img-"))
        })
        .map(|(_, b)| expand_sparse(&b))
        .collect()
}

/// Offsets of the image's non-zero sectors (its metadata and the few data sectors).
fn interesting(image: &[u8]) -> Vec<usize> {
    image
        .chunks(512)
        .enumerate()
        .filter(|(_, s)| s.iter().any(|&b| b != 0))
        .map(|(i, _)| i * 512)
        .collect()
}

/// Writes `words` (offset choice, value, width) over `image`.
fn mutate(image: &mut [u8], words: &[(usize, usize, u64, u8)]) {
    let hot = interesting(image);
    for &(pick, at, value, width) in words {
        let base = if pick % 4 == 0 || hot.is_empty() {
            at % image.len().max(1)
        } else {
            hot[pick % hot.len()] + at % 512
        };
        let width = usize::from(width % 8) + 1;
        for (k, b) in value.to_le_bytes().iter().take(width).enumerate() {
            if let Some(x) = image.get_mut(base + k) {
                *x = *b;
            }
        }
    }
}

/// Recomputes the CRC-32C of both vhdx headers and the region table.
fn fix_vhdx_crcs(image: &mut [u8]) {
    for (at, len) in [(64 << 10, 4096), (128 << 10, 4096), (192 << 10, 64 << 10)] {
        if image.len() < at + len {
            continue;
        }
        image[at + 4..at + 8].fill(0);
        let c = crc32c(&image[at..at + len]);
        image[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
    }
}

fn words() -> impl Strategy<Value = Vec<(usize, usize, u64, u8)>> {
    prop::collection::vec(
        (
            any::<usize>(),
            any::<usize>(),
            prop_oneof![
                any::<u64>(),
                Just(0),
                Just(u64::MAX),
                Just(0xffff_ffff),
                (0u64..64).prop_map(|k| 1 << k)
            ],
            any::<u8>(),
        ),
        1..6,
    )
}

fn run(target: &str, body: fn(&[u8]), cases: u32, crcs: bool) {
    let seeds = seeds(target);
    assert!(!seeds.is_empty());
    let mut runner = proptest::test_runner::TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(0..seeds.len(), words(), any::<bool>()),
            |(seed, words, fix)| {
                let mut image = seeds[seed].clone();
                mutate(&mut image, &words);
                if crcs && fix {
                    fix_vhdx_crcs(&mut image);
                }
                body(&compact_sparse(&image));
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{target}: {e}"));
}

#[test]
fn mutated_vdi_images_never_panic() {
    run("vdi_image", block::fuzzing::vdi_image, 200, false);
}

#[test]
fn mutated_vpc_images_never_panic() {
    run("vpc_image", block::fuzzing::vpc_image, 200, false);
}

#[test]
fn mutated_vhdx_images_never_panic() {
    run("vhdx_image", block::fuzzing::vhdx_image, 200, true);
}
