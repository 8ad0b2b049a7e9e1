//! Who may use the export: `--allow-other on/off` as seen by user `nobody`, and the SETATTR
//! rules for mode and owner (EPERM for group/other bits without allow_other, EROFS for +w when
//! read-only, chown only with allow_other).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tests::*;

/// A work directory `nobody` can traverse (tempdirs are 0700).
fn shared_workdir() -> TempDir {
    let dir = workdir();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn as_nobody(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = tool("runuser");
    c.args(["-u", "nobody", "--"]);
    for a in args {
        c.arg(a);
    }
    run(&mut c)
}

fn chmod(p: &Path, mode: u32) -> std::io::Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
}

fn chown(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
}

/// Without allow_other, nobody else gets in (even with a permissive mode, which SETATTR
/// refuses to set anyway: EPERM), and ownership cannot change.
#[test]
fn allow_other_off_keeps_other_users_out() {
    require!(fuse_available(), is_root(), have_tools(&["runuser", "cat"]));
    let dir = shared_workdir();
    let img = dir.path().join("t.img");
    random_image(&img, 1 << 20, 1);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--allow-other", "off"]);
    let p = e.path().to_path_buf();

    let out = as_nobody(&[&"cat", &p]).fails();
    assert!(
        out.stderr.contains("Permission denied"),
        "nobody reading without allow_other: {out}"
    );

    assert_eq!(file_mode(&p), 0o600);
    let err = chmod(&p, 0o644).expect_err("chmod 0644 without allow_other");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EPERM),
        "chmod 0644 without allow_other: {err}"
    );
    assert_eq!(file_mode(&p), 0o600);
    chmod(&p, 0o700).expect("chmod 0700 (owner bits only) is allowed");
    assert_eq!(file_mode(&p), 0o700);
    chmod(&p, 0o600).unwrap();
    assert_eq!(file_mode(&p), 0o600);
    assert!(
        chown(&p, 65534, 65534).is_err(),
        "chown without allow_other must fail"
    );
    assert_eq!(fs::metadata(&p).unwrap().uid(), 0);
    e.stop_ok();
}

/// With allow_other on, the mode decides: 0600 keeps `nobody` out, 0644 lets it read but not
/// write; after chown to `nobody`, it may write.
#[test]
fn allow_other_on_lets_the_mode_decide() {
    require!(
        fuse_available(),
        is_root(),
        have_tools(&["runuser", "cat", "cmp", "dd"])
    );
    let dir = shared_workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, 1 << 20, 2);
    let reference = dir.path().join("reference");
    fs::write(&reference, &data).unwrap();
    chmod(&reference, 0o644).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--allow-other", "on"]);
    let p = e.path().to_path_buf();

    assert_eq!(file_mode(&p), 0o600);
    let out = as_nobody(&[&"cat", &p]).fails();
    assert!(
        out.stderr.contains("Permission denied"),
        "mode 0600 must keep nobody out: {out}"
    );

    chmod(&p, 0o644).expect("chmod 0644 with allow_other");
    assert_eq!(file_mode(&p), 0o644);
    as_nobody(&[&"cmp", &p, &reference]).ok();
    let of = format!("of={}", p.display());
    let out = as_nobody(&[
        &"dd",
        &"if=/dev/zero",
        &of,
        &"bs=512",
        &"count=1",
        &"conv=notrunc",
    ])
    .fails();
    assert!(
        out.stderr.contains("Permission denied"),
        "mode 0644: nobody must not write: {out}"
    );

    chown(&p, 65534, 65534).expect("chown with allow_other");
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534), "owner after chown");
    as_nobody(&[
        &"dd",
        &"if=/dev/zero",
        &of,
        &"bs=512",
        &"count=1",
        &"conv=notrunc",
    ])
    .ok();
    e.stop_ok();
    assert_eq!(
        &read_all(&img)[..512],
        &[0u8; 512][..],
        "nobody's write landed"
    );
    assert_eq!(&read_all(&img)[512..], &data[512..]);
}

/// Read-only export with allow_other: nobody can read when the mode allows; setting +w is
/// refused (EROFS).
#[test]
fn allow_other_on_read_only_export() {
    require!(fuse_available(), is_root(), have_tools(&["runuser", "cmp"]));
    let dir = shared_workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, 1 << 20, 3);
    let reference = dir.path().join("reference");
    fs::write(&reference, &data).unwrap();
    chmod(&reference, 0o644).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    chmod(&mnt, 0o755).unwrap();
    let mut e = Export::start(&img, &mnt, &["--allow-other", "on", "-r"]);
    let p = e.path().to_path_buf();
    assert_eq!(file_mode(&p), 0o400);
    let out = as_nobody(&[&"cmp", &p, &reference]).fails();
    assert!(
        out.stderr.contains("Permission denied"),
        "mode 0400 keeps nobody out: {out}"
    );
    let err = chmod(&p, 0o600).expect_err("chmod +w on a read-only export");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "chmod 0600 on a read-only export: {err}"
    );
    assert_eq!(file_mode(&p), 0o400);
    e.stop_ok();
}
