//! Hand-made images for the driver's unit tests (no `qemu-img` needed).

/// A minimal empty v3 image of `size` bytes with `1 << cluster_bits`-byte clusters, laid out as
/// `qemu-img create` does: header, refcount table (one cluster), one refcount block (counting
/// these four clusters), L1 table (one cluster at most).
pub(super) fn tiny_image(path: &std::path::Path, cluster_bits: u32, size: u64) {
    let c = 1usize << cluster_bits;
    let per_l2 = (c as u64 / 8) << cluster_bits;
    let l1_size = size.div_ceil(per_l2);
    assert!(l1_size * 8 <= c as u64, "the L1 table fits in one cluster");
    let mut b = vec![0u8; 4 * c];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, 0x5146_49fb);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, cluster_bits);
    put64(&mut b, 24, size);
    put32(&mut b, 36, l1_size as u32);
    put64(&mut b, 40, 3 * c as u64); // l1_table_offset
    put64(&mut b, 48, c as u64); // refcount_table_offset
    put32(&mut b, 56, 1); // refcount_table_clusters
    put32(&mut b, 96, 4); // refcount_order
    put32(&mut b, 100, 112); // header_length
    put64(&mut b, c, 2 * c as u64); // refcount table[0] -> block at cluster 2
    for i in 0..4 {
        b[2 * c + i * 2 + 1] = 1;
    }
    std::fs::write(path, b).expect("write the image");
}
