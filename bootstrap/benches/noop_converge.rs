//! No-op re-converge of 20 files + 1 package in a temp root (DESIGN §8: ≤ 100 ms as a fresh
//! process, ≤ 25 ms inside the running agent). Prints its figures; asserts only that the plan is
//! empty, never a timing.
//!
//! The package is observed through a fake `dpkg-query` (a /bin/sh script that reports the pinned
//! version installed) placed first on PATH, so the real exec path is measured, fork+exec included.
//!
//! (a) fresh process: this bench binary re-executes itself with `--converge-once DIR`, which
//!     loads `DIR/manifest.json`, observes, plans and applies, and exits 0 iff the plan was empty;
//!     the parent reports wall time per process.
//! (b) in process: observe + plan + apply in a loop on one runtime; p50 / p90 of an iteration.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hiveseed_bootstrap::{
    apply, observe, plan, ApplyEnv, ApplySettings, ObserveEnv, PlanContext, RealHost, Unavailable,
};
use hiveseed_proto::manifest::{
    File, FileContent, Ownership, Package, PackagePin, VersionPin, MANIFEST_VERSION,
};
use hiveseed_proto::{Generation, Manifest, Resource};

const FILES: usize = 20;
const FRESH_RUNS: usize = 30;
const LOOP_RUNS: usize = 300;

fn manifest() -> Manifest {
    let mut resources = vec![Resource::Package(Package {
        id: "pkg:bench".parse().expect("id"),
        packages: vec![PackagePin {
            name: "bench-pkg".into(),
            version: VersionPin::Exact("1.0-1".into()),
        }],
        source: None,
    })];
    for i in 0..FILES {
        let secret = i % 5 == 0;
        resources.push(Resource::File(File {
            id: format!("file:f{i:02}").parse().expect("id"),
            path: format!("/etc/bench/f{i:02}.conf").parse().expect("path"),
            mode: if secret { "0600" } else { "0644" }.parse().expect("mode"),
            owner: Some(Ownership {
                owner: "root".into(),
                group: "root".into(),
            }),
            content: FileContent::Text {
                text: format!("# file {i}\n{}\n", "key = value\n".repeat(80)),
            },
            secret,
        }));
    }
    Manifest {
        v: MANIFEST_VERSION,
        campaign: "bench".parse().expect("campaign"),
        node: "bench-node".parse().expect("node"),
        role: "peer".parse().expect("role"),
        region: "lab".parse().expect("region"),
        generation: Generation(1),
        issued_at: 1,
        not_after: u64::MAX / 2,
        digest: Manifest::digest_of(&resources),
        report_interval_secs: 30,
        resources,
    }
}

/// One observe + plan + apply; returns how many actions the plan had.
async fn converge(root: &Path, m: &Manifest) -> usize {
    let host = RealHost::new(root).expect("root");
    let node = m.node.clone();
    let observed = observe(
        m,
        &ObserveEnv {
            host: &host,
            supervisor: None,
            readiness: &Unavailable,
            probe_timeout: Duration::from_secs(1),
        },
    )
    .await
    .expect("observe");
    let p = plan(m, &observed, &PlanContext::now()).expect("plan");
    let n = p.actions().count();
    let env = ApplyEnv {
        host: &host,
        node: &node,
        fetcher: &Unavailable,
        signer: &Unavailable,
        issuer: &Unavailable,
        readiness: &Unavailable,
        supervisor: None,
        settings: ApplySettings::default(),
    };
    apply(&p, &env, &mut |_| {}).await.expect("apply");
    n
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn child_mode(dir: &Path) -> ! {
    let text = std::fs::read(dir.join("manifest.json")).expect("manifest");
    let m: Manifest = serde_json::from_slice(&text).expect("manifest json");
    let n = runtime().block_on(converge(&dir.join("root"), &m));
    std::process::exit(if n == 0 { 0 } else { 1 });
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{label}: n={} min={:.2} ms p50={:.2} ms p90={:.2} ms max={:.2} ms",
        ms.len(),
        ms[0],
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        ms[ms.len() - 1]
    );
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let fake = bin.join("dpkg-query");
    std::fs::write(
        &fake,
        "#!/bin/sh\nprintf 'bench-pkg\\tinstall ok installed\\t1.0-1\\n'\n",
    )
    .expect("fake dpkg-query");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(
        dir.path().join("manifest.json"),
        serde_json::to_vec(&manifest()).expect("json"),
    )
    .expect("manifest");
    (dir, bin)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--converge-once") {
        child_mode(Path::new(&args[i + 1]));
    }
    let (dir, bin) = setup();
    // Before any thread exists: the fake dpkg-query goes first on PATH for us and our children.
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::env::set_var("PATH", &path);

    let m = manifest();
    let rt = runtime();
    let first = rt.block_on(converge(&dir.path().join("root"), &m));
    assert_eq!(first, FILES, "first apply writes every file");
    assert_eq!(
        rt.block_on(converge(&dir.path().join("root"), &m)),
        0,
        "second plan must be empty"
    );

    let exe = std::env::current_exe().expect("current exe");
    let mut fresh = Vec::with_capacity(FRESH_RUNS);
    for _ in 0..FRESH_RUNS {
        let t = Instant::now();
        let status = std::process::Command::new(&exe)
            .arg("--converge-once")
            .arg(dir.path())
            .status()
            .expect("spawn");
        fresh.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(status.success(), "fresh process saw a non-empty plan");
    }

    let mut inproc = Vec::with_capacity(LOOP_RUNS);
    for _ in 0..LOOP_RUNS {
        let t = Instant::now();
        let n = rt.block_on(converge(&dir.path().join("root"), &m));
        inproc.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(n, 0);
    }

    println!("no-op converge, {FILES} files + 1 package (fake dpkg-query on PATH):");
    summary("  (a) fresh process, wall (target <= 100 ms)", fresh);
    summary("  (b) in process (target <= 25 ms)", inproc);
}
