//! The Kotlin bindings of sdk-mobile, compiled with kotlinc and run on a real JVM with
//! JNA against the built `libkith.so`, sending to a real collector: with the SDK's own
//! HTTP client, with a transport written in Kotlin, and across a SIGKILL.
//!
//! Needs what `tests/run.sh` installs (the npm Kotlin compiler, Debian's JNA) and the
//! library and bindings that `sdk-mobile/generate.sh` builds, so these tests are ignored
//! by a plain `cargo test` and run by `tests/run.sh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use kith_e2e::{ADMIN_TOKEN, WRITE_KEY, admin, caught_up, collector};

const JNA: &str = "/usr/share/java/jna.jar";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kotlin_lib() -> PathBuf {
    repo().join("sdk-mobile/tools/node_modules/kotlin-compiler/lib")
}

fn jars(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| kotlin_lib().join(n).display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Compiles the generated bindings and the test program once per test run.
fn classes() -> &'static Path {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kotlin-tests");
        let status = Command::new("java")
            .arg("-cp")
            .arg(jars(&[
                "kotlin-compiler.jar",
                "kotlin-stdlib.jar",
                "kotlin-script-runtime.jar",
                "kotlin-reflect.jar",
                "annotations-13.0.jar",
                "kotlinx-coroutines-core-jvm.jar",
            ]))
            .arg("org.jetbrains.kotlin.cli.jvm.K2JVMCompiler")
            .args(["-no-stdlib", "-nowarn", "-cp"])
            .arg(format!("{}:{JNA}", jars(&["kotlin-stdlib.jar"])))
            .arg(repo().join("sdk-mobile/bindings/kotlin/dev/kith/sdk/kith.kt"))
            .arg(repo().join("sdk-mobile/tests/kotlin/KithTests.kt"))
            .arg("-d")
            .arg(&out)
            .status()
            .expect("kotlinc runs (install it with tests/run.sh)");
        assert!(
            status.success(),
            "the Kotlin bindings or tests do not compile"
        );
        out
    })
}

fn java(args: &[&str]) -> Command {
    let mut command = Command::new("java");
    command
        .arg(format!(
            "-Djna.library.path={}",
            repo().join("target/debug").display()
        ))
        .arg("-cp")
        .arg(format!(
            "{}:{}:{JNA}",
            classes().display(),
            jars(&["kotlin-stdlib.jar"])
        ))
        .arg("KithTestsKt")
        .args(args);
    command
}

fn succeeded(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "Kotlin program failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn run_mode(mode: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = collector(&dir.path().join("collector"));
    let sdk_dir = dir.path().join("sdk");
    let url = running.url("");
    let output = java(&[
        mode,
        &url,
        WRITE_KEY,
        ADMIN_TOKEN,
        sdk_dir.to_str().expect("utf-8"),
    ])
    .output()
    .expect("java runs");
    let stdout = succeeded(output);
    assert!(stdout.contains("OK 7 delivered"), "{stdout}");
}

#[test]
#[ignore = "needs the Kotlin compiler and JNA that tests/run.sh installs"]
fn a_kotlin_program_sends_events_the_collector_stores() {
    run_mode("send");
}

#[test]
#[ignore = "needs the Kotlin compiler and JNA that tests/run.sh installs"]
fn a_kotlin_transport_does_the_http() {
    run_mode("transport");
}

#[test]
#[ignore = "needs the Kotlin compiler and JNA that tests/run.sh installs"]
fn kotlin_events_survive_sigkill_and_are_delivered_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sdk_dir = dir.path().join("sdk");
    let sdk = sdk_dir.to_str().expect("utf-8");
    let mut child = java(&["capture", sdk, "40"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("java runs");
    let mut captured = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("line");
        if line == "done" {
            break;
        }
        captured.push(line);
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert_eq!(captured.len(), 40);

    let running = collector(&dir.path().join("collector"));
    let stdout = succeeded(
        java(&["drain", &running.url(""), WRITE_KEY, sdk])
            .output()
            .expect("java runs"),
    );
    assert!(stdout.contains("pending=0"), "{stdout}");
    caught_up(&running);
    for id in &captured {
        let found = admin(&running, &format!("/v1/events?message_id={id}"));
        assert_eq!(
            found["events"].as_array().map(Vec::len),
            Some(1),
            "{id} delivered once"
        );
    }
}
