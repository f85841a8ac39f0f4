//! The rooted host: symlink escapes refused with no side effect, atomic writes with exact modes,
//! the root's own passwd, and command errors that carry argv, status and stderr.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use common::temp_root;
use hiveseed_bootstrap::host::{Attrs, Exec, ExitCode, FileKind, Owner, Stat};
use hiveseed_bootstrap::{Host, HostError, RealHost};
use hiveseed_proto::{AbsPath, FileMode};

fn p(s: &str) -> AbsPath {
    s.parse().expect("valid path")
}

/// What a plan would have observed at `path` (read outside the host, as `lstat`).
fn observed(path: &std::path::Path) -> Stat {
    let m = std::fs::symlink_metadata(path).unwrap();
    Stat {
        kind: if m.file_type().is_symlink() {
            FileKind::Symlink
        } else if m.is_dir() {
            FileKind::Directory
        } else {
            FileKind::File
        },
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        dev: m.dev(),
        ino: m.ino(),
        nlink: m.nlink(),
    }
}

fn attrs(mode: u32) -> Attrs {
    Attrs {
        mode: FileMode::new(mode).expect("valid mode"),
        owner: None,
    }
}

#[test]
fn symlink_components_pointing_outside_the_root_are_refused_without_side_effects() {
    let root = temp_root();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), "original").unwrap();
    std::fs::set_permissions(
        outside.path().join("victim"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    symlink(outside.path(), root.path().join("etc/evil")).unwrap();
    symlink("../../../../../../..", root.path().join("etc/up")).unwrap();
    let host = RealHost::new(root.path()).unwrap();

    let escape = |r: Result<(), HostError>| {
        assert!(matches!(r, Err(HostError::Escape { .. })), "{r:?}");
    };
    escape(host.write_atomic(&p("/etc/evil/new"), b"x", attrs(0o644)));
    escape(host.write_atomic(&p("/etc/evil/victim"), b"x", attrs(0o644)));
    escape(host.mkdir(&p("/etc/evil/dir"), attrs(0o755)));
    let victim = observed(&outside.path().join("victim"));
    escape(host.chmod(
        &p("/etc/evil/victim"),
        FileMode::new(0o666).unwrap(),
        &victim,
    ));
    escape(host.chown(&p("/etc/evil/victim"), Owner { uid: 1, gid: 1 }, &victim));
    escape(host.remove(&p("/etc/evil/victim")));
    escape(host.write_atomic(&p("/etc/up/tmp/escaped"), b"x", attrs(0o644)));
    assert!(matches!(
        host.read(&p("/etc/evil/victim")),
        Err(HostError::Escape { .. })
    ));
    assert!(matches!(
        host.open_append(&p("/etc/evil/log"), FileMode::new(0o644).unwrap()),
        Err(HostError::Escape { .. })
    ));

    // Nothing outside changed.
    let names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["victim"]);
    assert_eq!(
        std::fs::read_to_string(outside.path().join("victim")).unwrap(),
        "original"
    );
    assert_eq!(
        std::fs::metadata(outside.path().join("victim"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(!std::path::Path::new("/tmp/escaped").exists());
}

#[test]
fn a_final_symlink_is_replaced_never_followed() {
    let root = temp_root();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "original").unwrap();
    symlink(&victim, root.path().join("etc/link")).unwrap();
    let host = RealHost::new(root.path()).unwrap();

    assert_eq!(
        host.stat(&p("/etc/link")).unwrap().unwrap().kind,
        FileKind::Symlink
    );
    assert!(matches!(
        host.chmod(
            &p("/etc/link"),
            FileMode::new(0o777).unwrap(),
            &host.stat(&p("/etc/link")).unwrap().unwrap()
        ),
        Err(HostError::WrongKind { .. })
    ));
    host.write_atomic(&p("/etc/link"), b"replaced", attrs(0o640))
        .unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
    let meta = std::fs::symlink_metadata(root.path().join("etc/link")).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o640);
}

#[test]
fn symlinks_inside_the_root_still_work() {
    let root = temp_root();
    std::fs::create_dir_all(root.path().join("run")).unwrap();
    std::fs::create_dir_all(root.path().join("var")).unwrap();
    symlink("../run", root.path().join("var/run")).unwrap();
    let host = RealHost::new(root.path()).unwrap();
    host.write_atomic(&p("/var/run/x.pid"), b"42\n", attrs(0o644))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(root.path().join("run/x.pid")).unwrap(),
        "42\n"
    );
    assert_eq!(host.read(&p("/var/run/x.pid")).unwrap().unwrap(), b"42\n");
}

