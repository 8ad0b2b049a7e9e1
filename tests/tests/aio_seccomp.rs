//! The io_uring fallback forced the way a container does it: coro-fuse runs under a seccomp
//! filter that answers `io_uring_setup` with `ENOSYS`. `--aio auto` then warns once and serves
//! with epoll loops and the thread pool; `--aio io_uring` refuses to start, exit status 1.
//! (`tests/tests/aio.rs` covers the same with the hidden `--inject-no-io-uring`.)
#![cfg(target_arch = "x86_64")]

use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use tests::*;

/// Installs, in the child about to exec, a seccomp filter that fails `io_uring_setup` with
/// ENOSYS and allows everything else.
fn deny_io_uring(cmd: &mut Command) {
    // SAFETY: the hook runs in the forked child before exec and only makes two syscalls
    // (prctl, seccomp) on data that lives on its stack; it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
            let enosys = libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA);
            let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
            let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
            let ret = (libc::BPF_RET | libc::BPF_K) as u16;
            let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
            let prog = [
                f(ld, 0, 0, 4), // seccomp_data.arch
                f(jeq, 0, 3, AUDIT_ARCH_X86_64),
                f(ld, 0, 0, 0), // seccomp_data.nr
                f(jeq, 0, 1, libc::SYS_io_uring_setup as u32),
                f(ret, 0, 0, enosys),
                f(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
            ];
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr().cast_mut(),
            };
            // SAFETY: plain prctl; no pointers.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel copies them.
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn seccomp_denied_io_uring_falls_back_under_auto() {
    require!(fuse_available());
    let dir = disk_workdir(); // on a disk, where auto would take the ring
    let img = dir.path().join("sc.img");
    let model = random_image(&img, 128 * 1024, 5);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let mut e = match Export::try_start_with(
        None,
        &img,
        &mnt,
        &["--aio", "auto", "--cache", "none"],
        deny_io_uring,
    ) {
        Ok(e) => e,
        Err(x) => panic!("coro-fuse under seccomp did not start: {x}"),
    };
    let got = fs::read(e.path()).expect("read the export");
    assert!(got == model, "the export differs from the image");
    open_rw(e.path())
        .write_all_at(&[0x5au8; 4096], 8192)
        .expect("write through the export");
    let x = e.stop_ok();
    assert!(
        x.stderr.contains("io_uring is not available")
            && x.stderr.contains("Function not implemented"),
        "no fallback warning naming ENOSYS:\n{x}"
    );
    assert!(x.stderr.contains("event loops: epoll"), "{x}");
    assert_eq!(
        &fs::read(&img).expect("read the image")[8192..12288],
        &[0x5au8; 4096][..]
    );
}

#[test]
fn seccomp_denied_io_uring_is_an_error_under_io_uring() {
    require!(fuse_available());
    let dir = disk_workdir();
    let img = dir.path().join("sc.img");
    let model = random_image(&img, 64 * 1024, 6);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let r = Export::try_start_with(None, &img, &mnt, &["--aio", "io_uring"], deny_io_uring);
    let x = match r {
        Ok(_) => panic!("--aio io_uring started without io_uring"),
        Err(x) => x,
    };
    assert_eq!(x.code(), Some(1), "{x}");
    assert!(
        x.stderr
            .contains("--aio io_uring: io_uring is not available"),
        "{x}"
    );
    assert!(fs::read(&img).expect("image") == model, "the image changed");
}
