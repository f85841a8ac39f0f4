//! The boot path of the lab, end to end with small roles: `seeder serve` on 127.0.9.1, Terraform
//! renders each node's user_data from `seeder tfvars`, each chroot boots from it (write_files,
//! then runcmd fetches `bootstrap` over TLS pinned to the campaign CA and runs it), the agents
//! enroll from their own public addresses and converge, the peer after waiting for its pg.
//! Needs root, terraform, and the binaries `tests/run-all.sh` builds (HIVESEED_SEEDER_BIN,
//! HIVESEED_BOOTSTRAP_BIN).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

fn bin(var: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run ./tests/run-all.sh, which builds the seeder and the static agent")
    });
    std::fs::canonicalize(&p)
        .unwrap_or_else(|e| panic!("{var}={}: {e}", PathBuf::from(&p).display()))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Every file under `dir` (not following symlinks), for secret scans.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            files(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

#[test]
fn a_fleet_boots_from_its_rendered_user_data() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = repo().join("tests/lab/fixtures/smoke");
    let cfg = hiveseed_lab::fleet::UpConfig {
        lab_dir: tmp.path().join("lab"),
        fleet_file: fixtures.join("fleet.toml"),
        roles_dir: fixtures.clone(),
        terraform_dir: repo().join("terraform"),
        seeder_bin: bin("HIVESEED_SEEDER_BIN"),
        bootstrap_bin: bin("HIVESEED_BOOTSTRAP_BIN"),
        with_ai_memory: false,
    };
    let fleet = hiveseed_lab::fleet::up(&cfg).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let green = fleet.wait_converged(Duration::from_secs(180)).unwrap();
        eprintln!("first runcmd -> converged: {:.1}s", green.as_secs_f64());

        let out = fleet.seeder_cmd(&["status", "--json"]).output().unwrap();
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(view["converged"], 2, "{view}");
        let pg = fleet.nodes.iter().find(|n| n.role == "pg").unwrap();
        let peer = fleet.nodes.iter().find(|n| n.role == "peer").unwrap();
        // The agent enrolled from its own public address (the seeder checks it).
        let row = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == pg.name.as_str())
            .unwrap();
        assert_eq!(row["public_ip"], pg.public_ip.to_string());
        // What the roles asked for is on the nodes.
        use std::os::unix::fs::PermissionsExt;
        let conf = pg.root.join("etc/smoke/pg.conf");
        assert_eq!(
            std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(std::fs::read_to_string(&conf)
            .unwrap()
            .starts_with(&format!("listen={}\n", pg.private_ip)));
        assert_eq!(
            std::fs::read_to_string(peer.root.join("etc/smoke/peer.conf")).unwrap(),
            format!("pg={}\n", pg.private_ip)
        );
        // The cloud-config's hostname and manage_etc_hosts, played as cloud-init does:
        // /etc/hostname, and /etc/hosts with localhost (the base image has no /etc/hosts).
        assert_eq!(
            std::fs::read_to_string(pg.root.join("etc/hostname")).unwrap(),
            format!("{}\n", pg.name)
        );
        let hosts = std::fs::read_to_string(pg.root.join("etc/hosts")).unwrap();
        assert!(hosts.lines().any(|l| l == "127.0.0.1 localhost"), "{hosts}");
        let own = format!("127.0.1.1 {0} {0}", pg.name);
        assert!(hosts.lines().any(|l| l == own), "{hosts}");
        // join.toml as cloud-init wrote it: 0600.
        let join = pg.root.join("etc/hiveseed/join.toml");
        assert_eq!(
            std::fs::metadata(&join).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // No fleet secret in user_data, in any process's command line, or in any log.
        let secrets: Vec<String> = ["secrets/pg-password", "secrets/api-key"]
            .iter()
            .map(|s| {
                std::fs::read_to_string(fleet.campaign_dir.join(s))
                    .unwrap()
                    .trim()
                    .to_owned()
            })
            .collect();
        let mut scanned: Vec<PathBuf> = vec![
            fleet
                .lab
                .dir()
                .join("terraform/render/nodes.auto.tfvars.json"),
            fleet.lab.dir().join("seeder.log"),
        ];
        for n in &fleet.nodes {
            scanned.push(n.console_log.clone());
            files(&n.root.join("var/log"), &mut scanned);
        }
        for path in &scanned {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for s in &secrets {
                assert!(
                    !text.contains(s.as_str()),
                    "a fleet secret is in {}",
                    path.display()
                );
            }
        }
        // Every command line since the first boot, sampled every 50 ms.
        fleet.cmdlines.stop();
        let labelled: Vec<(String, String)> = secrets
            .iter()
            .map(|s| ("a fleet secret".to_owned(), s.clone()))
            .collect();
        let leaks = fleet.cmdlines.leaks(&labelled);
        assert!(leaks.is_empty(), "{leaks:?}");
        assert!(fleet.cmdlines.stats().processes > 0);
    }));
    let report = hiveseed_lab::fleet::down(fleet.lab.dir()).unwrap();
    eprintln!("{report}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(fleet.lab.dir().to_str().unwrap()),
        "mounts left behind"
    );
    assert!(
        hiveseed_lab::procs::rooted_under(&fleet.lab.nodes_dir()).is_empty(),
        "processes left behind"
    );
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
