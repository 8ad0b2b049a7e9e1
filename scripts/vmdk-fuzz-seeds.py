#!/usr/bin/env python3
"""Makes the seeds of the `vmdk_image` fuzz target (fuzz/corpus/vmdk_image/) with qemu-img.

Each seed is one input of `block::fuzzing::vmdk_image`: a sparse file (KDMV) as it is, or a
text descriptor, a NUL byte, and the bytes of the extent file the descriptor names. qemu-img
puts a sparse file's first grain 64 KiB in; the seeds are compacted (grains moved right after
the grain tables, entries and `overHead` adjusted, trailing zeros cut) so that they stay a few
KiB, and every compacted file is checked to read the same through `qemu-img convert` as the
original. Run from the repository root: `python3 scripts/vmdk-fuzz-seeds.py`.
"""

import os
import struct
import subprocess
import sys
import tempfile

OUT = os.path.join("fuzz", "corpus", "vmdk_image")


def run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def raw_of(path, cwd):
    out = path + ".raw"
    run("qemu-img", "convert", "-O", "raw", path, out, cwd=cwd)
    with open(os.path.join(cwd, out), "rb") as f:
        data = f.read()
    os.remove(os.path.join(cwd, out))
    return data


def compact(b):
    """Moves the grains of a qemu-img sparse file right after its metadata."""
    b = bytearray(b)
    (gtes,) = struct.unpack_from("<I", b, 44)
    rgd, gd, overhead = struct.unpack_from("<QQQ", b, 48)
    capacity, grain = struct.unpack_from("<QQ", b, 12)
    n_gd = -(-capacity // (gtes * grain))
    tables = []
    for d in (gd, rgd):
        for i in range(n_gd):
            (t,) = struct.unpack_from("<I", b, d * 512 + 4 * i)
            if t:
                tables.append(t)
    meta_end = max(t + -(-gtes * 4 // 512) for t in tables)
    shift = overhead - meta_end
    for t in tables:
        for i in range(gtes):
            (e,) = struct.unpack_from("<I", b, t * 512 + 4 * i)
            if e >= overhead:
                struct.pack_into("<I", b, t * 512 + 4 * i, e - shift)
    struct.pack_into("<Q", b, 64, meta_end)
    b = b[: meta_end * 512] + b[overhead * 512 :]
    end = len(b.rstrip(b"\0"))
    return bytes(b[: -(-end // 512) * 512])


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        seeds = {}

        def sparse(name, opts, writes, src=None):
            if src is None:
                run("qemu-img", "create", "-q", "-f", "vmdk", "-o", opts, name, "1M", cwd=d)
                run("qemu-io", "-f", "vmdk", *sum((["-c", w] for w in writes), []), name, cwd=d)
            else:
                run("qemu-img", "create", "-q", "-f", "raw", src, "1M", cwd=d)
                run("qemu-io", "-f", "raw", *sum((["-c", w] for w in writes), []), src, cwd=d)
                run("qemu-img", "convert", "-q", "-O", "vmdk", "-o", opts, src, name, cwd=d)
            want = raw_of(name, d)
            with open(os.path.join(d, name), "rb") as f:
                small = compact(f.read())
            with open(os.path.join(d, "c-" + name), "wb") as f:
                f.write(small)
            assert raw_of("c-" + name, d) == want, name
            return small

        seeds["qemu-img-monolithicSparse"] = sparse(
            "ms.vmdk", "subformat=monolithicSparse", ["write -P 0x11 0 4k"]
        )
        seeds["qemu-img-zeroed-grain"] = sparse(
            "zg.vmdk",
            "zeroed_grain=on",
            ["write -P 0x12 64k 512", "write -z 0 64k", "write -z 512k 64k"],
        )
        seeds["qemu-img-streamOptimized"] = sparse(
            "so.vmdk",
            "subformat=streamOptimized",
            ["write -P 0x21 0 10000", "write -P 0x22 600k 3000"],
            src="so.raw",
        )
        # Descriptor + NUL + extent.
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
            "mf.vmdk", "64k", cwd=d)
        run("qemu-io", "-f", "vmdk", "-c", "write -P 0x31 512 1000", "mf.vmdk", cwd=d)
        with open(os.path.join(d, "mf.vmdk"), "rb") as f:
            desc = f.read().rstrip(b"\0")
        with open(os.path.join(d, "mf-flat.vmdk"), "rb") as f:
            flat = f.read().rstrip(b"\0")
        seeds["qemu-img-monolithicFlat"] = desc + b"\0" + flat
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
            "ts.vmdk", "1M", cwd=d)
        run("qemu-io", "-f", "vmdk", "-c", "write -P 0x41 4k 4k", "ts.vmdk", cwd=d)
        with open(os.path.join(d, "ts.vmdk"), "rb") as f:
            desc = f.read().rstrip(b"\0")
        with open(os.path.join(d, "ts-s001.vmdk"), "rb") as f:
            extent = compact(f.read())
        seeds["qemu-img-twoGbMaxExtentSparse"] = desc + b"\0" + extent
        for name, data in seeds.items():
            with open(os.path.join(OUT, name), "wb") as f:
                f.write(data)
            print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    sys.exit(main())
