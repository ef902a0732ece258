//! The lb-controller container image as `deploy/image/build` makes it: a
//! docker-archive whose manifest, config and layers are read here the way
//! `docker load` reads them, whose root holds the static binary and nothing
//! to run besides it, and whose binary runs from that root as the image's
//! user, checking the ConfigMap's configuration. The Deployment names that
//! image and runs it as that user.
//!
//! Building needs a Docker daemon, or umoci and skopeo (`.ci/run` installs
//! them); running the binary from the unpacked root needs root (chroot).
//! Where either is missing the test skips with a loud message.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::deploy::{repo, run, works};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn skip(why: &str) {
    eprintln!("\n*** SKIPPED the image test: {why} ***\n");
}

/// The image reference and what the Containerfile says the image runs.
struct Expected {
    reference: String,
    user: String,
    entrypoint: Value,
    cmd: Value,
}

fn expected() -> Expected {
    let file = std::fs::read_to_string(repo().join("deploy/image/Containerfile")).unwrap();
    let instruction = |name: &str| {
        file.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("the Containerfile has no {name}"))
            .trim()
            .to_owned()
    };
    assert_eq!(instruction("FROM"), "scratch");
    Expected {
        reference: format!("localhost/weir/lb-controller:{VERSION}"),
        user: instruction("USER"),
        entrypoint: serde_json::from_str(&instruction("ENTRYPOINT")).unwrap(),
        cmd: serde_json::from_str(&instruction("CMD")).unwrap(),
    }
}

/// The manifest's documents of `kind`.
fn manifest(kind: &str) -> Vec<Value> {
    let text =
        std::fs::read_to_string(repo().join("deploy/kubernetes/lb-controller.yaml")).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    docs.into_iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn the_deployment_runs_the_built_image_as_its_user_read_only() {
    let want = expected();
    let deployment = &manifest("Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], want.reference.as_str());
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    let (uid, gid) = want.user.split_once(':').unwrap();
    assert_eq!(pod["securityContext"]["runAsUser"].to_string(), uid);
    assert_eq!(pod["securityContext"]["runAsGroup"].to_string(), gid);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // The args replace CMD; the entrypoint is the binary.
    assert_eq!(container["args"][0], "run");
    assert!(
        container["command"].is_null(),
        "keep the image's entrypoint"
    );
}

/// Unpacks a docker-archive: its manifest entry, image config, and the
/// layers applied in order into `root`.
fn unpack(archive: &Path, into: &Path) -> (Value, Value, PathBuf) {
    let raw = into.join("archive");
    let root = into.join("rootfs");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&raw));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(raw.join("manifest.json")).unwrap()).unwrap();
    let entries = manifest.as_array().expect("manifest.json is a list");
    assert_eq!(entries.len(), 1, "{manifest}");
    let entry = entries[0].clone();
    let config_file = entry["Config"].as_str().expect("a Config");
    let config: Value =
        serde_json::from_slice(&std::fs::read(raw.join(config_file)).unwrap()).unwrap();
    for layer in entry["Layers"].as_array().expect("Layers") {
        run(Command::new("tar")
            .arg("-xf")
            .arg(raw.join(layer.as_str().unwrap()))
            .arg("-C")
            .arg(&root));
    }
    (entry, config, root)
}

/// Every path under `root`, relative, directories with a trailing `/`.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() && !path.is_symlink() {
                out.insert(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// Runs `args` from `root` as `user` (uid:gid), as the container would.
fn run_in(root: &Path, user: &str, args: &[&str]) -> String {
    let out = run(Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(root)
        .args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_image_archive_holds_only_the_static_binary_and_runs_it_as_65532() {
    let daemonless = works("umoci", &["--version"]) && works("skopeo", &["--version"]);
    if !(works("docker", &["info"]) || daemonless) {
        return skip("no Docker daemon, and no umoci and skopeo");
    }
    let root_user = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let want = expected();
    let dir = support::temp_dir("image");

    // The same script as operators run; the dev profile keeps CI short.
    let out = run(Command::new(repo().join("deploy/image/build"))
        .args(["--profile", "dev"])
        .env(
            "CARGO",
            std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
        ));
    let archive = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        archive.ends_with(format!("image/lb-controller-{VERSION}.tar")),
        "{}",
        archive.display()
    );

    let (entry, config, root) = unpack(&archive, &dir);
    assert_eq!(entry["RepoTags"], serde_json::json!([want.reference]));
    assert_eq!(config["os"], "linux");
    let run_config = &config["config"];
    assert_eq!(run_config["User"], want.user.as_str());
    assert_eq!(run_config["Entrypoint"], want.entrypoint);
    assert_eq!(run_config["Cmd"], want.cmd);
    // No shell, no libc, no package manager: the binary, and who 65532 is.
    assert_eq!(
        tree(&root),
        [
            "etc/",
            "etc/group",
            "etc/passwd",
            "usr/",
            "usr/bin/",
            "usr/bin/lb-controller"
        ]
        .into_iter()
        .map(String::from)
        .collect::<BTreeSet<_>>()
    );

    if !root_user {
        let _ = std::fs::remove_dir_all(&dir);
        return skip("running the binary from the image's root needs chroot, so root");
    }
    // The ConfigMap's file, where the Deployment mounts it.
    let config_map = &manifest("ConfigMap")[0];
    let toml = config_map["data"]["lb-controller.toml"].as_str().unwrap();
    std::fs::create_dir_all(root.join("etc/weir")).unwrap();
    std::fs::write(root.join("etc/weir/lb-controller.toml"), toml).unwrap();
    // An empty root has no dynamic loader: this runs only a static binary.
    let entrypoint = want.entrypoint[0].as_str().unwrap();
    assert_eq!(
        run_in(&root, &want.user, &[entrypoint, "--version"]).trim(),
        format!("lb-controller {VERSION}")
    );
    let checked = run_in(
        &root,
        &want.user,
        &[entrypoint, "check-config", "/etc/weir/lb-controller.toml"],
    );
    assert!(
        checked.contains("/etc/weir/lb-controller.toml: ok (1 pools, 1 forwarders"),
        "{checked}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