#[test]
fn atomic_writes_get_the_exact_mode_and_owner_despite_the_umask() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    host.write_atomic(
        &p("/etc/shared"),
        b"a",
        Attrs {
            mode: FileMode::new(0o664).unwrap(),
            owner: Some(Owner { uid: 101, gid: 104 }),
        },
    )
    .unwrap();
    let m = std::fs::metadata(root.path().join("etc/shared")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o664, 101, 104));
    let st = host.stat(&p("/etc/shared")).unwrap().unwrap();
    assert_eq!(
        (st.kind, st.mode, st.uid, st.gid, st.size),
        (FileKind::File, 0o664, 101, 104, 1)
    );

    // Overwrite: new content, new mode, no temp file left.
    host.write_atomic(&p("/etc/shared"), b"bb", attrs(0o600))
        .unwrap();
    assert_eq!(
        std::fs::read(root.path().join("etc/shared")).unwrap(),
        b"bb"
    );
    let entries: Vec<String> = std::fs::read_dir(root.path().join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries.iter().all(|n| !n.contains("hiveseed")),
        "{entries:?}"
    );

    // A missing parent is an error, not a silent mkdir.
    assert!(host
        .write_atomic(&p("/nope/file"), b"x", attrs(0o644))
        .is_err());
    assert!(host.read(&p("/nope/file")).unwrap().is_none());
    assert!(host.stat(&p("/nope/file")).unwrap().is_none());
}

#[test]
fn users_and_groups_come_from_the_roots_own_files() {
    let root = temp_root();
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nonly-in-root:x:4242:4343::/srv:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.path().join("etc/group"), "only-in-root:x:4343:\n").unwrap();
    let host = RealHost::new(root.path()).unwrap();
    let e = host.lookup_user("only-in-root").unwrap().unwrap();
    assert_eq!((e.uid, e.gid, e.home.as_str()), (4242, 4343, "/srv"));
    assert_eq!(host.lookup_group("only-in-root").unwrap(), Some(4343));
    assert!(host.lookup_user("postgres").unwrap().is_none());
    let err = host
        .resolve_owner(&p("/x"), "only-in-root", "wheel")
        .unwrap_err();
    assert!(err.to_string().contains("wheel"), "{err}");
}

#[test]
fn exec_is_argv_only_and_failures_carry_argv_status_and_truncated_stderr() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    // An argument with shell metacharacters is passed verbatim: no shell ever sees it.
    let out = host
        .exec(&Exec::new(["/bin/echo", "$(id) ; rm -rf /"]))
        .unwrap();
    assert_eq!(out.stdout_str(), "$(id) ; rm -rf /\n");

    let exec = Exec::new([
        "/bin/sh",
        "-c",
        "head -c 10000 /dev/zero | tr '\\0' e >&2; exit 7",
    ]);
    let err = host.exec(&exec).unwrap().check(&exec).unwrap_err();
    let HostError::CommandFailed {
        argv,
        status,
        stderr,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(argv.starts_with("/bin/sh -c"), "{argv}");
    assert_eq!(*status, ExitCode::Code(7));
    assert!(stderr.len() < 3000, "{}", stderr.len());
    assert!(stderr.ends_with("bytes truncated)"));

    // stdin reaches the command, and the Exec's Debug never shows it.
    let exec = Exec::new(["/bin/cat"]).stdin(b"s3cret-stdin".to_vec());
    assert_eq!(host.exec(&exec).unwrap().stdout_str(), "s3cret-stdin");
    assert!(!format!("{exec:?}").contains("s3cret"));

    // Running as a user of the root's passwd.
    let out = host
        .exec(&Exec::new(["/usr/bin/id", "-u"]).user(Some("nobody".into())))
        .unwrap();
    assert_eq!(out.stdout_str().trim(), "65534");

    let missing = host.exec(&Exec::new(["/nonexistent/prog", "arg"]));
    assert!(
        matches!(&missing, Err(HostError::Spawn { argv, .. }) if argv == "/nonexistent/prog arg"),
        "{missing:?}"
    );
}

/// Digests follow the content: an overwrite with the same size right after hashing (same clock
/// tick) is still seen, and a symlink out of the root is refused like a read.
#[test]
fn digests_follow_same_size_rewrites_and_stay_beneath_the_root() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let f = p("/etc/artifact.bin");
    assert_eq!(host.sha256(&f).unwrap(), None);
    std::fs::write(root.path().join("etc/artifact.bin"), b"aaaa").unwrap();
    let first = host.sha256(&f).unwrap().unwrap();
    assert_eq!(first, hiveseed_proto::Sha256::digest(b"aaaa"));
    std::fs::write(root.path().join("etc/artifact.bin"), b"bbbb").unwrap();
    assert_eq!(
        host.sha256(&f).unwrap().unwrap(),
        hiveseed_proto::Sha256::digest(b"bbbb")
    );
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"x").unwrap();
    symlink(outside.path().join("secret"), root.path().join("etc/link")).unwrap();
    assert!(host.sha256(&p("/etc/link")).is_err());
}
