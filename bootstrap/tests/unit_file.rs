//! The unit `bootstrap run` installs under systemd passes `systemd-analyze verify` (offline; any
//! output on stderr is a failure, since unknown keys only warn).

#![allow(clippy::unwrap_used)]

#[test]
fn the_agent_unit_verifies() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        panic!("systemd-analyze is not installed (Debian package systemd)");
    };
    assert!(out.status.success());
    let tmp = tempfile::tempdir().unwrap();
    // ExecStart must exist at verify time: point it at the binary under test.
    let unit = hiveseed_bootstrap::cli::AGENT_UNIT
        .replace("/usr/local/bin/bootstrap", env!("CARGO_BIN_EXE_bootstrap"));
    let path = tmp.path().join("hiveseed-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
