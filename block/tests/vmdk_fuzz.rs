//! Property tests (proptest) of the vmdk driver against untrusted bytes: the `qemu-img` seeds
//! of the `vmdk_image` fuzz target (`fuzz/corpus/vmdk_image/`, see
//! `scripts/vmdk-fuzz-seeds.py`) with random bytes or 4-byte little-endian words written over
//! them — mostly over the header, the embedded descriptor and the grain directory and tables
//! (the first 16 KiB), sometimes anywhere, and with the file cut short — then opened, read and
//! asked for block status by the fuzz body (`block::fuzzing::vmdk_image`): no panic, no hang,
//! ranges reported zero read as zeros, the bytes unchanged.
//!
//! A second property writes random extent lines into a descriptor.
//!
//! Case counts are kept small (the file runs in a few seconds); failing inputs are not persisted
//! (proptest prints the minimal case).

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::Config;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn seeds() -> Vec<Vec<u8>> {
    block::fuzzing::corpus_files(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vmdk_image"),
    )
    .into_iter()
    .map(|(_, b)| b)
    .collect()
}

/// One change: a byte or a little-endian word (small, huge, or pointing past the end) at an
/// offset, mostly in the metadata.
fn mutation() -> impl Strategy<Value = (u64, bool, u32)> {
    let offset = prop_oneof![4 => 0u64..16384, 1 => any::<u64>()];
    let value = prop_oneof![
        any::<u32>(),
        0u32..4,
        Just(u32::MAX),
        (1u32..200).prop_map(|s| s * 8),
    ];
    (offset, any::<bool>(), value)
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn mutated_seeds_never_panic(
        seed in any::<prop::sample::Index>(),
        changes in prop::collection::vec(mutation(), 1..8),
        cut in prop::option::weighted(0.1, any::<prop::sample::Index>()),
    ) {
        let all = seeds();
        let mut bytes = all[seed.index(all.len())].clone();
        for (offset, word, value) in changes {
            let at = (offset % bytes.len() as u64) as usize;
            if word && at + 4 <= bytes.len() {
                bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            } else {
                bytes[at] = value as u8;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        block::fuzzing::vmdk_image(&bytes);
    }

    #[test]
    fn random_extent_lines_never_panic(
        lines in prop::collection::vec(
            (
                prop::sample::select(vec!["RW", "RDONLY", "NOACCESS", "rw", ""]),
                prop_oneof![Just("0".to_owned()), Just("18446744073709551615".to_owned()),
                    (0u64..100_000).prop_map(|n| n.to_string()), "[0-9a-z -]{0,6}"],
                prop::sample::select(vec!["FLAT", "SPARSE", "ZERO", "VMFS", "SESPARSE", "X"]),
                "[\"a-z./ ]{0,12}",
                prop::option::of(0u64..5000),
            ),
            0..6,
        ),
        extent in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut text = String::from("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n");
        for (access, sectors, kind, name, offset) in lines {
            text.push_str(&format!("{access} {sectors} {kind} {name}"));
            if let Some(o) = offset {
                text.push_str(&format!(" {o}"));
            }
            text.push('\n');
        }
        let mut bytes = text.into_bytes();
        bytes.push(0);
        bytes.extend(extent);
        block::fuzzing::vmdk_image(&bytes);
    }
}
