//! `--discard ignore|unmap` and `--detect-zeroes off|on|unmap` (QEMU's meanings) end to end: a
//! punched hole always reads as zeros; it deallocates in the image only with `--discard unmap`;
//! zero writes with `--detect-zeroes unmap --discard unmap` free qcow2 clusters.

use std::fs;

use tests::*;

const MIB: u64 = 1024 * 1024;

/// `fallocate -p` of 2 MiB at 1 MiB through the mount of a fully allocated raw image: zeros
/// either way; the image's allocation shrinks with `--discard unmap` and not by default.
#[test]
fn punch_hole_deallocates_only_with_discard_unmap() {
    require!(fuse_available(), have_tools(&["fallocate"]));
    let dir = disk_workdir();
    if !supports_holes(dir.path()) {
        skip(&format!("{} has no holes", dir.path().display()));
        return;
    }
    for (args, frees) in [(NO_ARGS, false), (&["--discard", "unmap"][..], true)] {
        let img = dir.path().join("t.img");
        let mut data = random_image(&img, 8 * MIB as usize, 14_005);
        fs::File::open(&img).unwrap().sync_all().unwrap();
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").unwrap();
        let mut e = Export::start(&img, &mnt, args);
        let before = allocated(&img);
        sh!("fallocate", "-p", "-o", "1M", "-l", "2M", e.path()).ok();
        data[MIB as usize..3 * MIB as usize].fill(0);
        assert_same_bytes(&read_all(e.path()), &data, "export after punch hole");
        e.stop_ok();
        assert_same_bytes(&read_all(&img), &data, "image after punch hole");
        let after = allocated(&img);
        if frees {
            assert!(
                after + 2 * MIB <= before,
                "{args:?}: the punch should free 2 MiB ({before} -> {after} bytes)"
            );
        } else {
            assert!(
                after >= before,
                "{args:?}: discard=ignore must not deallocate ({before} -> {after} bytes)"
            );
        }
        fs::remove_file(&img).unwrap();
    }
}

/// Zeros written with `dd` over allocated qcow2 data with `--detect-zeroes unmap --discard
/// unmap` become unallocated/zero clusters (`qemu-img map`), read as zeros, and the image is
/// clean; without the options (the defaults) the same write stays data.
#[test]
fn detect_zeroes_unmap_frees_qcow2_clusters() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io", "dd"]));
    let dir = disk_workdir();
    let detect = ["--detect-zeroes", "unmap", "--discard", "unmap"];
    for (args, freed) in [(&detect[..], true), (NO_ARGS, false)] {
        let q = dir.path().join("z.qcow2");
        create_qcow2(&q, "cluster_size=65536", 8 * MIB);
        sh!("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", &q).ok();
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").unwrap();
        let mut e = Export::start(&q, &mnt, args);
        let of = format!("of={}", e.path().display());
        sh!(
            "dd",
            "if=/dev/zero",
            &of,
            "bs=64k",
            "count=16",
            "seek=16",
            "conv=notrunc",
            "oflag=direct",
            "status=none"
        )
        .ok();
        let mut want = vec![0u8; 8 * MIB as usize];
        want[..4 * MIB as usize].fill(0x5a);
        want[MIB as usize..2 * MIB as usize].fill(0);
        assert_same_bytes(&read_all(e.path()), &want, "export after dd");
        e.stop_ok();
        sh!("qemu-img", "check", "-q", &q).ok();
        let map = sh!("qemu-img", "map", "--output=json", &q).ok().stdout;
        if freed {
            // The extent starting at 1 MiB covers the zeroed MiB.
            let ext = map
                .split('{')
                .find(|o| o.contains(&format!("\"start\": {MIB},")))
                .unwrap_or_else(|| panic!("{args:?}: no extent at 1 MiB: {map}"));
            assert!(
                ext.contains("\"data\": false") && ext.contains("\"zero\": true"),
                "{args:?}: the zeroed clusters should be zero, not data: {map}"
            );
            assert!(
                !ext.contains("\"offset\""),
                "{args:?}: still allocated: {map}"
            );
        } else {
            // One data extent over the 4 MiB: the zeros were written as data.
            assert!(
                map.contains(&format!("\"start\": 0, \"length\": {},", 4 * MIB))
                    && map.split('{').nth(1).unwrap().contains("\"data\": true"),
                "{args:?}: without detect-zeroes the zeros are data: {map}"
            );
        }
        let raw = dir.path().join("oracle.raw");
        sh!("qemu-img", "convert", "-f", "qcow2", "-O", "raw", &q, &raw).ok();
        assert_same_bytes(&read_all(&raw), &want, "qemu-img's view");
        fs::remove_file(&raw).unwrap();
        fs::remove_file(&q).unwrap();
    }
}
